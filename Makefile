# dynoswap: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
# Test processes (pytest-xdist): one per core here, each on one thread.
JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS)

.PHONY: install demo test test-fast sweep bench lint experiment study-nd clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dynoswap convert resnet50 --input-size 224 224 -o out/resnet50-dynopool --force
	$(VENV)/bin/dynoswap inspect out/resnet50-dynopool

SWEEPS := tests/test_engine_sweep.py tests/test_train_sweep.py

test: install
	$(PYTEST) -m "not slow" $(addprefix --ignore=,$(SWEEPS))

# The broad model sweep (every torchvision classifier/segmenter, one timm model per family), the
# training robustness sweep (10 CNN families trained briefly with a lambda and with a budget), the
# 1-D and video models (torchvision's video models, the zoo's m5, resnet1d and video-tiny; also in
# make test) and every other test marked slow (the README's long blocks, the ResNet-50 detectors,
# long layer properties).
sweep: install
	$(PYTEST) $(SWEEPS) tests/test_engine_nd.py
	$(PYTEST) -m slow $(addprefix --ignore=,$(SWEEPS))

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check dynoswap tests bench studies
	$(VENV)/bin/ruff format --check dynoswap tests bench studies
	$(VENV)/bin/mypy

experiment: install
	$(PY) -m dynoswap.experiment --out docs/experiment

study-nd: install
	$(PY) -m studies.rates_nd --out docs/experiment

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
