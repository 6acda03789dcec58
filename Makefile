# Everything runs offline on CPU from a fresh clone: `make smoke` and `make test` set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TINY_LLAVA := assets/tiny-llava/build_info.json
SMOKE_TASK := assets/smoke_pope/manifest.json

.PHONY: setup assets smoke test test-fast bench tables clean-smoke

setup: $(STAMP)

# Reinstalls only when the dependency pins change. The constraints file keeps pip on the local CPU-capable torch.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[test]'
	touch $@

assets: $(TINY_LLAVA) $(SMOKE_TASK)

$(TINY_LLAVA): scripts/build_tiny_llava.py | $(STAMP)
	$(OFFLINE) $(PY) scripts/build_tiny_llava.py

$(SMOKE_TASK): scripts/build_smoke_task.py | $(STAMP)
	$(OFFLINE) $(PY) scripts/build_smoke_task.py

# Offline smoke sweep: none / random / hiprune x 3 budgets on the tiny LLaVA and the local POPE-style task.
smoke: setup assets
	$(OFFLINE) $(PY) -m eval.run +experiment=smoke --multirun
	$(OFFLINE) $(PY) -m eval.tables results/smoke/runs results/smoke/table

test: setup
	$(OFFLINE) $(PY) -m pytest -q

test-fast: setup
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

# Scoring overhead on a random-weight CLIP ViT-L/14-336 (ratios measured in one run).
bench: setup
	$(OFFLINE) $(PY) -m eval.bench_scoring

tables: setup
	$(OFFLINE) $(PY) -m eval.tables results/smoke/runs results/smoke/table

clean-smoke:
	rm -rf results/smoke
