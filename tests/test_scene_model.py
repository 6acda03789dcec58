"""The committed scene model (models/scene-llava): it loads offline, reaches its documented test accuracy through the
harness's own input path, and pruning changes accuracy the way a correct pruning must.

Accuracies are measured on the first rows of the test split (scripts/scenes.py, the rows of
assets/scene_tasks/*_test.parquet) with the harness's LlavaInputBuilder + greedy generate; training.json holds the
numbers the training script measured on the same rows ("subset"). The pruning margins below come from measured runs
(models/scene-llava/TRAINING.md; full test split, 600 + 600 rows):

    POPE acc   none 0.968 | hiprune@32 0.947, random@32 0.873, misaligned@32 0.845 | hiprune@16 0.912, random@16 0.738
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import hiprune
from eval.config import compose_config
from eval.running import run as run_module
from eval.running.store import iter_records
from hiprune.methods.base import Selection, gather_tokens
from scripts import scenes
from scripts import train_scene_vlm as train

N_POPE, N_QA = 300, 300  # the subset training.json documents (train_scene_vlm.TEST_SUBSET)

# Regression margins (shares of the full model's accuracy on the subset), from the measured runs above.
HIPRUNE_HALF_KEEPS = 0.95  # hiprune at 32 of 64 tokens keeps >= 95% of full POPE accuracy (measured ~98%)
MISALIGNED_BELOW = 0.92  # a selection whose features are shuffled against its indices stays below 92% (measured ~87%)
HIPRUNE_OVER_RANDOM_16 = 0.08  # at 16 tokens hiprune beats random by >= 8 POPE points (measured ~17)



@dataclass
class Misaligned(hiprune.HiPrune):
    """HiPrune's indices, but each kept slot carries the feature of a different (fixed-permutation) grid token."""

    name: ClassVar[str] = "misaligned"

    def select(self, tokens, budget):
        selection = super().select(tokens, budget)
        perm = torch.randperm(tokens.num_tokens, generator=torch.Generator().manual_seed(0)).to(
            selection.indices.device
        )
        return Selection(selection.indices, gather_tokens(tokens.features, perm[selection.indices]))


@pytest.fixture(scope="module")
def info(scene_llava_dir) -> dict:
    return json.loads((scene_llava_dir / "training.json").read_text())


@pytest.fixture(scope="module")
def rows():
    # the test split's first rows (a row depends on the split size through POPE's popularity, so build it whole)
    pope = scenes.pope_rows(600, scenes.SPLIT_SEEDS["test"])[:N_POPE]
    qa = scenes.qa_rows(600, scenes.SPLIT_SEEDS["test"] + 1)[:N_QA]
    return pope, qa


def _accuracy(scene_llava, rows, method=None) -> tuple[float, float]:
    model, processor = scene_llava
    pope, qa = rows
    pope_acc = train.pope_metrics(pope, train.generate_answers(model, processor, pope, prune=method))["accuracy"]
    qa_em = train.qa_metrics(qa, train.generate_answers(model, processor, qa, prune=method))["exact_match"]
    return pope_acc, qa_em


@pytest.fixture(scope="module")
def full_accuracy(scene_llava, rows):
    return _accuracy(scene_llava, rows)


def test_checkpoint_is_a_small_offline_llava_with_a_prunable_grid(scene_llava, scene_llava_dir, info):
    model, processor = scene_llava
    files = {p.name for p in scene_llava_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "processor_config.json",
        "training.json",
        "TRAINING.md",
    } <= files
    assert sum(p.stat().st_size for p in scene_llava_dir.iterdir()) < 6_000_000
    assert type(model).__name__ == "LlavaForConditionalGeneration" and next(model.parameters()).dtype == torch.float32
    vision = model.config.vision_config
    assert vision.model_type == "clip_vision_model" and vision.num_hidden_layers >= 9
    assert (vision.image_size // vision.patch_size) ** 2 == model.config.image_seq_length == 64
    assert model.config.vision_feature_layer == -2 and model.config.text_config.model_type == "llama"
    assert processor.tokenizer.chat_template and processor.image_processor.do_pad
    adapter = hiprune.adapter_for(model)
    assert adapter.grid == (8, 8) and adapter.feature_layer() == 11
    assert info["threads"] >= 1 and info["seed"] == 0


def test_full_model_reaches_the_documented_test_accuracy(full_accuracy, info):
    pope_acc, qa_em = full_accuracy
    documented = info["test"]["full"]["subset"]
    assert (documented["n_pope"], documented["n_qa"]) == (N_POPE, N_QA)
    assert pope_acc == pytest.approx(documented["pope_accuracy"], abs=0.01)
    assert qa_em == pytest.approx(documented["qa_exact_match"], abs=0.01)
    # the targets: >= 90% POPE, short answers clearly above chance (~0.28)
    assert pope_acc >= 0.9 and qa_em >= 0.6


def test_hiprune_at_half_the_tokens_keeps_its_share_and_a_misaligned_selection_does_not(
    scene_llava, rows, full_accuracy, info
):
    full_pope, full_qa = full_accuracy
    pope, qa = _accuracy(scene_llava, rows, hiprune.build_method("hiprune", budget=32))
    assert pope == pytest.approx(info["test"]["hiprune@32"]["subset"]["pope_accuracy"], abs=0.01)
    assert pope >= HIPRUNE_HALF_KEEPS * full_pope
    assert qa >= 0.85 * full_qa
    bad_pope, bad_qa = _accuracy(scene_llava, rows, Misaligned(budget=32))
    assert bad_pope < MISALIGNED_BELOW * full_pope
    assert bad_qa < qa


def test_hiprune_beats_random_at_a_quarter_of_the_tokens(scene_llava, rows):
    hip, _ = _accuracy(scene_llava, rows, hiprune.build_method("hiprune", budget=16))
    rnd, _ = _accuracy(scene_llava, rows, hiprune.build_method("random", budget=16))
    assert hip - rnd >= HIPRUNE_OVER_RANDOM_16


@pytest.mark.slow
def test_lmms_eval_run_scores_what_the_harness_path_answers(tmp_path, scene_llava, scene_tasks_dir):
    """eval.running.run (Hydra -> lmms-eval task yaml -> hiprune_llava) gives the direct path's numbers on the same
    rows."""
    limit = 48
    model, processor = scene_llava
    pope = scenes.pope_rows(600, scenes.SPLIT_SEEDS["test"])[:limit]
    qa = scenes.qa_rows(600, scenes.SPLIT_SEEDS["test"] + 1)[:limit]
    method = hiprune.build_method("hiprune", budget=16)
    expected = {
        "hiprune_scene_pope": (
            "pope_accuracy",
            train.pope_metrics(pope, train.generate_answers(model, processor, pope, prune=method))["accuracy"],
        ),
        "hiprune_scene_qa": (
            "exact_match",
            train.qa_metrics(qa, train.generate_answers(model, processor, qa, prune=method))["exact_match"],
        ),
    }
    for benchmark in ("scene_pope", "scene_qa"):
        cfg = compose_config(["model=scene_llava", f"benchmark={benchmark}", "method=hiprune", "budget=16",
                              f"limit={limit}", "batch_size=8", "device=cpu", f"store={tmp_path}"])
        run_module.run(cfg)
    records = {task: r for _, r in iter_records(tmp_path) for task in r["metrics"]}
    for task, (metric, value) in expected.items():
        assert records[task]["metrics"][task][metric] == pytest.approx(value, abs=1e-9)
        assert records[task]["visual_tokens"]["mean_kept_per_image"] == 16
