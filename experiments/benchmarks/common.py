"""What the benchmark scripts share: the --out flag and where results go.

Defined once here so that the scripts can be imported side by side (absl flags are global).
"""

import json
import pathlib
from typing import Any

import jax
from absl import flags

from attn import provenance

RESULTS_DIR = pathlib.Path(__file__).parent / "results"

OUT = flags.DEFINE_string("out", "", "JSON path (default: results/<benchmark>_<device>.json).")
MECHANISMS = flags.DEFINE_list("mechanisms", None, "Registry mechanisms (model.attention values) "
                               "to measure; default: every one the benchmark applies to.")
QUICK = flags.DEFINE_boolean("quick", False, "Smoke run: the benchmark's QUICK flag values "
                             "(flags given explicitly win); results/<benchmark>_quick_<device>.")


def apply_quick(values: dict[str, Any]) -> None:
  """--quick: set the flags in `values` that were not given on the command line."""
  for name, value in values.items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value


def device_name() -> str:
  """The first device's kind, lower case with underscores ('cpu', 'nvidia_h100_80gb_hbm3')."""
  return jax.devices()[0].device_kind.replace(" ", "_").lower()


def write_json(result: dict[str, Any], prefix: str) -> pathlib.Path:
  """Writes `result` (plus package versions and git commit) to --out or
  results/<prefix>_<device>.json; returns the path."""
  result = {**result, "provenance": provenance.provenance()}
  path = pathlib.Path(OUT.value or RESULTS_DIR / f"{prefix}_{device_name()}.json")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=float) + "\n")
  return path
