"""Recall vs. model width: softmax attention recalls at every width, linear attention and
Performer need width to recall (Zoology, Arora et al. 2023, fig. 2's width axis).

Claim:    on the mqar_recall claim's task, softmax attention recalls at every model width in
          the grid, while the two linear-cost mechanisms (linear attention, elu + 1 feature
          map; Performer, FAVOR+ with 256 positive random features), whose recurrent state
          grows with the head dimension, fall clearly below it at the narrowest width and
          recall more as the width grows.
Paper:    Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
          Models", fig. 2 (MQAR accuracy vs. model dimension: attention solves at every width;
          the efficient models' accuracy rises with the dimension) and sec. 4 (the recurrent
          state's size bounds recall).
Band:     on mqar/l32 (length 32, 4 pairs), 1 head (head dimension = width): softmax >= 0.95
          at widths 64 and 256; at width 64 linear and performer each <= softmax - 0.15; from
          width 64 to 256 linear and performer each gain >= 0.10 accuracy. Mean over seeds.
          Stated before the claim's first run (2026-12-05); no width above 64 had been run on
          this task for any mechanism.
Budget:   mqar_recall's setting (experiments/reproductions/mqar_recall.py: mqar/l32, 2
          layers, 1 head, 600 steps of 64 rows, AdamW lr 3e-3, 60 warmup steps, cosine, the
          project's model defaults) at widths 64 and 256 (MLP 2 x width), three mechanisms:
          6 runs per seed. The paper's grid (widths 64-512, lengths 64-512) is beyond a
          2-core CPU (mqar_recall's Found: on length 64).
Found:    not run yet.
Command:  python -m experiments.reproduce --only mqar_width [--seeds 3]
Hardware: a 2-core CPU: 6 runs per seed (measured times in the README's table).
"""


import math

from experiments.reproductions import mqar_recall
from launch import grid

ORDER = 1
TITLE = "MQAR recall vs. width (mqar/l32, 1 head)"
PAPER = "Zoology (Arora et al. 2023), fig. 2"
BAND = ("on mqar/l32: softmax >= 0.95 at widths 64 and 256; at 64 linear, performer <= softmax "
        "- 0.15; each gains >= 0.10 from 64 to 256")
SWEEP_METRIC = "accuracy"
MECHANISMS = ("mha", "linear", "performer")
WIDTHS = (64, 256)
SOLVED, GAP, GAIN = 0.95, 0.15, 0.10


def get_config(arg: str | None = None):
  return mqar_recall.get_config(arg)  # its width=64 gives way to the point's width


def get_sweep(arg: str | None = None) -> list[grid.Point]:
  del arg
  return grid.grid({"arg.attention": list(MECHANISMS), "arg.width": list(WIDTHS)})


def check(cells) -> tuple[str, str]:
  narrow, wide = WIDTHS[0], WIDTHS[-1]
  acc = {(a, w): cells.mean("accuracy", attention=a, width=w)
         for a in MECHANISMS for w in WIDTHS}
  detail = "; ".join(f"width {w}: " + ", ".join(
      f"{a} {cells.text('accuracy', attention=a, width=w)}" for a in MECHANISMS)
      for w in WIDTHS)
  if any(math.isnan(v) for v in acc.values()):
    return "incomplete", detail
  ok = all(acc["mha", w] >= SOLVED for w in WIDTHS)
  for a in MECHANISMS[1:]:
    ok &= acc[a, narrow] <= acc["mha", narrow] - GAP and acc[a, wide] >= acc[a, narrow] + GAIN
  return ("pass" if ok else "fail"), detail


def plot(cells):
  """Accuracy vs. width per mechanism (mean and std over seeds), as the paper's fig. 2."""
  from attn import viz

  fig = viz.new_figure(4.8, 3.2)
  ax = fig.subplots()
  for i, attention in enumerate(MECHANISMS):
    stats = [cells.find(attention=attention, width=w) for w in WIDTHS]
    stats = [c.stats.get("accuracy", (math.nan, None, 0)) if c else (math.nan, None, 0)
             for c in stats]
    ax.errorbar(WIDTHS, [m for m, _, _ in stats], yerr=[s or 0 for _, s, _ in stats],
                marker="o", capsize=3, color=f"C{i}", label=attention)
  ax.axhline(SOLVED, color="gray", lw=0.8, ls="--")
  ax.set_xscale("log", base=2)
  ax.set_xticks(WIDTHS, [str(w) for w in WIDTHS])
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("model width (1 head)")
  ax.set_ylabel("recall accuracy (eval)")
  ax.legend(fontsize=8)
  fig.suptitle(TITLE, fontsize=9)
  return fig
