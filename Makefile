# One-command entry points (see README). Every target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision must be a matching pair; override on other platforms, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test mini-study figures paper clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,notebooks,tensorboard]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

# The main job on the built-in data: feature net -> diffusion pretraining -> AYT tuning -> samples.
demo: setup
	$(PY) -m ayt demo

test: setup
	$(PY) -m pytest -q

# The CPU mini study v2 (docs/mini-study.md; measured: about 6.5 h for the shapes and 4.2 h for the photos on
# 2 cores, resumable), then every figure
# from its run directories, with the summaries the README quotes (figures/mini-study.json, figures/tangent-study.json).
# Only `figures` writes into figures/ (notebooks default to runs/notebooks/).
# STUDY_FLAGS=--family adds the authors' family arms (docs/mini-study.md section 7).
STUDY_ROOT ?= runs/study
STUDY_FLAGS ?=
mini-study: setup
	$(PY) -m ayt study --run-root $(STUDY_ROOT) $(STUDY_FLAGS)
	$(MAKE) figures

figures: setup
	$(PY) -m ayt notebook notebooks/01_feature_network.ipynb -p feature_net $(STUDY_ROOT)/shapes/mini-feature-net -p figures_dir figures
	$(PY) -m ayt notebook notebooks/04_tangent_oscillation.ipynb -p study_root $(STUDY_ROOT) -p run_root $(STUDY_ROOT)/disk \
		-p out_dir $(STUDY_ROOT)/tangents -p figures_dir figures
	$(PY) -m ayt notebook notebooks/05_paper_figures.ipynb -p study_root $(STUDY_ROOT) -p tangent_dir $(STUDY_ROOT)/tangents \
		-p figures_dir figures
	$(PY) -m ayt study --run-root $(STUDY_ROOT) --sample-figures figures
	cp $(STUDY_ROOT)/mini-study.json figures/mini-study.json
	cp $(STUDY_ROOT)/tangents/results.json figures/tangent-study.json

# Paper scale (GPUs; set NPROC). Needs CIFAR-10 (data.download=true) and EDM's checkpoint (downloaded once).
NPROC ?= 8
TORCHRUN := $(PY) -m torch.distributed.run --standalone --nproc-per-node=$(NPROC)
paper: setup
	$(TORCHRUN) -m ayt train --preset cifar10-feature-net data.download=true --resume
	$(TORCHRUN) -m ayt train --preset cifar10-ect --resume
	$(TORCHRUN) -m ayt train --preset cifar10-ayt --resume
	$(TORCHRUN) -m ayt eval runs/cifar10-ect runs/cifar10-ayt --metric fid --checkpoints all --n 50000 --runs 3
	$(PY) -m ayt notebook notebooks/05_paper_figures.ipynb -p figures_dir figures

clean:
	rm -rf $(VENV) runs
