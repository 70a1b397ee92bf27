# `make demo` and `make test` each create .venv on first use and install what they need; `make test` runs
# `make lint` (ruff, configured in pyproject.toml) before the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --constraint constraints.txt
STAMP := $(VENV)/.installed
# checks that torchvision's compiled ops load against the installed torch
TORCH_PAIR_CHECK := import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PY) -c "$(TORCH_PAIR_CHECK)" || $(PIP) --force-reinstall --no-deps torch torchvision
	$(PY) -c "$(TORCH_PAIR_CHECK)"
	$(PIP) -e ".[dev]"
	$(PY) -c "$(TORCH_PAIR_CHECK)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bam-models demo --overwrite

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -n 2 --durations=15

# the suite without the tests marked slow (subprocesses, torch.compile, the demo, the GPU check)
test-fast: lint
	$(PY) -m pytest -n 2 -m "not slow"

clean:
	rm -rf $(VENV) build dist *.egg-info
