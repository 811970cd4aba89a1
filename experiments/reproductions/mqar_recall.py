"""Associative recall: softmax attention solves multi-query associative recall, linear attention
and sliding-window attention do not (Zoology, Arora et al. 2023, fig. 2).

Claim:    a 2-layer model of width 64 with softmax attention reaches >= 0.95 accuracy on the
          recalled values; linear attention at the same width falls clearly below it;
          sliding-window attention (window = length / 4) misses the pairs bound outside its
          window.
Paper:    Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
          Models", fig. 2 (MQAR accuracy vs. model width per sequence length).
Band:     on length 32 with 4 pairs: softmax accuracy >= 0.95; linear accuracy <= softmax -
          0.15; local accuracy <= softmax - 0.05. Stated before the mqar/tiny budget's first
          run (the band of the first budget, below, asked the same at lengths 64 and 128 plus
          linear's fall from 64 to 128; the length axis is gone with it, see Found:) and kept
          unchanged when the task moved from mqar/tiny to mqar/l32.
Budget:   mqar/l32 (vocab 64, length 32, 4 pairs: mqar/tiny's task, with 16,384 training
          problems instead of 512 and 256 test problems; 600 x 64 rows see each about 2.3
          times, too few to memorize them), width 64, 2 layers, 1 head of 64, 600 steps of
          64 rows, AdamW lr 3e-3 (1e-2 on mqar/tiny), 60 warmup steps, cosine decay, the
          project's model defaults (N(0, 1) embeddings, RoPE, tied): on mqar/tiny the setting
          under which the README's MQAR-defaults study saw softmax learn recall (0.98 at 2
          seeds); the task and learning rate from the probes in Found:. The paper's grid (widths
          64-512, lengths 64-512, vocab 8192, ~100k training problems) is far beyond a 2-core
          CPU.
Found:    (2026-12-04) The first budget (mqar/l64 and l128, 4 heads, lr 1e-2, 800 steps,
          flax-style N(0, 1/64) embeddings, learned positions, untied) left softmax at 0.181
          on l64 (1 seed, loaded machine). A single-seed probe on l64 with the defaults, 4
          heads, lr 3e-3, 100 warmup steps: eval accuracy 0.083 / 0.115 / 0.122 / 0.114 at
          steps 250 / 500 / 750 / 1000 (train 0.16: starting to memorize its 8,192 problems),
          stopped there; the MQAR-defaults study had no setting above 0.135 on l64 at 600
          steps. So 8 pairs at length 64 are not learned within ~1,000 CPU steps here, and
          the claim moved to mqar/tiny, where softmax does learn; the paper's second axis
          (degradation as pairs grow) needs an accelerator budget and is not claimed.
          Measured at this budget (3 seeds, shared 2-core CPU): fails on the mean. Softmax
          learns recall at seeds 0 and 1 (0.984, 0.980; 0.98 by step 300-400) but memorizes at
          seed 2 (train accuracy 1.0, eval 0.23): mean 0.732 ± 0.434. Linear 0.189 ± 0.006 and
          local 0.117 ± 0.008 stay at the level of guessing among the pairs at every seed
          (softmax is above both at every seed, at seed 2 by little); the >= 0.95 bar is
          missed because mqar/tiny's 512
          training problems let a run memorize instead of learning the lookup (the same
          failure the MQAR-defaults study saw for the flax-style settings, and gdn_recall for
          Gated DeltaNet). A task with more problems (l64's 8,192) needs more steps than fit.
          (2026-12-05) So the task became mqar/l32: the same problems' distribution, 32 times
          as many training problems, band and steps unchanged. At lr 1e-2 softmax then sat on
          the guessing plateau (accuracy 0.241 / 0.237 at seeds 0 / 1 after 600 steps; that
          sweep was stopped there): without repeated problems to fit, the lookup is not found
          at that rate. Two single-seed softmax probes of 2,000 steps (seed 0): lr 1e-2 left
          the plateau only at step ~800 and reached 0.49; lr 3e-3 reached 0.990 at step 200
          and 0.998 at step 600. So the budget's learning rate became 3e-3 (600 steps, as
          before), chosen from softmax alone; linear and local were not probed. Stated here
          before the 3-seed run at this budget.
          Measured at this budget (3 seeds, idle 2-core CPU, 8.2 min with 2 runs at a time):
          passes. Softmax 1.000 ± 0.001 (0.985-0.998 at step 200 at every seed), linear
          0.238 ± 0.021, local 0.205 ± 0.014: both at the level of guessing among the 4 values
          in context (the loss of linear, 1.65 nats, is about ln 5). The MQAR-defaults study
          on mqar/l32 (README) shows why the learning rate, not the defaults, decided it.
          Rerun on 2026-12-06 (5.7 min): the same numbers, but softmax's eval loss, 0.0059
          where the first runs gave 0.0063; accuracy repeats to every digit.
Command:  python -m experiments.reproduce --only mqar_recall [--seeds 3]
Hardware: a 2-core CPU: 3 runs per seed (measured times in the README's table).
"""


import math

from experiments import mqar
from launch import grid

ORDER = 1
TITLE = "MQAR recall on mqar/l32 (length 32, 4 pairs, width 64)"
PAPER = "Zoology (Arora et al. 2023), fig. 2"
BAND = "on mqar/l32: softmax >= 0.95; linear <= softmax - 0.15; local <= softmax - 0.05"
SWEEP_METRIC = "accuracy"
_FIXED = "data=l32,width=64,heads=1,lr=3e-3,steps=600,warmup=60"
MECHANISMS = ("mha", "linear", "local")


def get_config(arg: str | None = None):
  config = mqar.get_config(_FIXED + (f",{arg}" if arg else ""))
  config.train.eval_every = 100  # the learning curves of the plot
  return config


def get_sweep(arg: str | None = None) -> list[grid.Point]:
  del arg
  return grid.grid({"arg.attention": list(MECHANISMS)})


def check(cells) -> tuple[str, str]:
  acc, detail = cells.compare("accuracy", {a: a for a in MECHANISMS})
  if acc is None:
    return "incomplete", detail
  ok = (acc["mha"] >= 0.95 and acc["linear"] <= acc["mha"] - 0.15
        and acc["local"] <= acc["mha"] - 0.05)
  return ("pass" if ok else "fail"), detail


def plot(cells):
  """Eval accuracy per mechanism (mean, std over seeds) and each one's eval curve."""
  from attn import viz

  fig = viz.new_figure(8.0, 3.2)
  bars, curves = fig.subplots(1, 2)
  for i, attention in enumerate(MECHANISMS):
    cell = cells.find(attention=attention)
    mean, std, _ = cell.stats.get("accuracy", (math.nan, None, 0)) if cell else (math.nan, None, 0)
    bars.bar(attention, mean, yerr=std or 0, capsize=4, color=f"C{i}")
    for j, run_dir in enumerate(cell.dirs if cell else []):
      rows = [r for r in viz.read_metrics(run_dir) if r.get("split") == "eval"]
      curves.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], color=f"C{i}",
                  marker="o", ms=3, label=attention if j == 0 else None)
  for ax in (bars, curves):
    ax.set_ylim(0, 1.02)
    ax.axhline(0.95, color="gray", lw=0.8, ls="--")
  bars.set_ylabel("recall accuracy (eval)")
  curves.set_xlabel("step")
  if curves.get_legend_handles_labels()[0]:  # a finished run's curve to name
    curves.legend(fontsize=8)
  fig.suptitle(TITLE, fontsize=9)
  return fig
