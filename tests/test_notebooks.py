"""Every notebook in notebooks/ runs headless, top to bottom, at its small size, on CPU.

Each runs in its own Jupyter kernel (a separate process): the parameters cell is replaced by
`SIZE = "small"`, JAX is pinned to one CPU device and compilations go to a persistent cache
shared with the other tests. The stored outputs (of the size each notebook is saved with) are
cleared first.
"""

import os
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "notebooks")
NOTEBOOKS = sorted(n for n in os.listdir(NOTEBOOKS_DIR) if n.endswith(".ipynb"))
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"attn-tests-jax-cache-{os.getuid()}")
CELL_TIMEOUT_S = 300


def test_the_four_notebooks_exist():
  assert NOTEBOOKS == ["ablation_results.ipynb", "attention_from_scratch.ipynb",
                       "attention_maps.ipynb", "tpu_quickstart.ipynb"]


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
  env = {
      "JAX_PLATFORMS": "cpu",
      # conftest.py asks for 8 CPU devices; one compiles faster and is what a CPU runtime has.
      "XLA_FLAGS": "",
      "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      # Embedded datasets are prepared here (about a second each) instead of in ~/.cache.
      "ATTN_DATA_DIR": str(tmp_path_factory.mktemp("notebook_data")),
      "TQDM_DISABLE": "1",
  }
  return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name: str, kernel_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
  with open(os.path.join(NOTEBOOKS_DIR, name)) as f:
    nb = nbformat.read(f, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  # Stored with the outputs of a full-size run (they read on a web page); rerun here from scratch.
  for cell in code:
    cell.outputs, cell.execution_count = [], None
  parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(parameters) == 1 and parameters[0].source.startswith("SIZE = ")
  parameters[0].source = 'SIZE = "small"'

  for key, value in kernel_env.items():  # the kernel process inherits this environment
    monkeypatch.setenv(key, value)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOKS_DIR}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure

  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, f"{name} showed no figure"
