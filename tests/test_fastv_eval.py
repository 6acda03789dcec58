"""FastV (LLM-side pruning) through the evaluation pipeline: per-doc logs of what the decoder processed, their
checks, and the FLOPs summary of a hiprune-eval record counted from each decoder layer's tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import hiprune
from eval.config import compose_config
from eval.efficiency.flops import flops_exact
from eval.lmms.base import selection_digest
from eval.lmms.llava import HiPruneLlava
from eval.running import run as run_module
from eval.running.store import read_record
from hiprune.adapters.base import GridRecord, LayerRecord


# ------------------------------------------------------------------------------------------------------------------
# the per-batch log, on a stand-in model (no weights)
# ------------------------------------------------------------------------------------------------------------------
def _logger(method, records, n_layers=2):
    """A HiPruneLlava with only what _log_llm_pruning reads: the method, the session's decoder records, the config."""
    lmm = HiPruneLlava.__new__(HiPruneLlava)
    lmm.method = method
    lmm.session = SimpleNamespace(pop_layer_records=lambda: list(records))
    lmm._model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=n_layers)))
    lmm.kept_tokens, lmm.kept_digests, lmm.llm_visual_per_layer = {}, {}, {}
    return lmm


FASTV = hiprune.build_method("fastv", budget=2, layer=1, budget_mode="keep_after")
KEY = ("task", "test")


def test_log_takes_each_docs_kept_indices_in_batch_order():
    # two docs (ids 7 and 3, in batch order), one image of 4 visual tokens each, 2 kept from layer 1 on
    record = LayerRecord(tokens=[10, 8], visual=[4, 2], indices=torch.tensor([[0, 3], [1, 2]]),
                         visual_in=4, images=1)
    lmm = _logger(FASTV, [record])
    lmm._log_llm_pruning(*KEY, [7, 3], [[4], [4]], sequence_length=10)
    assert lmm.kept_tokens[KEY] == {7: [2], 3: [2]}
    assert lmm.llm_visual_per_layer[KEY] == {7: [4, 2], 3: [4, 2]}
    assert lmm.kept_digests[KEY][7] == selection_digest([GridRecord(4, 2, torch.tensor([0, 3]))])
    assert lmm.kept_digests[KEY][3] == selection_digest([GridRecord(4, 2, torch.tensor([1, 2]))])
    assert lmm.kept_digests[KEY][7] != lmm.kept_digests[KEY][3]


def test_log_of_beams_and_text_only_batches():
    # num_beams=2: generate repeats every sample's row, so 2 docs make 4 rows; the copies must agree
    beams = LayerRecord(tokens=[10, 8], visual=[4, 2], indices=torch.tensor([[0, 3], [0, 3], [1, 2], [1, 2]]),
                        visual_in=4, images=1)
    lmm = _logger(FASTV, [beams])
    lmm._log_llm_pruning(*KEY, [0, 1], [[4], [4]], sequence_length=10)
    assert lmm.kept_digests[KEY][1] == selection_digest([GridRecord(4, 2, torch.tensor([1, 2]))])
    split = LayerRecord(tokens=[10, 8], visual=[4, 2], indices=torch.tensor([[0, 3], [0, 1], [1, 2], [1, 2]]),
                        visual_in=4, images=1)
    with pytest.raises(hiprune.PruningError, match="beams of one sample kept different"):
        _logger(FASTV, [split])._log_llm_pruning(*KEY, [0, 1], [[4], [4]], sequence_length=10)
    # no image: no prefill is pruned and every layer saw 0 visual tokens
    lmm = _logger(FASTV, [])
    lmm._log_llm_pruning(*KEY, [5, 6], [[], []], sequence_length=9)
    assert lmm.llm_visual_per_layer[KEY] == {5: [0, 0], 6: [0, 0]} and lmm.kept_tokens == {}


def test_log_fails_loudly_on_a_missing_extra_or_mismatched_record():
    record = LayerRecord(tokens=[10, 8], visual=[4, 2], indices=torch.tensor([[0, 3], [1, 2]]),
                         visual_in=4, images=1)
    with pytest.raises(hiprune.PruningError, match="exactly one pruned prefill.*got 0"):
        _logger(FASTV, [])._log_llm_pruning(*KEY, [0, 1], [[4], [4]], sequence_length=10)
    with pytest.raises(hiprune.PruningError, match="exactly one pruned prefill.*got 2"):
        _logger(FASTV, [record, record])._log_llm_pruning(*KEY, [0, 1], [[4], [4]], sequence_length=10)
    with pytest.raises(hiprune.PruningError, match="does not match"):  # the record is of a longer batch
        _logger(FASTV, [record])._log_llm_pruning(*KEY, [0, 1], [[4], [4]], sequence_length=12)
    with pytest.raises(hiprune.PruningError, match="3 samples"):  # 2 rows of indices for 3 docs
        _logger(FASTV, [record])._log_llm_pruning(*KEY, [0, 1, 2], [[4], [4], [4]], sequence_length=10)
    with pytest.raises(hiprune.PruningError, match="without images"):
        _logger(FASTV, [record])._log_llm_pruning(*KEY, [0, 1], [[], []], sequence_length=10)
    # a method that prunes before the LLM must leave no decoder records, and then logs nothing here
    vision = _logger(hiprune.build_method("random", budget=2), [record])
    with pytest.raises(hiprune.PruningError, match="prunes before the LLM"):
        vision._log_llm_pruning(*KEY, [0, 1], [[2], [2]], sequence_length=10)
    quiet = _logger(hiprune.build_method("random", budget=2), [])
    quiet._log_llm_pruning(*KEY, [0, 1], [[2], [2]], sequence_length=10)
    assert quiet.kept_tokens == quiet.kept_digests == quiet.llm_visual_per_layer == {}


# ------------------------------------------------------------------------------------------------------------------
# hiprune-eval end to end on the trained scene model (3 decoder layers, 64 visual tokens per image)
# ------------------------------------------------------------------------------------------------------------------
def _cfg(*overrides):
    return compose_config(overrides)


def _scene_fastv(store, batch_size):
    return _cfg("model=scene_llava", "benchmark=scene_qa", "device=cpu", f"store={store}", "method=fastv",
                "budget=16", "method.options.layer=2", "method.options.budget_mode=keep_after", "limit=6", f"batch_size={batch_size}")


@pytest.mark.slow
def test_fastv_run_records_per_layer_tokens_and_flops(tmp_path, monkeypatch, scene_llava_dir, scene_tasks_dir):
    captured = {}
    summarize = run_module.flops_summary

    def spy(model, config):  # the per-doc prompt lengths the record does not keep
        captured["prefill"] = {key: dict(docs) for key, docs in model.prefill_tokens.items()}
        captured["config"] = config
        return summarize(model, config)

    monkeypatch.setattr(run_module, "flops_summary", spy)
    record = read_record(run_module.run(_scene_fastv(tmp_path / "bs3", 3)))  # 2 batches, left-padded
    key, docs = "hiprune_scene_qa/test", [str(d) for d in range(6)]
    assert record["identity"]["method"] == {"name": "fastv", "budget": 16, "layer": 2, "budget_mode": "keep_after"}
    # what the decoder processed: 64 visual tokens in layers 0 and 1, the 16 kept in layer 2
    assert record["llm_visual_per_layer_by_doc"][key] == {d: [64, 64, 16] for d in docs}
    assert record["kept_tokens_by_doc"][key] == {d: [16] for d in docs}
    assert record["visual_tokens"] == {
        "per_image_target": 16, "counted_per": "image", "images": 6, "samples_without_image": 0, "mean_kept_per_image": 16.0,
        "min_kept_per_image": 16, "max_kept_per_image": 16, "llm_input_per_image": 64, "pruned_from_layer": 2,
    }
    digests = record["kept_digest_by_doc"][key]
    unpruned = selection_digest([GridRecord(64, 64, None)])
    assert set(digests) == set(docs) and unpruned not in digests.values() and len(set(digests.values())) > 1

    # FLOPs by hand from each doc's prompt length (d 128, m 320, 4 heads of 32, 4 kv heads, vocab 585)
    config = captured["config"]
    prefill = captured["prefill"][("hiprune_scene_qa", "test")]
    d, m, heads, head_dim, kv_heads, vocab = 128, 320, 4, 32, 4, 585
    tc = config.text_config
    assert (tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.head_dim, tc.num_key_value_heads,
            tc.vocab_size) == (d, m, heads, head_dim, kv_heads, vocab)
    fastv, exact = [], []
    for doc in range(6):
        n_text = prefill[doc] - 64
        tokens = [n_text + 64, n_text + 64, n_text + 16]
        fastv.append(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens))
        linear = sum(2 * n * (d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d + 3 * d * m)
                     for n in tokens)
        attention = sum(2 * heads * n * n * 2 * head_dim for n in tokens)  # QK^T + AV, dense
        encoder = flops_exact(config, n_text, 64)  # vision tower + projector: all 64 tokens, by hand in test_flops
        scoring = 2 * heads * tokens[1] * (head_dim + 1)  # the last token's row in layer K - 1 = 1, column sums
        exact.append(encoder["vision"] + encoder["projector"] + linear + attention + scoring + 2 * d * vocab)
    flops = record["flops"]
    assert flops["samples"] == 6 and flops["mean_visual_tokens"] == 64
    assert flops["mean_visual_tokens_per_layer"] == [64, 64, 16]
    assert flops["mean_text_tokens"] == pytest.approx(sum(prefill.values()) / 6 - 64)
    assert flops["tflops_fastv"] == pytest.approx(sum(fastv) / 6 / 1e12, rel=1e-12)
    assert flops["tflops_exact"] == pytest.approx(sum(exact) / 6 / 1e12, rel=1e-12)
    # between the unpruned count and one that kept 16 tokens in every layer
    n_mean = sum(prefill.values()) / 6 - 64
    assert (flops_exact(config, round(n_mean), 16, logits_to_keep=1)["total"] / 1e12 < flops["tflops_exact"]
            < flops_exact(config, round(n_mean), 64, logits_to_keep=1)["total"] / 1e12)

    # one doc per batch: each doc's log is the same, so the batched run gave every doc its own rows
    alone = read_record(run_module.run(_scene_fastv(tmp_path / "bs1", 1)))
    for field in ("kept_tokens_by_doc", "kept_digest_by_doc", "llm_visual_per_layer_by_doc", "flops"):
        assert alone[field] == record[field], field


@pytest.mark.slow
def test_vision_method_records_keep_their_fields(tmp_path, tiny_llava_dir, smoke_task_dir):
    # methods that prune before the LLM: no per-layer log in the record, FLOPs summary keys as before
    cfg = _cfg("model=tiny_llava", "benchmark=smoke_pope", "device=cpu", f"store={tmp_path}", "method=random",
               "budget=32", "limit=2")
    record = read_record(run_module.run(cfg))
    assert "llm_visual_per_layer_by_doc" not in record
    assert set(record["flops"]) == {"samples", "mean_text_tokens", "mean_visual_tokens", "tflops_fastv", "tflops_exact"}
    assert "llm_input_per_image" not in record["visual_tokens"] and record["visual_tokens"]["per_image_target"] == 32
