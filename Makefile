# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline

.PHONY: venv weights quickstart test lint format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

weights: venv
	$(PY) -m ppd.weights fetch mobile_sam
	$(PY) -m ppd.weights fetch dinov2_vits14

quickstart: weights
	$(PY) -m ppd.fit --config configs/quickstart.yaml

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: venv
	$(VENV)/bin/ruff check ppd tests experiments
	$(VENV)/bin/ruff format --check ppd tests experiments

format: venv
	$(VENV)/bin/ruff format ppd tests experiments
	$(VENV)/bin/ruff check --fix ppd tests experiments

clean:
	rm -rf $(VENV) runs wandb lightning_logs
