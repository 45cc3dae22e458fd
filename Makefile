# One-command entry points (see README). Every target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision must be a matching pair; override on other platforms, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test mini-study paper-figures clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,notebooks]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

# The main job on the built-in data: feature net -> diffusion pretraining -> AYT tuning -> samples.
demo: setup
	$(PY) -m ayt demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
