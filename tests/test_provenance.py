"""attn.provenance: the versions and commit that summary.json and benchmark JSON record."""

import pathlib
import subprocess

import flax
import jax
import numpy as np

from attn import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_versions_are_the_imported_ones():
  versions = provenance.versions()
  assert versions["jax"] == jax.__version__
  assert versions["flax"] == flax.__version__
  assert versions["numpy"] == np.__version__
  assert provenance.versions(("jax", "not-a-package"))["not-a-package"] is None


def test_commit_is_head_of_this_checkout():
  record = provenance.provenance()
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True)
  if head.returncode != 0:  # An installed copy without .git: nothing to record.
    assert record["commit"] is None
    return
  dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--quiet"]).returncode != 0
  assert record["commit"] == head.stdout.strip() and record["dirty"] == dirty
