# Everything runs offline on CPU from a fresh clone: `make smoke` and `make test` set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip extras of the install: CI adds the launchers (EXTRAS=test,launchers: submitit and Ray, whose tests skip without)
EXTRAS ?= test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TINY_LLAVA := assets/tiny-llava/build_info.json
SMOKE_TASK := assets/smoke_pope/manifest.json
TINY_CLIP := assets/tiny-clip/build_info.json
TINY_QWEN := assets/tiny-qwen2.5-vl/build_info.json
TINY_NEXT := assets/tiny-llava-next/build_info.json
TINY_VIDEO_LLAVA := assets/tiny-video-llava/build_info.json
TINY_DEEP := assets/tiny-llava-deep/build_info.json
TINY_ONEVISION := assets/tiny-llava-onevision/build_info.json
TINY_QWEN3 := assets/tiny-qwen3-vl/build_info.json
TINY_INTERNVL := assets/tiny-internvl/build_info.json
SMOKE_VIDEO := assets/smoke_video/manifest.json
SCENE_TASKS := assets/scene_tasks/manifest.json
# Shared by every asset builder below: a change to it rebuilds (or re-checks) each asset.
ASSET_BUILD := scripts/asset_build.py

.PHONY: setup assets smoke test test-fast bench bench-scoring tables reproduce-table clean-smoke

setup: $(STAMP)

# Reinstalls only when the dependency pins change. The constraints file keeps pip on the local CPU-capable torch.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	rm -rf hiprune_harness.egg-info  # a stale one in the tree would shadow the new entry points
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[$(EXTRAS)]'
	touch $@

assets: $(TINY_LLAVA) $(TINY_CLIP) $(TINY_QWEN) $(TINY_NEXT) $(TINY_VIDEO_LLAVA) $(TINY_DEEP) $(TINY_ONEVISION) $(TINY_QWEN3) $(TINY_INTERNVL) $(SMOKE_TASK) $(SMOKE_VIDEO) $(SCENE_TASKS)

$(TINY_LLAVA): scripts/build_tiny_llava.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_llava

$(TINY_CLIP): scripts/build_tiny_clip.py $(ASSET_BUILD) $(TINY_LLAVA) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_clip

$(TINY_QWEN): scripts/build_tiny_qwen2_5_vl.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_qwen2_5_vl

$(TINY_NEXT): scripts/build_tiny_llava_next.py scripts/build_tiny_llava.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_llava_next

$(TINY_VIDEO_LLAVA): scripts/build_tiny_video_llava.py scripts/build_tiny_llava.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_video_llava

$(TINY_DEEP): scripts/build_tiny_llava_deep.py scripts/build_tiny_llava.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_llava_deep

$(TINY_ONEVISION): scripts/build_tiny_llava_onevision.py scripts/build_tiny_qwen2_5_vl.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_llava_onevision

$(TINY_QWEN3): scripts/build_tiny_qwen3_vl.py scripts/build_tiny_qwen2_5_vl.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_qwen3_vl

$(TINY_INTERNVL): scripts/build_tiny_internvl.py scripts/build_tiny_qwen2_5_vl.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_tiny_internvl

$(SMOKE_VIDEO): scripts/build_smoke_video_task.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_smoke_video_task

$(SMOKE_TASK): scripts/build_smoke_task.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_smoke_task

# Scene benchmark data (val + test parquet) for the committed scene model; rebuilt when the generator changes.
$(SCENE_TASKS): scripts/build_scene_tasks.py scripts/scenes.py $(ASSET_BUILD) | $(STAMP)
	$(OFFLINE) $(PY) -m scripts.build_scene_tasks --force
	touch $@

# Records of a rebuilt scene model or task get new names (their bytes are in the identity); drop the old ones so the
# smoke table holds the current inputs only.
SCENE_RUNS := results/smoke/runs/scene_llava
$(SCENE_RUNS)/.inputs: $(SCENE_TASKS) models/scene-llava/model.safetensors models/scene-llava/config.json
	rm -rf $(SCENE_RUNS)
	mkdir -p $(SCENE_RUNS)
	touch $@

# Offline smoke sweep: none / random / hiprune x 3 budgets on the trained scene model (models/scene-llava, committed)
# and the two local scene tasks; the table holds that model's runs only.
smoke: setup $(SCENE_RUNS)/.inputs
	$(OFFLINE) $(PY) -m eval.running.run +experiment=smoke --multirun
	$(OFFLINE) $(PY) -m eval.report.tables $(SCENE_RUNS) results/smoke/table

test: setup
	$(OFFLINE) $(PY) -m pytest -q

test-fast: setup
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

# Efficiency (README: Efficiency): latency, memory, FLOPs and roofline of every method x budget
# (eval.efficiency.bench; CPU default: the mid-size random LLaVA, results/efficiency/), then the scoring overhead.
# Hydra overrides for the first in BENCH_ARGS, e.g. BENCH_ARGS="model=llava15_7b bench_profile=gpu" on a GPU.
bench: setup
	$(OFFLINE) $(PY) -m eval.efficiency.bench $(BENCH_ARGS)
	$(MAKE) bench-scoring

# Scoring overhead alone, on random-weight vision towers at real shapes (ratios measured in one run per shape):
# CLIP ViT-L/14-336 and the Qwen2.5-VL-3B tower (one 448x448 image; minutes on a CPU).
SCORING_SHAPES ?= clip-l-336 qwen2.5-vl-3b
bench-scoring: setup
	for shape in $(SCORING_SHAPES); do $(OFFLINE) $(PY) -m eval.efficiency.scoring --shape $$shape || exit 1; done

# The paper's tables (README: Reproducing the paper's tables). TABLE: 2 3 4 5 7 8 10 6a 6b 6c 11 object_layer alpha
# smoke scene (python -m eval.report.reproduce list). Runs the table's sweep with Hydra multirun -- finished runs are
# skipped, so rerunning after a crash or kill resumes -- then renders results/tables/<experiment>.{csv,md,tex} and
# plots.
# ARGS: Hydra overrides for every sweep, e.g. ARGS="limit=200 batch_size=16" or ARGS="hydra/launcher=slurm".
TABLE ?= 2
ARGS ?=
reproduce-table: setup $(if $(filter smoke scene,$(TABLE)),assets)
	$(PY) -m eval.report.reproduce run $(TABLE) $(ARGS)

# Re-render every paper table and its plots from the result store; runs nothing. A table whose store holds no record
# of it is kept as it is (exit 1 for one table; with --all only when nothing renders or the store is missing);
# ARGS=--allow-empty renders it with pending cells (the committed templates).
tables: setup
	$(OFFLINE) $(PY) -m eval.report.reproduce render --all $(ARGS)

clean-smoke:
	rm -rf results/smoke
