"""experiments.reproduce: a fake claim of two 4-step points runs, is skipped on rerun, resumes
from a checkpoint, and is reported with pass / fail against its band; each real claim's check
on hand-made numbers; `slow`: each real claim at its smallest setting inside its band."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest

from experiments import reproduce
from launch import sweep

FAKE_CLAIM = textwrap.dedent('''
    """A fake claim for the runner's test: RMSNorm and LayerNorm both end with a finite loss
    below {bound} after 4 steps of the norm ablation's runlocal config."""
    import math
    import os

    from experiments import norm_ablation
    from launch import grid

    ORDER = 1
    PAPER = "none (test)"
    CLAIM = "both norms train"
    BAND = "loss < {bound}"
    SWEEP_METRIC = "loss"


    def get_config(arg=None):
      config = norm_ablation.get_config("runlocal" + (f",{{arg}}" if arg else ""))
      config.train.checkpoint_every = 2
      return config


    def get_sweep(arg=None):
      return grid.grid({{"arg.norm": ["layernorm", "rmsnorm"]}})


    def measure(run_dir):
      with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {{"train_records": sum('"train"' in line for line in f)}}


    def check(cells):
      losses = [cells.mean("loss", norm=n) for n in ("layernorm", "rmsnorm")]
      if any(math.isnan(v) for v in losses):
        return "incomplete", "missing"
      return ("pass" if max(losses) < {bound} else "fail"), f"max loss {{max(losses):.3f}}"
''')


@pytest.fixture
def child_env(monkeypatch):
  cache = os.path.join(tempfile.gettempdir(), f"attn-tests-jax-cache-{os.getuid()}")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one device per run, not the tests' eight


def _write_claim(directory, name, bound):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{name}.py"), "w") as f:
    f.write(FAKE_CLAIM.format(bound=bound))


def test_runner_runs_skips_resumes_and_reports(tmp_path, child_env, capsys):
  claims, work = str(tmp_path / "claims"), str(tmp_path / "work")
  _write_claim(claims, "trains", bound=100.0)  # a byte LM starts at ~ln(259) = 5.6 nats
  _write_claim(claims, "too_good", bound=0.01)  # same runs, a band they cannot meet
  argv = ["--claims_dir", claims, "--workdir", work, "--only", "trains", "--parallel", "2"]

  assert reproduce.main(argv) == 0
  out = capsys.readouterr().out
  assert "[trains] [1/2] start norm=layernorm" in out
  with open(os.path.join(work, "results.json")) as f:
    results = json.load(f)
  prov = results["provenance"]
  assert len(prov["commit"]) == 40 and prov["versions"]["jax"] and prov["versions"]["flax"]
  trains = results["claims"]["trains"]
  assert trains["status"] == "pass" and trains["wall_s"] > 0 and trains["plot"] == "trains.png"
  assert trains["measured"] == {"commit": prov["commit"], "written": results["written"]}
  assert trains["run_commits"] == [prov["commit"]]  # each run's summary.json provenance
  losses = {c["point"]["norm"]: c["stats"]["loss"] for c in trains["cells"]}
  assert sorted(losses) == ["layernorm", "rmsnorm"]
  for mean, std, n in losses.values():  # one seed: no std
    assert 0 < mean < 100 and std is None and n == 1
  # measure(): computed once per finished run, cached beside it, reported with the metrics.
  for cell in trains["cells"]:
    run_dir = os.path.join(work, "trains", f"norm={cell['point']['norm']}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      records = sum('"train"' in line for line in f)
    assert records > 0 and cell["stats"]["train_records"] == [records, None, 1]
    with open(os.path.join(run_dir, reproduce.MEASURES_FILE)) as f:
      assert json.load(f)["measures"] == {"train_records": records}
  assert results["claims"]["too_good"]["status"] == "not run"
  with open(os.path.join(work, "trains.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"
  with open(os.path.join(work, "results.md")) as f:
    table = f.read()
  assert "| trains | none (test) | loss < 100.0 | **pass** |" in table
  assert "| too_good | none (test) | loss < 0.01 | **not run** |" in table

  # A rerun starts nothing; the verdict comes from the same numbers.
  assert reproduce.main(argv) == 0
  out = capsys.readouterr().out
  assert "[trains] 2 finished run(s) skipped; 0 to run." in out and "start" not in out

  # A run killed after its step-2 checkpoint (no step 4, no summary) resumes there.
  run_dir = os.path.join(work, "trains", "norm=rmsnorm")
  os.remove(os.path.join(run_dir, "summary.json"))
  shutil.rmtree(os.path.join(run_dir, "checkpoints", "4"))
  assert reproduce.main(argv) == 0
  out = capsys.readouterr().out
  assert "1 finished run(s) skipped; 1 to run." in out and "start norm=rmsnorm" in out
  with open(os.path.join(run_dir, "log.txt")) as f:
    log = f.read()
  assert "new run" in log and "resuming at step 2" in log
  with open(os.path.join(run_dir, "summary.json")) as f:
    assert json.load(f)["step"] == 4
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:  # the resumed run logged more lines
    records = sum('"train"' in line for line in f)
  with open(os.path.join(run_dir, reproduce.MEASURES_FILE)) as f:  # so it was measured again
    assert json.load(f)["measures"] == {"train_records": records}

  # A --set is checked against every run before any starts: not a field, or a change of the
  # training trajectory of runs that finished (they would count as done without it): refused.
  assert reproduce.main([*argv, "--set", "model.no_such_field=1"]) == 2
  err = capsys.readouterr().err
  assert "Config error: [trains] --set 'model.no_such_field=1': 'model.no_such_field' is not a " \
         "field" in err
  mtime = os.path.getmtime(os.path.join(run_dir, "summary.json"))
  assert reproduce.main([*argv, "--set", "optim.learning_rate=0.5"]) == 2
  err = capsys.readouterr().err
  assert "the run finished at step 4 with another config" in err
  assert "2 finished run(s) with another config; nothing was started." in err
  assert "to train the new config from the start, use another --workdir" in err
  assert os.path.getmtime(os.path.join(run_dir, "summary.json")) == mtime
  assert reproduce.main([*argv, "--set", "train.eval_every=3"]) == 0  # operational: still done
  assert "2 finished run(s) skipped; 0 to run." in capsys.readouterr().out

  # The same runs against a band they miss: fail, a verdict like pass (exit status 0).
  shutil.copytree(os.path.join(work, "trains"), os.path.join(work, "too_good"))
  assert reproduce.main([*argv[:-3], "too_good"]) == 0
  with open(os.path.join(work, "results.json")) as f:
    assert json.load(f)["claims"]["too_good"]["status"] == "fail"
  assert reproduce.main(["--claims_dir", claims, "--workdir", work, "--only", "nope"]) == 2

  # A run that ends without a result (here killed by --timeout before it trains) is no
  # result: the claim is incomplete, exit 1, though its other run finished and alone would pass.
  crash = str(tmp_path / "crash")
  shutil.copytree(os.path.join(work, "trains"), os.path.join(crash, "trains"))
  shutil.rmtree(os.path.join(crash, "trains", "norm=rmsnorm"))
  capsys.readouterr()
  assert reproduce.main(["--claims_dir", claims, "--workdir", crash, "--only", "trains",
                         "--timeout", "0.5"]) == 1
  out = capsys.readouterr().out
  assert "failed norm=rmsnorm" in out and "Incomplete (a run has no result yet): trains" in out
  with open(os.path.join(crash, "results.json")) as f:
    crashed = json.load(f)["claims"]["trains"]
  assert crashed["status"] == "incomplete" and crashed["detail"].endswith(
      "[1 run(s) without a result, 1 of them failed (see their error.json)]")

  # Runs gone from the workdir (another session's): the report keeps the claims' entries,
  # stamped with when they were measured; runs present again replace them.
  with open(os.path.join(work, "results.json")) as f:
    before = json.load(f)
  shutil.move(os.path.join(work, "trains"), str(tmp_path / "elsewhere"))
  assert reproduce.main([*argv, "--report"]) == 0
  with open(os.path.join(work, "results.json")) as f:
    after = json.load(f)
  assert after["claims"]["trains"] == before["claims"]["trains"]
  with open(os.path.join(work, "results.md")) as f:
    table = f.read()
  stamp = f"{before['written'][:10]}, `{before['provenance']['commit'][:7]}`"
  assert "| trains | none (test) | loss < 100.0 | **pass** |" in table and stamp in table
  # Another machine's results.json, written later: its entry is the one reported.
  other = {**before, "written": "2099-01-01T00:00:00"}
  other["claims"] = {"trains": {**before["claims"]["trains"], "detail": "measured elsewhere"}}
  del other["claims"]["trains"]["measured"]
  with open(tmp_path / "other.json", "w") as f:
    json.dump(other, f)
  assert reproduce.main([*argv, "--report", "--merge", str(tmp_path / "other.json")]) == 0
  with open(os.path.join(work, "results.json")) as f:
    merged = json.load(f)["claims"]["trains"]
  assert merged["detail"] == "measured elsewhere" and merged["measured"] == {
      "commit": before["provenance"]["commit"], "written": "2099-01-01T00:00:00"}
  # Merged into a workdir of its own: the merged claim's plot is copied beside its results.md.
  fresh = tmp_path / "fresh"
  shutil.copy(os.path.join(work, "trains.png"), tmp_path / "trains.png")  # beside other.json
  assert reproduce.main(["--claims_dir", claims, "--workdir", str(fresh), "--only", "trains",
                         "--report", "--merge", str(tmp_path / "other.json")]) == 0
  assert "![trains](trains.png)" in (fresh / "results.md").read_text()
  assert (fresh / "trains.png").read_bytes() == (tmp_path / "trains.png").read_bytes()
  assert f"Wrote {fresh / 'results.md'}, results.json" in capsys.readouterr().out
  # A report of claims that were never run, here or in a merged file, gives no verdict: exit 1.
  capsys.readouterr()
  assert reproduce.main(["--claims_dir", claims, "--workdir", str(tmp_path / "empty"),
                         "--report"]) == 1
  assert ("Not run (no runs in {} and none merged): too_good, trains; run them with --only "
          "too_good --only trains".format(tmp_path / "empty")) in capsys.readouterr().out


def _cells(rows):
  """Cells from (point, {metric: mean}, diverged) rows, 1 seed each."""
  return reproduce.Cells(
      reproduce.Cell(point, 1, 0 if diverged else 1,
                     {} if diverged else {k: (v, None, 1) for k, v in metrics.items()},
                     failed=int(diverged), diverged=int(diverged))
      for point, metrics, diverged in rows)


def _claim(name):
  module, _ = reproduce.sweep.load_experiment(reproduce.claim_files()[name])
  return module


def test_cells_lookup_and_missing_values():
  cells = _cells([({"a": 1, "b": "x"}, {"loss": 2.0}, False), ({"a": 2, "b": "x"}, {}, True)])
  assert cells.mean("loss", a=1) == 2.0
  assert math.isnan(cells.mean("loss", a=2)) and math.isnan(cells.mean("loss", a=3))
  assert cells.find(b="x") is None  # ambiguous
  assert cells.find(a=2).failed == 1
  assert cells.text("loss", a=1) == "2.000 (n=1)" and cells.text("loss", a=2) == "-"
  assert cells.text("loss", inf=True, a=2) == "diverged"
  seeds = reproduce.Cells([reproduce.Cell({"a": 1}, 3, 3, {"loss": (2.0, 0.25, 3)})])
  assert seeds.text("loss", a=1) == "2.000 ± 0.250 (n=3)"
  means, detail = cells.compare("loss", {1: "one", 2: "two"}, key="a", prefix="loss: ")
  assert means is None and detail == "loss: one 2.000 (n=1), two -"  # a=2 has no value
  means, detail = cells.compare("loss", {1: "one"}, key="a")
  assert means == {1: 2.0} and detail == "one 2.000 (n=1)"


def test_a_run_without_a_result_makes_the_claim_incomplete():
  """Only a diverged run counts as worse; a crash, a timeout or a missing seed leaves the claim
  without a verdict, whatever the runs that finished say."""
  check = _claim("layernorm_batchnorm").check
  ln = reproduce.Cell({"norm": "layernorm"}, 1, 1, {"loss": (2.0, None, 1)})
  diverged = reproduce.Cell({"norm": "batchnorm"}, 1, 0, {}, failed=1, diverged=1)
  assert reproduce.verdict(check, reproduce.Cells([ln, diverged])) == (
      "pass", "layernorm 2.000 (n=1), batchnorm diverged")
  crashed = reproduce.Cell({"norm": "batchnorm"}, 1, 0, {}, failed=1)
  assert not crashed.all_diverged
  status, detail = reproduce.verdict(check, reproduce.Cells([ln, crashed]))
  assert status == "incomplete" and detail == (
      "layernorm 2.000 (n=1), batchnorm - [1 run(s) without a result, 1 of them failed (see "
      "their error.json)]")
  # Two of three seeds finished (one pending): the check passes on them, the verdict waits.
  two_of_three = reproduce.Cell({"norm": "batchnorm"}, 3, 2, {"loss": (2.5, 0.1, 2)})
  assert check(reproduce.Cells([ln, two_of_three]))[0] == "pass"
  assert reproduce.verdict(check, reproduce.Cells([ln, two_of_three])) == (
      "incomplete", "layernorm 2.000 (n=1), batchnorm 2.500 ± 0.100 (n=2) [1 run(s) without a "
      "result]")


def _mqar(mha, linear, local):
  return _cells([({"attention": a}, {"accuracy": v}, False)
                 for a, v in (("mha", mha), ("linear", linear), ("local", local))])


def test_mqar_band():
  check = _claim("mqar_recall").check
  assert check(_mqar(0.99, 0.7, 0.6))[0] == "pass"
  assert check(_mqar(0.90, 0.4, 0.6))[0] == "fail"  # softmax < 0.95
  assert check(_mqar(0.99, 0.9, 0.6))[0] == "fail"  # linear recalls too
  assert check(_mqar(0.99, 0.7, 0.96))[0] == "fail"  # local recalls too
  assert check(_mqar(math.nan, 0.7, 0.6))[0] == "incomplete"
  gdn = _claim("gdn_recall").check
  pair = lambda g, lin: _cells([({"attention": "gated_deltanet"}, {"accuracy": g}, False),  # noqa: E731
                                ({"attention": "linear"}, {"accuracy": lin}, False)])
  assert gdn(pair(0.9, 0.5))[0] == "pass" and gdn(pair(0.6, 0.5))[0] == "fail"



def test_mqar_width_band():
  check = _claim("mqar_width").check

  def cells(**acc):
    base = {"mha64": 0.99, "mha256": 0.99, "linear64": 0.25, "linear256": 0.5,
            "performer64": 0.3, "performer256": 0.45, **acc}
    return _cells([({"attention": k.rstrip("0123456789"), "width": int(k[-3:].lstrip("ar"))},
                    {"accuracy": v}, False) for k, v in base.items()])

  assert check(cells()) == ("pass", "width 64: mha 0.990 (n=1), linear 0.250 (n=1), performer "
                                    "0.300 (n=1); width 256: mha 0.990 (n=1), linear 0.500 "
                                    "(n=1), performer 0.450 (n=1)")
  assert check(cells(mha256=0.9))[0] == "fail"  # softmax must recall at every width
  assert check(cells(linear64=0.9))[0] == "fail"  # linear recalls at 64 already
  assert check(cells(performer256=0.35))[0] == "fail"  # performer gains 0.05 < 0.10
  assert check(cells(linear256=math.nan))[0] == "incomplete"


def test_mqar_width_performer_at_width_256_trains_through_the_command_line(tmp_path,
                                                                          child_env):
  """The claim's Performer point at width 256 (head dimension 256) diverged at step 7 of its
  first run: with one key constant for all positions, a causal row that sees only large-norm
  keys had a zero normalizer and NaN gradients (attn.ops.performer.performer_attention). Ten
  steps of that point through experiments.main, warmup shortened so the learning rate is high
  by step 7, train with a finite loss."""
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config",
       "experiments/reproductions/mqar_width.py:attention=performer,width=256",
       "--workdir", str(tmp_path), "--config.train.num_steps=10",
       "--config.optim.warmup_steps=2", "--config.train.eval_every=10",
       "--config.train.progress_bar=False"],
      cwd=sweep.REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert summary["step"] == 10 and math.isfinite(summary["metrics"]["loss"])


def test_prenorm_postnorm_band_counts_divergence_as_worse():
  check = _claim("prenorm_postnorm").check

  def cells(cold_post, warm_post, diverged=False):
    return _cells([({"warmup": False, "place": "pre"}, {"loss": 2.0}, False),
                   ({"warmup": False, "place": "post"}, {"loss": cold_post}, diverged),
                   ({"warmup": True, "place": "pre"}, {"loss": 1.9}, False),
                   ({"warmup": True, "place": "post"}, {"loss": warm_post}, False)])

  assert check(cells(2.5, 1.95))[0] == "pass"
  assert check(cells(0.0, 1.95, diverged=True))[0] == "pass"
  assert check(cells(2.05, 1.95))[0] == "fail"  # gap 0.05 < 0.10
  assert check(cells(2.5, 2.3))[0] == "fail"  # warmup does not close it


def test_other_bands():
  ln_bn = _claim("layernorm_batchnorm").check
  norm = lambda bn, failed=False: _cells([({"norm": "layernorm"}, {"loss": 2.0}, False),  # noqa: E731
                                          ({"norm": "batchnorm"}, {"loss": bn}, failed)])
  assert ln_bn(norm(2.1))[0] == "pass" and ln_bn(norm(2.01))[0] == "fail"
  assert ln_bn(norm(0.0, failed=True))[0] == "pass"  # diverged: worse than any loss
  listops = _claim("listops").check
  assert listops(_cells([({"attention": "mha"}, {"accuracy": 0.37}, False)]))[0] == "pass"
  assert listops(_cells([({"attention": "mha"}, {"accuracy": 0.17}, False)]))[0] == "fail"
  mech = _claim("mechanisms_lm")
  good = {"mha": 2.0, "sinks": 2.05, "sigmoid": 2.1, "cosine": 2.0, "local": 2.2, "linear": 2.4,
          "performer": 2.5}
  rows = lambda d: _cells([({"attention": k}, {"bits_per_byte": v}, False)  # noqa: E731
                           for k, v in d.items()])
  assert mech.check(rows(good))[0] == "pass"
  assert mech.check(rows({**good, "linear": 2.05}))[0] == "fail"
  assert mech.check(rows({**good, "cosine": 2.5}))[0] == "fail"


def test_map_claims_bands():
  sink = _claim("gated_sink").check
  rows = lambda metric, soft, other, name: _cells([  # noqa: E731
      ({"attention": "mha"}, {metric: soft}, False), ({"attention": name}, {metric: other}, False)])
  assert sink(rows("first_token_mass", 0.30, 0.10, "gated"))[0] == "pass"
  assert sink(rows("first_token_mass", 0.30, 0.20, "gated"))[0] == "fail"  # 0.67 x softmax
  assert sink(rows("first_token_mass", 0.30, math.nan, "gated"))[0] == "incomplete"
  sparse = _claim("differential_sparsity").check
  assert sparse(rows("top8_share", 0.80, 0.92, "differential"))[0] == "pass"  # noise 0.08 / 0.2
  assert sparse(rows("top8_share", 0.80, 0.85, "differential"))[0] == "fail"  # noise 0.15 / 0.2


def _brute_force_measures(weights, segments, k, min_keys):
  """float64 loops over every (layer, row, head, query) of the maps."""
  first, share = [], []
  n_layers, n_rows, n_heads, length, _ = weights.shape
  for b in range(n_rows):
    for t in range(length):
      if segments[b, t] == 0:
        continue
      start = t
      while start > 0 and segments[b, start - 1] == segments[b, t]:
        start -= 1
      for layer in range(n_layers):
        for h in range(n_heads):
          row = np.abs(weights[layer, b, h, t, start:t + 1].astype(np.float64))
          if t - start + 1 >= 2:
            first.append(weights[layer, b, h, t, start])
          if t - start + 1 >= min_keys:
            share.append(np.sort(row)[::-1][:k].sum() / row.sum())
  return np.mean(first), np.mean(share)


def test_map_measures_against_loops():
  from experiments.reproductions import _maps

  rng = np.random.default_rng(0)
  segments = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])  # packed row; padded row
  length = segments.shape[1]
  logits = rng.normal(size=(2, 2, 3, length, length))
  same = (segments[:, :, None] == segments[:, None, :]) & np.tril(np.ones((length, length), bool))
  weights = np.where(same[None, :, None], np.exp(logits), 0.0)
  weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-30)
  weights[1] -= 0.3 * np.roll(weights[1], 1, axis=-1) * same[:, None]  # signed, like differential
  first, share = _brute_force_measures(weights, segments, k=3, min_keys=4)
  np.testing.assert_allclose(_maps.first_token_mass(weights, segments), first, rtol=1e-12)
  np.testing.assert_allclose(_maps.top_k_share(weights, segments, k=3, min_keys=4), share,
                             rtol=1e-12)


# Claims measured outside their band here (README "Reproductions", the files' `Found:`); they stay
# in the suite so that a fix shows up as XPASS.
MEASURED_OUTSIDE_BAND = {
    "mechanisms_lm": "sigmoid trails softmax by 0.20 bits/byte after 300 steps at 3 seeds "
                     "(band 0.15)",
    "gated_sink": "the 2-layer softmax LM has no first-token sink to remove (mass 0.011 at "
                  "3 seeds)",
    "mqar_width": "softmax does not learn recall at width 256 at the budget's lr 3e-3 (0.228 at 3 "
                  "seeds; 1.000 at lr 1e-3), and Performer gains 0.013 from width 64 to 256",
    "differential_sparsity": "differential's maps hold no more of their absolute mass in the top 8 "
                             "keys than softmax's (0.659 vs 0.696 at 3 seeds)",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=MEASURED_OUTSIDE_BAND[n], strict=False))
    if n in MEASURED_OUTSIDE_BAND else n for n in reproduce.claim_files()])
def test_claim_reproduces_at_its_smallest_setting(name, tmp_path, child_env):
  """The claim's own budget, 1 seed: inside its band (minutes to an hour on a 2-core CPU)."""
  workdir = str(tmp_path / "reproduce")
  reproduce.main(["--only", name, "--workdir", workdir])
  with open(os.path.join(workdir, "results.json")) as f:
    claim = json.load(f)["claims"][name]
  assert claim["status"] == "pass", claim["detail"]


def test_claim_text_comes_from_the_docstring():
  doc = "Title.\n\nClaim:    a b\n          c.\nPaper:    X 2020.\n"
  assert reproduce.docstring_field(doc, "Claim") == "a b c."
  assert reproduce.docstring_field(doc, "Paper") == "X 2020."
  for name in reproduce.claim_files():
    module = _claim(name)
    assert reproduce.docstring_field(module.__doc__, "Claim"), name
    assert "Stated before" in reproduce.docstring_field(module.__doc__, "Band"), name


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0"], "--seeds must be > 0, got 0"),
    (["--parallel", "0"], "--parallel must be > 0, got 0"),
    (["--timeout", "-1"], "--timeout must be > 0, got -1"),
    (["--merge", "/nonexistent/results.json"], "no such file"),
    (["--merge", "{bad}"], "not JSON"),
    (["--merge", "{empty}"], "not a results.json of experiments.reproduce"),
    (["--merge", "{dir}"], "cannot be read"),
    (["--merge", "{entry}"], "claims.mqar_recall is not a claim's entry (missing band, cells, "),
])
def test_bad_arguments_are_refused_before_anything_runs(args, message, tmp_path, capsys):
  (tmp_path / "bad.json").write_text("{not json")
  (tmp_path / "empty.json").write_text("{}")
  (tmp_path / "entry.json").write_text(json.dumps({
      "written": "2026-12-05T00:00:00", "provenance": {"commit": "abc"},
      "claims": {"mqar_recall": {"paper": "Zoology", "status": "pass"}}}))
  args = [a.format(bad=tmp_path / "bad.json", empty=tmp_path / "empty.json", dir=tmp_path,
                   entry=tmp_path / "entry.json") for a in args]
  with pytest.raises(SystemExit) as exit_info:
    reproduce.main(["--workdir", str(tmp_path / "work"), *args])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("name", [n for n in reproduce.claim_files()
                                  if hasattr(_claim(n), "plot")])
def test_a_claims_plot_draws_a_partial_sweep_without_warnings(name):
  """The report plots a claim as soon as one run finished: one variant with a number, the
  others pending, no run directories to read."""
  import matplotlib

  matplotlib.use("Agg")
  module = _claim(name)
  points = {run.variant: {k.removeprefix("arg."): v for k, v in run.point.items()
                          if k != "seed"}
            for run in reproduce.sweep.plan(reproduce.claim_files()[name])}
  first, *rest = points.values()
  cells = reproduce.Cells(
      [reproduce.Cell(first, 1, 1, {module.SWEEP_METRIC: (1.0, None, 1)})]
      + [reproduce.Cell(point, 1, 0, {}) for point in rest])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fig = module.plot(cells)
  assert fig.axes
