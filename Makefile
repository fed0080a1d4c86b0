# `make test` and `make demo` bootstrap everything on a fresh machine: they create .venv if it is
# missing, put a CPU build of torch in it (the local wheel, torch==2.13.0) unless one is already
# importable, install the project with its dev extras, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stablespike-installed
TORCH_WHEEL := torch==2.13.0

.PHONY: test demo bench docs docs-serve install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "torch found in $(PYTHON): the venv will see it"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_WHEEL)
	$(PY) -m pip install -q -e ".[dev,docs]"
	@# the peers' monitors are test oracles: spikingjelly and norse declare torchvision/torchaudio,
	@# which would pull a CUDA torch, so they go in without dependencies, then what they import
	$(PY) -m pip install -q --no-deps spikingjelly==2.0.0 norse==1.1.0
	$(PY) -m pip install -q loguru tensorboard nir nirtorch lightning
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) examples/demo.py
	$(VENV)/bin/stablespike bench depth-scaling --preset quick --no-progress --out_dir runs/demo
	@echo "--- the cure for the deep nets above: calibrated init + a wide surrogate (slope 1) ---"
	$(VENV)/bin/stablespike bench depth-scaling --preset quick --depths 10 --seeds 0 --inits calibrated \
	  --surrogate_slope 1 --jobs 2 --no-progress --out_dir runs/demo_cure

# the documentation site into build/site; --strict: a broken link or a missing example fails it
# (not with --quiet: mkdocs 1.6 then stops counting the warnings and exits 0)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: $(STAMP)
	$(PY) benchmarks/lyapunov_overhead.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
