"""launch.report on hand-made run directories: mean / std math, CSV, markdown, plots."""

import csv
import json
import math
import os

import pytest

from launch import report


def _write_sweep(root, runs):
  """runs: (name, variant, seed, summary metrics or None, error or None, train losses)."""
  plan = {"config": "experiments/x.py", "metric": "loss", "runs": []}
  for name, variant, seed, metrics, error, curve in runs:
    plan["runs"].append({"name": name, "variant": variant, "seed": seed,
                         "overrides": {"arg.norm": variant.split("=")[1], "seed": seed}})
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    if metrics is not None:
      with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"step": 4, "metrics": metrics, "train_loss": metrics["loss"] + 0.5,
                   "tokens_per_second": 100.0}, f)
    if error is not None:
      with open(os.path.join(run_dir, "error.json"), "w") as f:
        json.dump({"returncode": 1, "error": error}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      for step, loss in enumerate(curve, 1):
        f.write(json.dumps({"step": step, "split": "train", "loss": loss}) + "\n")
      if metrics is not None:
        f.write(json.dumps({"step": len(curve), "split": "eval", **metrics}) + "\n")
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump(plan, f)


def test_mean_std_is_the_sample_std():
  mean, std, n = report.mean_std([1.0, 2.0, 3.0])
  assert (mean, n) == (2.0, 3)
  assert std == pytest.approx(1.0)  # sqrt(((1-2)^2 + 0 + (3-2)^2) / (3 - 1))
  assert report.mean_std([5.0]) == (5.0, None, 1)
  mean, std, n = report.mean_std([])
  assert math.isnan(mean) and std is None and n == 0
  assert report.mean_std([1.0, float("nan"), 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))


def test_direction():
  assert report.direction("loss") == "min"
  assert report.direction("bits_per_byte") == "min"
  assert report.direction("accuracy") == "max"
  assert report.direction("chrf") == "max"


def test_report_files_from_known_runs(tmp_path):
  root = str(tmp_path)
  _write_sweep(root, [
    ("norm=a,seed=0", "norm=a", 0, {"loss": 2.0, "accuracy": 0.5}, None, [4.0, 3.0]),
    ("norm=a,seed=1", "norm=a", 1, {"loss": 4.0, "accuracy": 0.3}, None, [5.0, 4.0]),
    ("norm=b,seed=0", "norm=b", 0, {"loss": 1.0, "accuracy": 0.6}, None, [3.0, 2.0]),
    ("norm=b,seed=1", "norm=b", 1, None, "ValueError: model.norm='b' is not one of", [3.0]),
    ("norm=c,seed=0", "norm=c", 0, None, None, []),
  ])
  text = report.write_report(root)

  results = report.collect(root)
  variants = report.aggregate(results, ["loss", "accuracy"])
  by_name = {v.variant: v for v in variants}
  assert by_name["norm=a"].stats["loss"] == (3.0, pytest.approx(math.sqrt(2)), 2)
  assert by_name["norm=b"].stats["loss"] == (1.0, None, 1)
  assert (by_name["norm=b"].done, by_name["norm=b"].runs) == (1, 2)
  assert by_name["norm=c"].stats["loss"][2] == 0
  assert report.best_variant(variants, "loss") == "norm=b"
  assert report.best_variant(variants, "accuracy") == "norm=b"

  with open(os.path.join(root, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == ["norm=a,seed=0", "norm=a,seed=1", "norm=b,seed=0",
                                       "norm=b,seed=1", "norm=c,seed=0"]
  assert [r["status"] for r in rows] == ["done", "done", "done", "failed", "pending"]
  assert float(rows[1]["loss"]) == 4.0 and float(rows[1]["train_loss"]) == 4.5
  assert rows[3]["error"].startswith("ValueError")
  assert rows[0]["arg.norm"] == "a"

  with open(os.path.join(root, "results.md")) as f:
    assert f.read() == text
  lines = text.splitlines()
  header = next(line for line in lines if line.startswith("| variant"))
  assert header == "| variant | runs | loss | accuracy | train_loss | tokens_per_second |"
  table = [line for line in lines if line.startswith("| `")]
  # Best first (lowest loss), marked, its cells bold; pending variants last.
  assert table[0].startswith("| `norm=b` (best) | 1/2 | **1** | **0.6** |")
  assert table[1].startswith("| `norm=a` | 2/2 | 3 ± 1.4 | 0.4 ± 0.14 |")
  assert table[2].startswith("| `norm=c` | 0/1 | - |")
  assert "- `norm=b,seed=1`: ValueError" in text
  assert "Runs: 3 done, 1 failed, 1 pending." in text
  for png in ("final_loss.png", "curves_loss.png"):
    with open(os.path.join(root, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metric_choice_ranks_by_it(tmp_path):
  root = str(tmp_path)
  _write_sweep(root, [
    ("norm=a,seed=0", "norm=a", 0, {"loss": 2.0, "accuracy": 0.9}, None, [3.0]),
    ("norm=b,seed=0", "norm=b", 0, {"loss": 1.0, "accuracy": 0.6}, None, [3.0]),
  ])
  text = report.write_report(root, metric="accuracy")
  assert "| `norm=a` (best) |" in text
  assert "| variant | runs | accuracy | loss |" in text
  assert os.path.exists(os.path.join(root, "final_accuracy.png"))
