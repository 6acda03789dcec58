"""PyramidDrop: golden cases from the spec (§9), the solved lambda^s schedules, the selection's properties, and the
LLM plumbing's "own"-score stages with compact positions on the trained scene model (models/scene-llava: 3 Llama
layers, 64 visual tokens per image; schedule layers [1, 2], ratios [0.5, 0.125] -> 32 then 8 visual tokens).

The reference is a hand-run of the decoder layers without KV cache: at each boundary it scores the current image
tokens with the boundary layer's own q / k projections and RoPE on its input, shortens the sequence and renumbers
the positions 0..n-1 (or keeps the original ones); the hooked model's prefill and cached decode steps must give the
same logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from llm_support import attention_variant, prefill_and_decode, greedy_with_scores, noise_images, single_input
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hiprune
from eval.lmms.prompting import LlavaInputBuilder
from hiprune.adapters.llm_pruning import check_llm_method, own_last_query_attention, visual_per_layer
from hiprune.methods.base import DropStage
from hiprune.methods.pdrop import PyramidDrop, average_visual_tokens, select_pdrop, solve_lambda

SCENE_DIR = REPO / "models" / "scene-llava"
SCENE_OPTIONS = {"layers": [1, 2], "ratios": [0.5, 0.125]}
QUESTIONS = [
    "Is there a red circle in the image?",
    "What colour is the square in the picture? Answer briefly.",
    "How many shapes?",
    "Is the triangle to the left of the circle, or is it to the right of it?",
]


# ------------------------------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------------------------------
def test_spec_golden_two_stages():
    # spec §9: N = 8, ratios [0.5, 0.25] -> keep 4 then 2
    method = hiprune.build_method("pdrop", layers=[2, 5], ratios=[0.5, 0.25])
    assert method.drop_schedule(8, 8) == [DropStage(2, 4, "own"), DropStage(5, 2, "own")]
    first = select_pdrop(torch.tensor([[0.12, 0.3, 0.2, 0.05, 0.15, 0.02, 0.08, 0.1]]), 4)
    assert first.tolist() == [[0, 1, 2, 4]]
    second = select_pdrop(torch.tensor([[0.4, 0.1, 0.3, 0.2]]), 2)  # scores of tokens [0, 1, 2, 4]
    assert first[0][second[0]].tolist() == [0, 2]


def test_budget_solves_lambda_over_layers_2_8_16():
    # spec §9 (derived, not official): LLaVA-1.5-7B, N = 576, L = 32
    for budget, lam, counts, average in (
        (192, 0.5606, [322, 180, 101], 191.875),
        (128, 0.4211, [242, 102, 42], 127.875),
        (64, 0.1927, [110, 21, 4], 63.875),
    ):
        method = hiprune.build_method("pdrop", budget=budget)
        schedule = method.drop_schedule(576, 32)
        assert schedule == [DropStage(layer, keep, "own") for layer, keep in zip((2, 8, 16), counts)]
        assert average_visual_tokens(576, [2, 8, 16], counts, 32) == average
        assert round(solve_lambda(budget, 576, [2, 8, 16], 32), 4) == lam
        per_layer = visual_per_layer(schedule, 576, 32)
        assert per_layer == [576] * 2 + [counts[0]] * 6 + [counts[1]] * 8 + [counts[2]] * 16
        assert sum(per_layer) / 32 == average
    # the repo scripts' default: layers [8, 16, 24], ratios 0.5^s -> 288 / 144 / 72, an average of 270
    scripts = hiprune.build_method("pdrop", layers=[8, 16, 24], ratios=[0.5, 0.25, 0.125])
    assert [s.keep for s in scripts.drop_schedule(576, 32)] == [288, 144, 72]
    assert average_visual_tokens(576, [8, 16, 24], [288, 144, 72], 32) == 270


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(8, 3000),
    fraction=st.floats(0.1, 0.9),
    first=st.integers(1, 4),
    gaps=st.lists(st.integers(1, 8), min_size=1, max_size=3),
)
def test_solved_lambda_is_the_largest_within_the_budget(n, fraction, first, gaps):
    layers = [first]
    for gap in gaps:
        layers.append(layers[-1] + gap)
    total = layers[-1] + 4
    budget = max(1, int(n * fraction))
    try:
        lam = solve_lambda(budget, n, layers, total)
    except ValueError as exc:
        assert "infeasible" in str(exc)
        assert average_visual_tokens(n, layers, [0] * len(layers), total) > budget
        return

    def average(value):
        return average_visual_tokens(n, layers, [math.floor(n * value**s) for s in range(1, len(layers) + 1)], total)

    assert average(lam) <= budget
    assert average(min(1.0, lam * (1 + 1e-9) + 1e-12)) > budget or lam >= 1 - 1e-9


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=2, max_size=40), st.data())
def test_selection_keeps_the_highest_scores_in_order(values, data):
    scores = torch.tensor([values], dtype=torch.float32)
    keep = data.draw(st.integers(1, len(values)))
    picks = select_pdrop(scores, keep)[0].tolist()
    assert picks == sorted(set(picks)) and len(picks) == keep
    dropped = [i for i in range(len(values)) if i not in picks]
    assert not dropped or min(values[i] for i in picks) >= max(values[i] for i in dropped)


def test_options_and_validation():
    method = hiprune.build_method("pdrop", budget=64)
    assert method.stage == "llm" and method.drop_positions() == "compact"
    assert method.describe() == {
        "name": "pdrop",
        "budget": 64,
        "layers": [2, 8, 16],
        "ratios": None,
        "positions": "compact",
    }
    assert hiprune.build_method("pdrop", budget=64, positions="original").drop_positions() == "original"
    bad = [
        ({"budget": 64, "ratios": [0.5]}, "not both"),
        ({"layers": [2, 8], "ratios": [0.5]}, "one ratio per layer"),
        ({"layers": [2, 8], "ratios": [0.5, 0.5]}, "strictly decreasing"),
        ({"layers": [2, 8], "ratios": [1.5, 0.5]}, r"\(0, 1\]"),
        ({"budget": 64, "layers": [8, 2]}, "strictly increasing"),
        ({"budget": 64, "layers": [0, 2]}, ">= 1"),
        ({"budget": 64, "layers": []}, "non-empty"),
        ({"budget": 64, "positions": "shifted"}, "positions"),
        ({}, "needs a budget"),
    ]
    for options, match in bad:
        with pytest.raises(ValueError, match=match):
            hiprune.build_method("pdrop", **options)
    # LLaVA-NeXT's 2880-token protocol: 160 is infeasible with layers 0, 1 at 2880 (as FastV's avg rule)
    with pytest.raises(ValueError, match="infeasible"):
        hiprune.build_method("pdrop", budget=160).drop_schedule(2880, 32)
    with pytest.raises(ValueError, match="does not exist"):
        hiprune.build_method("pdrop", budget=64).drop_schedule(576, 16)
    text = type("Text", (), {"model_type": "llama", "num_hidden_layers": 3, "_attn_implementation": "sdpa"})()
    check_llm_method(hiprune.build_method("pdrop", **SCENE_OPTIONS), text, "llava", 64)
    with pytest.raises(ValueError, match="does not exist"):
        check_llm_method(hiprune.build_method("pdrop", budget=16), text, "llava", 64)


def test_config_matches_the_method():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "method" / "pdrop.yaml")
    # what the method is comes from the registry; the config holds its name and options only
    assert cfg.name == "pdrop" and hiprune.METHODS["pdrop"] is PyramidDrop and set(cfg) == {"name", "options"}
    options = OmegaConf.to_container(cfg.options)
    assert options == {"layers": list(PyramidDrop.layers), "ratios": None, "positions": "compact"}


# ------------------------------------------------------------------------------------------------------------------
# the plumbing on the scene model
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene(scene_llava):
    return scene_llava






def _own_attention(layer, x, positions, row, rotary):
    """Layer's own attention of query ``row`` over keys 0..row of x [n, D] at ``positions``, heads averaged."""
    attn, cfg = layer.self_attn, layer.self_attn.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(-1, heads, d).transpose(0, 1)[None]
    k = attn.k_proj(h).view(-1, kv_heads, d).transpose(0, 1)[None]
    cos, sin = rotary(x[None], positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = k[0].repeat_interleave(heads // kv_heads, 0)
    logits = torch.einsum("hd,hnd->hn", q[0, :, row], keys) / math.sqrt(d)
    logits[:, row + 1 :] = float("-inf")
    return torch.softmax(logits, dim=-1).mean(0)


def reference(model, prompt, pixels, schedule, compact, generated=()):
    """Logits of the positions the last layer holds and each stage's kept image indices; ``generated`` ids appended
    make it the no-cache recomputation of cached decode steps (the scores read the last prompt token's row)."""
    lm = model.model.language_model
    ids = torch.cat([prompt[0], torch.tensor(list(generated), dtype=torch.long)])
    T = prompt.shape[1]
    stage_at = {stage.layer: stage.keep for stage in schedule}
    with torch.no_grad():
        x = lm.embed_tokens(ids)
        image_pos = (prompt[0] == model.config.image_token_id).nonzero()[:, 0]
        x[image_pos] = torch.cat(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        held = torch.arange(len(ids))
        image_held = torch.arange(len(image_pos))
        kept = []
        for i, layer in enumerate(lm.layers):
            positions = torch.arange(len(held)) if compact else held
            if i in stage_at:
                keep = stage_at[i]
                row = int(torch.searchsorted(held, torch.tensor(T - 1)))
                scores = _own_attention(layer, x, positions, row, lm.rotary_emb)
                image_scores = scores[torch.searchsorted(held, image_pos[image_held])]
                ranked = image_scores.sort(descending=True).values
                assert ranked[keep - 1] - ranked[keep] > 1e-6, "near-tie at a stage's boundary: pick other data"
                image_held = image_held[image_scores.topk(keep).indices].sort().values
                kept.append(image_held)
                mask = torch.ones(len(ids), dtype=torch.bool)
                mask[image_pos] = False
                mask[image_pos[image_held]] = True
                rows = torch.searchsorted(held, mask.nonzero()[:, 0])
                x, held = x[rows], held[rows]
                positions = torch.arange(len(held)) if compact else held
            n = len(held)
            causal = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
            cos, sin = lm.rotary_emb(x[None], positions[None])
            x = layer(x[None], attention_mask=causal, position_ids=positions[None], position_embeddings=(cos, sin))[0]
        return model.lm_head(lm.norm(x)), kept


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefill_and_cached_decode_equal_the_reference(scene, attention, positions):
    model = attention_variant(scene[0], attention)
    method = hiprune.build_method("pdrop", positions=positions, **SCENE_OPTIONS)
    schedule = method.drop_schedule(64, 3)
    assert schedule == [DropStage(1, 32, "own"), DropStage(2, 8, "own")]
    ids, pixels = single_input(model)
    T, steps = ids.shape[1], 4
    session, prefill_lengths, out, generated, decode = prefill_and_decode(model, method, ids, pixels, steps)

    assert prefill_lengths == [T, T - 32, T - 56]  # per-layer sequence lengths follow the schedule
    [record] = session.layer_records
    assert record.tokens == prefill_lengths and record.visual == [64, 32, 8]
    assert [out.cache.layers[i].get_seq_length() for i in range(3)] == [n + steps for n in record.tokens]
    expected_prefill, expected_kept = reference(model, ids, pixels, schedule, positions == "compact")
    assert [k.tolist() for k in expected_kept] == [record.stages[0][1][0].tolist(), record.stages[1][1][0].tolist()]
    torch.testing.assert_close(out.logits[0], expected_prefill, rtol=1e-4, atol=1e-5)
    for t in range(1, steps + 1):
        logits, kept = reference(model, ids, pixels, schedule, positions == "compact", generated[:t])
        assert [k.tolist() for k in kept] == [k.tolist() for k in expected_kept]
        torch.testing.assert_close(decode[t], logits[-1], rtol=1e-4, atol=1e-5)


def test_own_scores_and_compact_positions_change_the_result(scene):
    # each choice matters on this input: the own layer's ranking differs from the layer before's, and renumbered
    # positions change the logits of the same kept tokens
    model, _ = scene
    ids, pixels = single_input(model)
    with torch.no_grad():
        lm = model.model.language_model
        with hiprune.apply(model, hiprune.build_method("pdrop", **SCENE_OPTIONS)) as own:
            compact = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        with hiprune.apply(model, hiprune.build_method("pdrop", positions="original", **SCENE_OPTIONS)) as orig:
            original = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        with hiprune.apply(model, hiprune.build_method("fastv", budget=32, layer=1, budget_mode="keep_after")) as prev:
            model(input_ids=ids, pixel_values=pixels)
        assert lm is model.model.language_model
    assert torch.equal(own.layer_records[0].stages[0][1], orig.layer_records[0].stages[0][1])
    assert not torch.allclose(compact, original, atol=1e-4)
    assert not torch.equal(own.layer_records[0].stages[0][1], prev.layer_records[0].stages[0][1])


def test_own_attention_matches_eager_attention_of_that_layer(scene):
    # the plumbing's cheap last-row score equals the eager attention probabilities the layer itself computes
    model = attention_variant(scene[0], "eager")
    ids, pixels = single_input(model)
    lm = model.model.language_model
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = dict(kwargs)

    handle = lm.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
    finally:
        handle.remove()
    with torch.no_grad():
        scores = own_last_query_attention(lm.layers[1], captured["hidden"], captured["kwargs"])
    expected = out.attentions[1][:, :, -1].float().mean(dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_left_padded_batch_of_four_equals_each_prompt_alone(scene, attention):
    model, processor = scene
    model = attention_variant(model, attention)
    images = noise_images(4)

    def batch(imgs, questions):
        return LlavaInputBuilder(processor)(questions, [[im] for im in imgs], model.config.image_seq_length)

    def generate(inputs):
        return greedy_with_scores(model, inputs)

    together = batch(images, QUESTIONS)
    assert (together["attention_mask"] == 0).any()
    with hiprune.apply(model, hiprune.build_method("pdrop", **SCENE_OPTIONS)) as session:
        tokens, scores = generate(together)
        [batched] = session.pop_layer_records()
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            alone_tokens, alone_scores = generate(batch([image], [question]))
            [alone] = session.pop_layer_records()
            for (layer, kept), (alone_layer, alone_kept) in zip(batched.stages, alone.stages, strict=True):
                assert layer == alone_layer and torch.equal(alone_kept[0], kept[row])
            assert alone.visual == batched.visual == [64, 32, 8]
            assert torch.equal(alone_tokens[0], tokens[row])
            torch.testing.assert_close(alone_scores[0], scores[row], rtol=1e-4, atol=1e-4)
