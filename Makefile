# Every target creates .venv and installs the suite first if needed, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: help install lock train test test-all test-gpu bench bench-quality lint clean

help:
	@echo "make train [ARGS='model=nerf trainer.devices=2']   train (default task unless ARGS says otherwise)"
	@echo "make test  [ARGS='-k resume']                     fast test suite (no slow, no GPU tests)"
	@echo "make test-all                                      every test but GPU ones, slow ones included"
	@echo "make test-gpu                                      GPU tests (needs CUDA)"
	@echo "make bench [ARGS='--tasks diffusion']              throughput/memory table (tiny on CPU)"
	@echo "make bench-quality [ARGS='--tasks nerf']            time to quality on the real benchmark data"
	@echo "make lock                                         refresh requirements.lock after editing pyproject.toml"
	@echo "make lint | make clean"

# Installs exactly what requirements.lock names, each file checked against its hash; the suite itself
# goes in editable on top, without resolving anything again.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
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

# The lock is resolved for Python 3.11 on Linux x86_64. The empty PIP_FIND_LINKS keeps a local CPU-only
# torch wheel out of the resolution; a machine's pip constraints (a torch cap) apply when present.
LOCK_CONSTRAINTS := $(wildcard /etc/xdg/pip/constraints.txt)
lock: $(STAMP)
	PIP_FIND_LINKS= CUSTOM_COMPILE_COMMAND="make lock" $(PY) -m piptools compile --quiet --rebuild --generate-hashes --allow-unsafe \
	  --strip-extras --no-emit-index-url --no-emit-find-links --extra dev \
	  $(if $(LOCK_CONSTRAINTS),--constraint $(LOCK_CONSTRAINTS)) --output-file requirements.lock pyproject.toml

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf logs outputs multirun compile_cache .pytest_cache bench_out
