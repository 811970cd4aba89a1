# The README's commands. Each bootstraps .venv on first use (idempotent: the stamp file is
# rebuilt only when pyproject.toml or the lock file changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Which lock file to install (requirements/<LOCK>.txt): cpu (the default; also what CI uses),
# tpu (Cloud TPU VMs) or cuda (NVIDIA GPU hosts). Each holds the dev tools too.
LOCK ?= cpu
STAMP := $(VENV)/.installed-$(LOCK)
# pip itself is pinned too, so that a fresh machine next year installs the same way.
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# Parallel test workers; 2 matches the CI machine. Override: make test JOBS=8.
JOBS ?= 2

.PHONY: venv train test test-all test-minimums bench bench-train bench-decode reproduce lint lock clean

# Exact versions from the lock, then the package itself without resolving anything again.
$(STAMP): pyproject.toml requirements/$(LOCK).txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet -r requirements/$(LOCK).txt
	$(PY) -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Only the environment, e.g. `make venv LOCK=cuda` in a GPU cluster's shared checkout.
venv: $(STAMP)

train: $(STAMP)
	$(PY) -m experiments.main --config experiments/default.py --workdir runs/default

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) tests

# Installs the lowest versions pyproject.toml allows in a temporary venv and runs a test subset.
test-minimums: $(STAMP)
	$(PY) -m pytest -q -n 0 -m slow tests/test_minimum_versions.py

bench: $(STAMP)
	$(PY) -m experiments.benchmarks.attention

bench-train: $(STAMP)
	$(PY) -m experiments.benchmarks.train

bench-decode: $(STAMP)
	$(PY) -m experiments.benchmarks.decode

# The README's reproductions (experiments/reproductions/): SEEDS=3 for mean +- std.
SEEDS ?= 1
reproduce: $(STAMP)
	$(PY) -m experiments.reproduce --seeds $(SEEDS) --workdir runs/reproduce

lint: $(STAMP)
	$(PY) -m ruff check attn experiments launch tests

# Recompiles requirements/*.txt after a pyproject.toml change, keeping every pin it can (uv is
# installed into .venv-lock for this). `make lock UPGRADE=--upgrade` moves to the newest releases.
LOCK_PY := .venv-lock/bin/python
lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && \
	  $(LOCK_PY) -m pip install --quiet uv==$(UV_VERSION))
	for lock in cpu tpu cuda; do \
	  extras="--extra dev"; [ $$lock = cpu ] || extras="$$extras --extra $$lock"; \
	  .venv-lock/bin/uv pip compile --quiet pyproject.toml $$extras --universal \
	    --python-version 3.11 --custom-compile-command "make lock" $(UPGRADE) \
	    -o requirements/$$lock.txt || exit 1; \
	done

clean:
	rm -rf $(VENV) .venv-lock runs
