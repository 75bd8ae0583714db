# Two entry points: `make demo` (the main job) and `make test` (the suite CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# the CPU wheel that lies on this kind of machine; an unpinned torch would pull a multi-GB CUDA build
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: demo test
# the main job: compress the shipped demo LLaVA (W4A4 + QAPruner), then evaluate it in the shape of the paper's Table 1
demo: $(VENV)/.installed
	mkdir -p runs
	$(VENV)/bin/optimum-qap compress --output runs/demo-qap --overwrite --calib-samples 32
	$(VENV)/bin/optimum-qap eval --limit 100 --alphas 0.7,auto --calib-samples 32 --output runs/demo-eval.json
	# why the backbone matters: the demo model with LLM-style outlier channels, plain RTN vs rotation (+GPTQ)
	$(VENV)/bin/python examples/backbone_results.py --limit 100 --models outlier --dense-only --output runs/backbone-demo.json

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q
