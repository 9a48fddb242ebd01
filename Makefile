# Every target creates .venv and installs the suite first if needed, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: help install train test test-all test-gpu bench bench-quality lint clean

help:
	@echo "make train [ARGS='model=nerf trainer.devices=2']   train (default task unless ARGS says otherwise)"
	@echo "make test  [ARGS='-k resume']                     fast test suite (no slow, no GPU tests)"
	@echo "make test-all                                      every test but GPU ones, slow ones included"
	@echo "make test-gpu                                      GPU tests (needs CUDA)"
	@echo "make bench [ARGS='--tasks diffusion']              throughput/memory table (tiny on CPU)"
	@echo "make bench-quality [ARGS='--tasks nerf']            time to quality on the real benchmark data"
	@echo "make lint | make clean"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import torch, torchvision.ops, transformers, diffusers, lightning, hydra; print('installed: torch', torch.__version__)"
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) run.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

bench-quality: $(STAMP)
	$(PY) -m bench.quality $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf logs outputs multirun .pytest_cache bench_out
