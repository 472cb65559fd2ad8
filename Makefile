# clipaudit: `make demo` and `make test` do their own set-up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-models train-probe test test-all bench bench-gpu lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/clipaudit run --config configs/demo.yaml

# Retrain the demo's probe pair (probe-clip, probe-dino) into src/clipaudit/models/weights/: about 4 min on 2 cores.
train-probe: setup
	$(VENV)/bin/clipaudit train-probe

demo-models: setup
	$(VENV)/bin/clipaudit run --config configs/leaderboard.yaml

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/embed.py
	$(PY) bench/knn.py --quick

bench-gpu: setup
	$(PY) bench/gpu.py --json bench/results/gpu.json

lint: setup
	$(PY) -m ruff check src tests bench jobs

clean:
	rm -rf runs .pytest_cache
