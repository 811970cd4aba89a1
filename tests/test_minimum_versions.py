"""The minimums in pyproject.toml are true: install exactly them in a fresh venv, run a subset.

Slow (a fresh install from PyPI, a few minutes) and needs PyPI: `make test-minimums`.
Each `name>=X` in `dependencies` and the `dev` extra becomes `name==X` in a constraints file;
packages without a minimum resolve to the newest release that fits.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Ops, layers, the optimizer, checkpoints and one trainer run: every declared minimum is used.
SUBSET = ["tests/ops/test_masks.py", "tests/layers/test_norms.py",
          "tests/train/test_optimizer.py", "tests/train/test_checkpoint.py",
          "tests/train/test_trainer.py"]


def minimum_pins(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
  """`name==X` for every `name>=X` among the core and dev requirements."""
  project = tomllib.loads(pyproject.read_text())["project"]
  pins = []
  for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
    req = Requirement(line)
    lows = [s.version for s in req.specifier if s.operator == ">="]
    if lows:
      pins.append(f"{req.name}=={lows[0]}")
  return pins


def test_minimum_pins_read_pyproject():
  pins = minimum_pins()
  assert "jax==0.7.1" in pins and "orbax-checkpoint==0.11.30" in pins
  assert all("[" not in p for p in pins)


@pytest.mark.slow
def test_lowest_allowed_versions_pass_a_subset(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = str(venv / "bin" / "python")
  constraints = tmp_path / "minimums.txt"
  constraints.write_text("\n".join(minimum_pins()) + "\n")
  subprocess.run([py, "-m", "pip", "install", "-q", "-c", str(constraints), "-e", f"{ROOT}[dev]"],
                 check=True)
  result = subprocess.run([py, "-m", "pytest", "-q", "-x", "-n", "2", "-m", "not slow", *SUBSET],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
