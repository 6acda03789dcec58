"""Drop schedules: an LLM-side method that drops visual tokens at several decoder layers, run by the one LLM plumbing
(hiprune.adapters.llm_pruning), and the eval side's per-layer counts derived from the schedule that ran.

The method under test is defined here: FastV's ranking (the last prompt token's attention in the layer before,
heads averaged) at two stages, [DropStage(1, 32), DropStage(2, 8)], on the trained scene model (models/scene-llava:
3 Llama layers, 64 visual tokens per image). The reference is a hand-run of the decoder layers (its own selection
from q/k projections, its own shortening, its own causal masks, no KV cache); the hooked model, prefill and cached
decode steps, must give the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import pandas as pd
import pytest
import torch
from conftest import REPO
from llm_support import attention_variant, prefill_and_decode, single_input
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hiprune
from eval.efficiency import bench as bench_module
from eval.efficiency.flops import fastv_tokens_per_layer, flops_exact, flops_measured, llm_scoring_flops, tflops_fastv
from eval.efficiency.tables import table5, token_drops
from eval.lmms.base import selection_digest
from eval.lmms.llava import HiPruneLlava
from eval.lmms.prompting import LlavaInputBuilder
from eval.running import run as run_module
from hiprune.adapters.base import GridRecord, LayerRecord
from hiprune.adapters.llm_pruning import check_llm_method, check_schedule, resolve_schedule, visual_per_layer
from hiprune.methods.base import DropStage, Method
from hiprune.methods.fastv import FastV

SCENE_DIR = REPO / "models" / "scene-llava"
TWO_STAGES = (DropStage(1, 32), DropStage(2, 8))
QUESTIONS = [
    "Is there a red circle in the image?",
    "What colour is the square in the picture? Answer briefly.",
    "How many shapes?",
    "Is the triangle to the left of the circle, or is it to the right of it?",
]


@dataclass
class Scheduled(FastV):
    """Test-only LLM-side method: FastV's per-stage selection, dropping at every stage of ``schedule``."""

    name: ClassVar[str] = "scheduled_test"

    schedule: Any = TWO_STAGES

    def drop_schedule(self, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
        return list(self.schedule) if isinstance(self.schedule, tuple) else self.schedule


def two_stage(schedule=TWO_STAGES) -> Scheduled:
    return Scheduled(budget=schedule[-1].keep if schedule else 1, schedule=schedule)


@pytest.fixture(scope="module")
def scene(scene_llava):
    return scene_llava






def _images(count):
    from PIL import Image

    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        out.append(Image.fromarray(torch.randint(0, 256, (128, 128, 3), generator=g, dtype=torch.uint8).numpy()))
    return out


def _generate(model, batch, steps=5):
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


# ------------------------------------------------------------------------------------------------------------------
# the reference: the decoder by hand on one unpadded sample, no KV cache
# ------------------------------------------------------------------------------------------------------------------
def _last_prompt_attention(layer, x, positions, row, rotary):
    """Attention probabilities of query ``row`` over the keys 0..row of ``x`` [n, D] in ``layer``, heads averaged."""
    attn, cfg = layer.self_attn, layer.self_attn.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(-1, heads, d).transpose(0, 1)[None]
    k = attn.k_proj(h).view(-1, kv_heads, d).transpose(0, 1)[None]
    cos, sin = rotary(x[None], positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = k[0].repeat_interleave(heads // kv_heads, 0)  # [H, n, d]
    logits = torch.einsum("hd,hnd->hn", q[0, :, row], keys) / math.sqrt(d)
    logits[:, row + 1 :] = float("-inf")
    return torch.softmax(logits, dim=-1).mean(0)


def reference(model, prompt, pixels, schedule, generated=()):
    """Logits [n, V] of the positions the last layer holds, and each stage's kept image indices, for ``prompt``
    [1, T] followed by ``generated`` token ids. Every stage ranks the current image tokens by the last *prompt*
    token's attention (causal: later tokens do not change it), so with generated tokens appended this is the
    no-cache recomputation of the cached decode steps."""
    lm = model.model.language_model
    ids = torch.cat([prompt[0], torch.tensor(list(generated), dtype=torch.long)])
    T = prompt.shape[1]
    stage_at = {stage.layer: stage.keep for stage in schedule}
    with torch.no_grad():
        x = lm.embed_tokens(ids)
        image_pos = (prompt[0] == model.config.image_token_id).nonzero()[:, 0]
        x[image_pos] = torch.cat(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        held = torch.arange(len(ids))  # positions the current sequence holds
        image_held = torch.arange(len(image_pos))  # indices into the image's tokens it holds
        kept, scores = [], None
        for i, layer in enumerate(lm.layers):
            if i in stage_at:
                keep = stage_at[i]
                image_scores = scores[torch.searchsorted(held, image_pos[image_held])]
                ranked = image_scores.sort(descending=True).values
                # a selection the two implementations' rounding could flip would test nothing
                assert ranked[keep - 1] - ranked[keep] > 1e-6, "near-tie at a stage's boundary: pick other data"
                image_held = image_held[image_scores.topk(keep).indices].sort().values
                kept.append(image_held)
                mask = torch.ones(len(ids), dtype=torch.bool)
                mask[image_pos] = False
                mask[image_pos[image_held]] = True
                rows = torch.searchsorted(held, mask.nonzero()[:, 0])
                x, held = x[rows], held[rows]
            if i + 1 in stage_at:
                row = int(torch.searchsorted(held, torch.tensor(T - 1)))
                scores = _last_prompt_attention(layer, x, held, row, lm.rotary_emb)
            n = len(held)
            causal = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
            cos, sin = lm.rotary_emb(x[None], held[None])
            x = layer(x[None], attention_mask=causal, position_ids=held[None], position_embeddings=(cos, sin))[0]
        return model.lm_head(lm.norm(x)), kept


# ------------------------------------------------------------------------------------------------------------------
# the plumbing on the scene model
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_two_stages_equal_the_reference_prefill_and_cached_decode(scene, attention):
    model = attention_variant(scene[0], attention)
    ids, pixels = single_input(model)
    T, steps = ids.shape[1], 4
    session, prefill_lengths, out, generated, decode = prefill_and_decode(model, two_stage(), ids, pixels, steps)

    # per-layer sequence lengths follow the schedule: T, then 32 and 8 of the 64 visual tokens
    assert prefill_lengths == [T, T - 32, T - 56]
    [record] = session.layer_records
    assert record.tokens == prefill_lengths and record.visual == [64, 32, 8]
    assert [layer for layer, _ in record.stages] == [1, 2]
    first, last = record.stages[0][1], record.stages[1][1]
    assert first.shape == (1, 32) and last.shape == (1, 8) and torch.equal(record.indices, last)
    assert set(last[0].tolist()) <= set(first[0].tolist())  # the second stage ranks what the first kept
    # each layer's cache holds what that layer saw, plus the decoded tokens
    assert [out.cache.layers[i].get_seq_length() for i in range(3)] == [n + steps for n in record.tokens]

    expected_prefill, expected_kept = reference(model, ids, pixels, TWO_STAGES)
    assert [k.tolist() for k in expected_kept] == [first[0].tolist(), last[0].tolist()]
    torch.testing.assert_close(out.logits[0], expected_prefill, rtol=1e-4, atol=1e-5)
    # cached decode step t equals the no-cache recomputation on the pruned sequence with t generated tokens
    for t in range(1, steps + 1):
        logits, kept = reference(model, ids, pixels, TWO_STAGES, generated[:t])
        assert [k.tolist() for k in kept] == [k.tolist() for k in expected_kept]
        torch.testing.assert_close(decode[t], logits[-1], rtol=1e-4, atol=1e-5)
    assert generated[1:] == [int(row.argmax()) for row in decode[1:]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_left_padded_batch_of_four_equals_each_prompt_alone(scene, attention):
    model, processor = scene
    model = attention_variant(model, attention)
    images = _images(4)

    def batch(imgs, questions):
        return LlavaInputBuilder(processor)(questions, [[im] for im in imgs], model.config.image_seq_length)

    together = batch(images, QUESTIONS)
    assert (together["attention_mask"] == 0).any()  # the prompts differ in length: rows are left-padded
    with hiprune.apply(model, two_stage()) as session:
        tokens, scores = _generate(model, together)
        [batched] = session.pop_layer_records()
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            alone_tokens, alone_scores = _generate(model, batch([image], [question]))
            [alone] = session.pop_layer_records()
            for (layer, kept), (alone_layer, alone_kept) in zip(batched.stages, alone.stages, strict=True):
                assert layer == alone_layer and torch.equal(alone_kept[0], kept[row])
            assert alone.visual == batched.visual == [64, 32, 8]
            assert torch.equal(alone_tokens[0], tokens[row])
            torch.testing.assert_close(alone_scores[0], scores[row], rtol=1e-4, atol=1e-4)
    assert batched.indices.shape == (4, 8)


def test_stages_are_not_a_no_op(scene):
    # the second stage changes what the last layer sees, hence the logits, against the first stage alone
    model, _ = scene
    ids, pixels = single_input(model)
    with torch.no_grad():
        with hiprune.apply(model, two_stage()):
            both = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        with hiprune.apply(model, two_stage((DropStage(1, 32),))) as session:
            one = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
    assert session.layer_records[0].visual == [64, 32, 32]
    assert not torch.allclose(both, one, atol=1e-4)


def test_fastv_is_the_one_stage_schedule(scene):
    model, _ = scene
    ids, pixels = single_input(model)
    fastv = hiprune.build_method("fastv", budget=16, layer=2, budget_mode="keep_after")
    assert fastv.drop_schedule(64, 3) == [DropStage(2, 16)]
    quarter = hiprune.build_method("fastv", budget=0.25, layer=1, budget_mode="keep_after")
    assert quarter.drop_schedule(576, 32) == [DropStage(1, 144)]
    with torch.no_grad():
        with hiprune.apply(model, fastv) as session:
            expected = model(input_ids=ids, pixel_values=pixels).logits
        with hiprune.apply(model, two_stage((DropStage(2, 16),))) as same:
            got = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(got, expected)
    [a], [b] = session.layer_records, same.layer_records
    assert a.visual == b.visual == [64, 64, 16] and torch.equal(a.indices, b.indices)
    assert [layer for layer, _ in a.stages] == [2] and torch.equal(a.stages[0][1], a.indices)


# ------------------------------------------------------------------------------------------------------------------
# invalid schedules fail before anything runs
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule, match",
    [
        ((), "non-empty"),
        ([], "non-empty"),
        (((1, 8),), "DropStage"),
        ((DropStage(0, 8),), r"1\.\.2"),
        ((DropStage(3, 8),), r"1\.\.2"),
        ((DropStage(True, 8),), "must be an int"),
        ((DropStage(1, 8.0),), "must be an int"),
        ((DropStage(1, 0),), "keeps no visual token"),
        ((DropStage(2, 16), DropStage(1, 8)), "strictly increasing layers"),
        ((DropStage(1, 16), DropStage(1, 8)), "strictly increasing layers"),
        ((DropStage(1, 16), DropStage(2, 16)), "strictly decreasing keep"),
        ((DropStage(1, 8), DropStage(2, 16)), "strictly decreasing keep"),
        ((DropStage(1, 65),), "only 64"),
    ],
)
def test_invalid_schedules_are_rejected_before_patching(scene, schedule, match):
    model, _ = scene
    method = Scheduled(budget=1, schedule=schedule)
    with pytest.raises(ValueError, match=match), hiprune.apply(model, method):
        pass
    assert "forward" not in vars(model.model) and "get_image_features" not in vars(model.model)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.language_model.layers)
    with pytest.raises(ValueError, match=match):
        check_schedule(schedule, 64, 3, "scheduled_test")


def test_check_llm_method_checks_the_schedule_against_the_decoder():
    text = SimpleNamespace(model_type="llama", num_hidden_layers=4, _attn_implementation="sdpa")
    check_llm_method(two_stage((DropStage(1, 32), DropStage(3, 8))), text, "llava", 64)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        check_llm_method(two_stage((DropStage(1, 32), DropStage(4, 8))), text, "llava", 64)
    with pytest.raises(ValueError, match="only 16"):
        check_llm_method(two_stage(), text, "llava", 16)

    @dataclass
    class NoSchedule(Method):  # says it prunes inside the LLM and selects, but has no schedule
        name: ClassVar[str] = "no_schedule"
        stage: ClassVar[str] = "llm"

        def select_from_attention(self, scores, keep):
            return scores.argsort(dim=1)[:, :keep]

    @dataclass
    class NoSelection(Method):  # has a schedule but no per-stage selection
        name: ClassVar[str] = "no_selection"
        stage: ClassVar[str] = "llm"

        def drop_schedule(self, visual_tokens, decoder_layers):
            return [DropStage(1, 8)]

    for method in (NoSchedule(budget=8), NoSelection(budget=8)):
        with pytest.raises(ValueError, match="does not implement"):
            check_llm_method(method, text, "llava", 64)


def test_visual_per_layer():
    assert visual_per_layer(TWO_STAGES, 64, 3) == [64, 32, 8]
    assert visual_per_layer([DropStage(2, 288), DropStage(8, 144)], 576, 10) == [576] * 2 + [288] * 6 + [144] * 2
    assert resolve_schedule(hiprune.build_method("fastv", budget=0.5, layer=1, budget_mode="keep_after"), 64, 3) == [DropStage(1, 32)]
    with pytest.raises(ValueError, match="only 16"):
        visual_per_layer(TWO_STAGES, 16, 3)


# ------------------------------------------------------------------------------------------------------------------
# the eval side: FLOPs, bench, Table 5, the per-doc log
# ------------------------------------------------------------------------------------------------------------------
def test_flops_exact_matches_measured_for_two_stages(scene):
    model, _ = scene
    ids, pixels = single_input(model)
    n_text = ids.shape[1] - 64
    with hiprune.apply(model, two_stage()) as session:
        measured = flops_measured(model, {"input_ids": ids, "pixel_values": pixels})
    [record] = session.layer_records
    assert record.visual == [64, 32, 8]
    exact = flops_exact(model.config, n_text, record.visual)
    for part, value in (
        ("vision", exact["vision"]),
        ("projector", exact["projector"]),
        ("lm_head", exact["lm_head"]),
        ("attention_scores", exact["attention_scores"]),
    ):
        assert measured[part] == value, part
    # the last query's scores in layers 0 and 1 (the layers before the stages): QK^T against the keys each held
    # (4 heads of 32) and the softmax's column sum (one MAC per key and head), as the prefill recorded them
    heads, head_dim = 4, 32
    scoring = sum(2 * heads * n * head_dim + 2 * heads * n for n in record.tokens[:2])
    assert record.scoring == [[("last", 1, n) for n in record.tokens[:2]]]
    assert llm_scoring_flops(model.config, record.scoring[0]) == scoring
    assert measured["total"] - exact["total"] == scoring
    counted = flops_exact(model.config, n_text, record.visual, llm_scoring=scoring)
    assert counted["total"] == measured["total"] and counted["llm_prefill"] == measured["language_model"]
    # FastV-convention counts from the schedule
    tokens = fastv_tokens_per_layer(3, n_text, 64, schedule=session.method.drop_schedule(64, 3))
    assert tokens == record.tokens == [n_text + 64, n_text + 32, n_text + 8]
    tc = model.config.text_config
    by_hand = sum(4 * n * 128 * 128 + 2 * n * n * 128 + 2 * n * 128 * 320 for n in tokens) / 1e12
    assert tflops_fastv(3, tc.hidden_size, tc.intermediate_size, tokens) == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(ValueError, match="not both"):
        fastv_tokens_per_layer(3, n_text, 64, prune_after=1, n_visual_after=8, schedule=TWO_STAGES)


def test_bench_counts_and_labels_every_stage():
    method = two_stage()
    per_layer = bench_module.visual_tokens_per_layer(method, 64, 3)
    assert per_layer == [64, 32, 8]
    assert bench_module.tokens_label(64, per_layer) == "64>32@1>8@2"
    fastv = hiprune.build_method("fastv", budget=16, layer=2, budget_mode="keep_after")
    assert bench_module.visual_tokens_per_layer(fastv, 64, 3) == [64, 64, 16]
    assert bench_module.tokens_label(64, [64, 64, 16]) == "64>16@2"
    config = AutoConfig.from_pretrained(SCENE_DIR)
    flops = bench_module.case_flops(config, 12, per_layer, 2, 0, 3)
    exact = flops_exact(config, 12, [64, 32, 8], logits_to_keep=1)
    assert flops["tflops_exact"] == 2 * exact["total"] / 1e12
    assert flops["llm_prefill_flops"] == 2 * (exact["llm_prefill"] + exact["lm_head"])
    assert token_drops([576, 576, 288, 288, 144]) == [(2, 288), (4, 144)]
    assert token_drops([64, 64]) == []


def _table5_case(method: str, per_layer: list[int]) -> dict:
    stats = {"median": 0.01, "iqr": 0.0}
    return {
        "method": method,
        "budget": per_layer[-1],
        "status": "ran",
        "reason": "",
        "visual_tokens": per_layer[0],
        "visual_tokens_per_layer": per_layer,
        "timings": {name: stats for name in ("vision", "prefill", "ttft", "decode")},
        "flops": {"tflops_paper_convention": 1.0, "tflops_exact": 1.0, "tflops_fastv": 0.5},
        "throughput_tok_s": stats,
        "memory": {"generate": {"peak_bytes": 1e9}},
    }


def test_table5_labels_every_stage_and_keeps_fastvs_label():
    bench = {
        "meta": {
            "tokens_per_image_full": 576,
            "model": "toy",
            "device_name": "Toy CPU",
            "dtype": "float32",
            "attn_implementation": "sdpa",
            "batch_size": 1,
        },
        "cases": [
            _table5_case("scheduled_test", [576] * 2 + [288] * 6 + [144] * 24),
            _table5_case("fastv", [576] * 2 + [64] * 30),
        ],
    }
    paper = pd.DataFrame(
        columns=[
            "method",
            "budget",
            "tflops",
            "prefill_ms",
            "prefill_ms_std",
            "decode_ms",
            "decode_ms_std",
            "throughput_tok_s",
            "throughput_std",
            "vram_gb",
        ]
    )
    frame = table5(bench, paper).set_index(["method", "budget"])
    assert frame.loc[("scheduled_test", 144), "tokens_label"] == "576→288@2→144@8"
    assert frame.loc[("fastv", 64), "tokens_label"] == "576→64 from layer 2"


def _logger(method, records, n_layers=3, tokens_per_image=64):
    """A HiPruneLlava with only what _log_llm_pruning and kept_token_summary read."""
    lmm = HiPruneLlava.__new__(HiPruneLlava)
    lmm.method = method
    lmm.session = SimpleNamespace(pop_layer_records=lambda: list(records), tokens_per_image=lambda: tokens_per_image)
    lmm._model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=n_layers)))
    lmm.decoder_layers = n_layers
    lmm.kept_tokens, lmm.kept_digests, lmm.llm_visual_per_layer, lmm.prefill_tokens = {}, {}, {}, {}
    return lmm


def test_eval_log_and_summary_follow_the_schedule():
    key = ("task", "test")
    first = torch.tensor([list(range(0, 64, 2)), list(range(1, 64, 2))])
    last = torch.tensor([list(range(0, 64, 8)), list(range(1, 64, 8))])
    record = LayerRecord(tokens=[80, 48, 24], visual=[64, 32, 8], indices=last, stages=[(1, first), (2, last)],
                         visual_in=64, images=1)
    lmm = _logger(two_stage(), [record])
    lmm._log_llm_pruning(*key, [7, 3], [[64], [64]], sequence_length=80)
    assert lmm.kept_tokens[key] == {7: [8], 3: [8]}
    assert lmm.llm_visual_per_layer[key] == {7: [64, 32, 8], 3: [64, 32, 8]}
    assert lmm.kept_digests[key][3] == selection_digest([GridRecord(64, 8, last[1])])
    summary = lmm.kept_token_summary()
    assert (summary["per_image_target"], summary["llm_input_per_image"], summary["pruned_from_layer"]) == (8, 64, 1)
    # a record that does not follow the method's schedule is a plumbing error
    for visual in ([64, 64, 8], [64, 32, 32]):
        wrong = LayerRecord(tokens=[80, 48, 24], visual=visual, indices=last, stages=[(1, first), (2, last)],
                         visual_in=64, images=1)
        with pytest.raises(hiprune.PruningError, match="does not match"):
            _logger(two_stage(), [wrong])._log_llm_pruning(*key, [7, 3], [[64], [64]], sequence_length=80)

    # the run's FLOPs summary counts each decoder layer with the tokens the schedule left there
    lmm.prefill_tokens[key] = {7: 80, 3: 80}
    config = AutoConfig.from_pretrained(SCENE_DIR)
    flops = run_module.flops_summary(lmm, config)
    assert flops["mean_visual_tokens_per_layer"] == [64, 32, 8]
    assert flops["tflops_exact"] == pytest.approx(
        flops_exact(config, 16, [64, 32, 8], logits_to_keep=1)["total"] / 1e12
    )
