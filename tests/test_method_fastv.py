"""FastV: the selection rule (hand-computed and property cases) and the LLM-side plumbing on real HF models.

Model tests run on the trained scene model (models/scene-llava: 3 Llama layers, 64 visual tokens, real attention
patterns) at the official K = 2 and at K = 1 (two layers after the drop), and on assets/tiny-llava (2 layers, 576
visual tokens, K = 1). The reference implementation below is a hand-written decoder loop (own attention, own RoPE,
own KV lists) that drops tokens the way the official code does; the hooked HF model must give the same logits for
the prefill and for cached decode steps.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

import hiprune
from eval.config import CONFIG_DIR, REPO_ROOT
from eval.lmms.prompting import LlavaInputBuilder
from hiprune.adapters.llm_pruning import check_llm_method
from hiprune.methods.base import DropStage
from hiprune.methods.fastv import FastV, average_layers_keep, select_fastv

SCENE_DIR = REPO_ROOT / "models" / "scene-llava"
QUESTIONS = ["Is there a red circle in the image?", "What colour is the square in the picture? Answer briefly."]


# ------------------------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------------------------
def test_select_golden_cases():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5, 0.2]])
    assert select_fastv(scores, 1).tolist() == [[1]]  # 1 and 3 tie at 0.5: the lower index wins
    assert select_fastv(scores, 2).tolist() == [[1, 3]]
    assert select_fastv(scores, 3).tolist() == [[1, 2, 3]]
    assert select_fastv(scores, 5).tolist() == [[0, 1, 2, 3, 4]]
    # rows are independent; output is sorted by index, not by score
    rows = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 9.0, 0.0, 8.0]])
    assert select_fastv(rows, 2).tolist() == [[0, 1], [2, 3], [1, 3]]
    # all equal: the first `budget` tokens
    assert select_fastv(torch.zeros(1, 6), 3).tolist() == [[0, 1, 2]]
    # half precision is compared in float32; negative scores are fine
    half = torch.tensor([[-1.0, -0.5, -2.0]], dtype=torch.float16)
    out = select_fastv(half, 2)
    assert out.tolist() == [[0, 1]] and out.dtype == torch.int64


@pytest.mark.parametrize(
    "scores, budget, match",
    [
        (torch.zeros(5), 1, r"\[B, N\]"),
        (torch.zeros(1, 2, 5), 1, r"\[B, N\]"),
        (torch.zeros(1, 5, dtype=torch.long), 1, "floating point"),
        (torch.tensor([[0.1, float("nan"), 0.2]]), 1, "non-finite"),
        (torch.tensor([[0.1, float("inf"), 0.2]]), 1, "non-finite"),
        (torch.zeros(1, 5), 0, r"\[1, 5\]"),
        (torch.zeros(1, 5), 6, r"\[1, 5\]"),
        (torch.zeros(1, 5), True, r"\[1, 5\]"),
        (torch.zeros(1, 5), 2.0, r"\[1, 5\]"),
    ],
)
def test_select_rejects_bad_input(scores, budget, match):
    with pytest.raises(ValueError, match=match):
        select_fastv(scores, budget)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda b: st.integers(1, 40).flatmap(
            lambda n: st.tuples(
                st.lists(
                    st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 3.5]), min_size=n, max_size=n),
                    min_size=b,
                    max_size=b,
                ),
                st.integers(1, n),
            )
        )
    )
)
def test_select_properties(case):
    rows, budget = case
    scores = torch.tensor(rows)  # few distinct values: many ties
    kept = select_fastv(scores, budget)
    n = scores.shape[1]
    assert kept.shape == (scores.shape[0], budget) and kept.dtype == torch.int64
    assert ((kept >= 0) & (kept < n)).all()
    assert (kept[:, 1:] > kept[:, :-1]).all()  # sorted ascending, hence distinct
    for row, picks in zip(scores, kept):
        dropped = sorted(set(range(n)) - set(picks.tolist()))
        if not dropped:
            continue
        lowest_kept = row[picks].min()
        assert lowest_kept >= row[dropped].max()  # the top scores are kept
        # ties at the boundary go to the lower index: no dropped token with the boundary score precedes a kept one
        boundary_kept = [i for i in picks.tolist() if row[i] == lowest_kept]
        boundary_dropped = [i for i in dropped if row[i] == lowest_kept]
        assert not boundary_dropped or max(boundary_kept) < min(boundary_dropped)


def test_method_options_and_validation():
    method = hiprune.build_method("fastv", budget=64)
    assert isinstance(method, FastV) and method.layer == 2 and method.stage == "llm"
    assert method.describe() == {"name": "fastv", "budget": 64, "layer": 2, "budget_mode": "avg_layers"}
    assert hiprune.build_method("fastv", budget=64, budget_mode="keep_after").budget_mode == "keep_after"
    for mode in ("average", None, "AVG_LAYERS"):
        with pytest.raises(ValueError, match="budget_mode"):
            hiprune.build_method("fastv", budget=64, budget_mode=mode)
    assert hiprune.build_method("fastv", budget=0.5, layer=3).layer == 3
    for layer in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="layer"):
            hiprune.build_method("fastv", budget=64, layer=layer)
    with pytest.raises(ValueError, match="needs a budget"):
        hiprune.build_method("fastv")
    with pytest.raises(ValueError, match="no option"):
        hiprune.build_method("fastv", budget=64, ratio=0.5)


def test_config_matches_the_method():
    # what the method is (its stage, that it is implemented) comes from the registry; the config holds its options
    cfg = OmegaConf.load(CONFIG_DIR / "method" / "fastv.yaml")
    assert cfg.name == "fastv" and hiprune.METHODS["fastv"] is FastV and FastV.stage == "llm"
    assert set(cfg) == {"name", "options"}
    assert OmegaConf.to_container(cfg.options) == {"layer": FastV().layer, "budget_mode": FastV().budget_mode}


def test_avg_layers_golden_counts():
    # spec §0 / §8: k = (L * N' - K * N) / (L - K), rounded; LLaVA-1.5-7B (N = 576, L = 32, K = 2): 166.4 / 98.1 / 29.9
    assert average_layers_keep(192, 576, 2, 32) == 166
    assert average_layers_keep(128, 576, 2, 32) == 98
    assert average_layers_keep(64, 576, 2, 32) == 30
    for budget, keep in ((192, 166), (128, 98), (64, 30)):
        assert FastV(budget=budget).drop_schedule(576, 32) == [DropStage(2, keep)]
        assert FastV(budget=budget, budget_mode="keep_after").drop_schedule(576, 32) == [DropStage(2, budget)]
    # LLaVA-NeXT, 2880-token protocol: 640 -> 490.67 -> 491, 320 -> 149.33 -> 149, 160 -> (5120 - 5760) / 30 < 0
    assert FastV(budget=640).drop_schedule(2880, 32) == [DropStage(2, 491)]
    assert FastV(budget=320).drop_schedule(2880, 32) == [DropStage(2, 149)]
    with pytest.raises(ValueError, match=r"32\*160 - 2\*2880.*-21\.33.*infeasible"):
        FastV(budget=160).drop_schedule(2880, 32)
    # the solved count makes the per-layer average the budget (up to rounding), for any K
    for layer in (1, 2, 3, 5):
        keep = FastV(budget=128, layer=layer).drop_schedule(576, 32)[0].keep
        assert abs((layer * 576 + (32 - layer) * keep) / 32 - 128) <= 0.5 * (32 - layer) / 32
    # a ratio budget resolves first: 0.5 of 576 = 288 -> (32 * 288 - 2 * 576) / 30 = 268.8 -> 269
    assert FastV(budget=0.5).drop_schedule(576, 32) == [DropStage(2, 269)]
    # rounding half up, exactly: L = 4, K = 2, N = 3, N' = 2 -> (8 - 6) / 2 = 1; N' = 3 (all) keeps all 3
    assert average_layers_keep(2, 3, 2, 4) == 1 and average_layers_keep(3, 3, 2, 4) == 3
    assert average_layers_keep(5, 8, 1, 3) == 4  # (15 - 8) / 2 = 3.5 -> 4


def test_check_llm_method_rejects_what_the_plumbing_cannot_run():
    text = SimpleNamespace(model_type="llama", num_hidden_layers=4, _attn_implementation="sdpa")
    keep_after = {"budget": 8, "budget_mode": "keep_after"}
    check_llm_method(FastV(layer=3, **keep_after), text, "llava", 64)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        check_llm_method(FastV(layer=4, **keep_after), text, "llava", 64)
    flash = SimpleNamespace(**{**vars(text), "_attn_implementation": "flash_attention_2"})
    with pytest.raises(ValueError, match="flash_attention_2"):
        check_llm_method(FastV(**keep_after), flash, "llava", 64)
    with pytest.raises(ValueError, match="'gemma2'"):
        check_llm_method(FastV(**keep_after), SimpleNamespace(**{**vars(text), "model_type": "gemma2"}), "llava", 64)
    # avg_layers: 4 layers, K = 2, N = 64: an average of 8 needs (4*8 - 2*64) / 2 < 1 tokens after layer 1
    with pytest.raises(ValueError, match=r"infeasible.*budget_mode=keep_after"):
        check_llm_method(FastV(budget=8), text, "llava", 64)
    check_llm_method(FastV(budget=40), text, "llava", 64)  # (160 - 128) / 2 = 16 after layer 1


# ------------------------------------------------------------------------------------------------------------------
# models (the session's scene_llava and tiny_llava, tests/conftest.py)
# ------------------------------------------------------------------------------------------------------------------
def _images(size: int, seeds=(0, 1)):
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        out.append(Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()))
    return out


def _batch(model, processor, images, questions):
    return LlavaInputBuilder(processor)(questions, [[im] for im in images], model.config.image_seq_length)


def _generate(model, batch, steps=5, **kwargs):
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


def _rope(x, positions, head_dim, theta):
    # Llama's rotate-half RoPE, written out: cos/sin of position * theta^(-2i/d), the two halves swapped and negated
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _reference_layer(layer, x, positions, cache, cfg):
    """One Llama decoder layer on x [n, D] at `positions`, attending to its own KV list `cache` plus itself."""
    attn, heads, kv_heads, d = layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]
    h = layer.input_layernorm(x)
    q = _rope(attn.q_proj(h).view(-1, heads, d).transpose(0, 1), positions, d, theta)
    k = _rope(attn.k_proj(h).view(-1, kv_heads, d).transpose(0, 1), positions, d, theta)
    v = attn.v_proj(h).view(-1, kv_heads, d).transpose(0, 1)
    keys = torch.cat([cache[0], k], dim=1) if cache else k
    values = torch.cat([cache[1], v], dim=1) if cache else v
    past, n = keys.shape[1] - k.shape[1], k.shape[1]
    logits = q @ keys.repeat_interleave(heads // kv_heads, 0).transpose(1, 2) / math.sqrt(d)
    causal = torch.arange(keys.shape[1])[None, :] <= (past + torch.arange(n))[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [H, n, keys]
    out = (probs @ values.repeat_interleave(heads // kv_heads, 0)).transpose(0, 1).reshape(n, heads * d)
    x = x + attn.o_proj(out)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, (keys, values), probs


def reference_fastv(model, input_ids, pixel_values, prune_layer, budget, steps):
    """FastV by hand for one unpadded sample: prefill logits [T', V], kept image indices, greedy decode logits."""
    lm, cfg = model.model.language_model, model.config.text_config
    ids = input_ids[0]
    with torch.no_grad():
        x = lm.embed_tokens(ids)
        features = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
        image_pos = (ids == model.config.image_token_id).nonzero()[:, 0]
        x[image_pos] = features
        positions = torch.arange(len(ids))
        caches, probs, kept = [], None, None
        for i, layer in enumerate(lm.layers):
            if i == prune_layer:
                scores = probs[:, -1, :].mean(0)[image_pos]  # last query row, mean over heads, image keys
                ranked = scores.sort(descending=True).values
                # a selection the two implementations' rounding (~1e-9 here) could flip would test nothing
                assert ranked[budget - 1] - ranked[budget] > 1e-7, "near-tie at the budget boundary: pick other data"
                kept = scores.topk(budget).indices.sort().values
                keep_mask = torch.ones(len(ids), dtype=torch.bool)
                keep_mask[image_pos] = False
                keep_mask[image_pos[kept]] = True
                x, positions = x[keep_mask], positions[keep_mask]
            x, cache, probs = _reference_layer(layer, x, positions, None, cfg)
            caches.append(cache)
        prefill = model.lm_head(lm.norm(x))
        decode, token, position = [], prefill[-1].argmax(), len(ids)
        for _ in range(steps):
            x = lm.embed_tokens(token[None])
            for i, layer in enumerate(lm.layers):
                x, caches[i], _ = _reference_layer(layer, x, torch.tensor([position]), caches[i], cfg)
            logits = model.lm_head(lm.norm(x))[0]
            decode.append(logits)
            token, position = logits.argmax(), position + 1
    return prefill, kept, torch.stack(decode)


def _single_input(model, n_visual, seed=0, before=5, after=7):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.image_token_id  # text ids below the image token (pad / image ids are the last two)
    ids = torch.cat(
        [
            torch.randint(3, vocab - 1, (before,), generator=g),
            torch.full((n_visual,), model.config.image_token_id),
            torch.randint(3, vocab - 1, (after,), generator=g),
        ]
    )[None]
    size = model.config.vision_config.image_size
    return ids, torch.randn(1, 3, size, size, generator=g)


def _model_variant(model, attention):
    if attention == model.config.text_config._attn_implementation:
        return model
    variant = copy.deepcopy(model)
    variant.set_attn_implementation(attention)
    return variant


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("which, layer, budget", [("scene", 2, 16), ("scene", 1, 24), ("tiny", 1, 144)])
def test_hooked_model_equals_reference_prefill_and_decode(scene_llava, tiny_llava, which, layer, budget, attention):
    model = _model_variant((scene_llava if which == "scene" else tiny_llava)[0], attention)
    n_visual = model.config.image_seq_length
    ids, pixels = _single_input(model, n_visual)
    steps = 4
    expected_prefill, expected_kept, expected_decode = reference_fastv(model, ids, pixels, layer, budget, steps)

    with (
        hiprune.apply(
            model, hiprune.build_method("fastv", budget=budget, layer=layer, budget_mode="keep_after")
        ) as session,
        torch.no_grad(),
    ):
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = []
        for _ in range(steps):
            step = model(input_ids=token, cache=cache, use_cache=True)
            decode.append(step.logits[0, -1])
            token = step.logits[:, -1].argmax(-1, keepdim=True)
    [record] = session.layer_records
    length, short = ids.shape[1], ids.shape[1] - n_visual + budget
    assert record.tokens == [length] * layer + [short] * (model.config.text_config.num_hidden_layers - layer)
    assert torch.equal(record.indices, expected_kept[None])
    assert out.logits.shape[1] == short
    torch.testing.assert_close(out.logits[0], expected_prefill, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(decode), expected_decode, rtol=1e-4, atol=1e-5)
    # each layer's cache holds what that layer saw: full before K, shortened from K on (plus the decoded tokens)
    held = [cache.layers[i].get_seq_length() for i in range(model.config.text_config.num_hidden_layers)]
    assert held == [n + steps for n in record.tokens]


def test_layers_before_k_match_the_unpruned_model(scene_llava):
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states
        with hiprune.apply(model, hiprune.build_method("fastv", budget=16, layer=2, budget_mode="keep_after")):
            pruned = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of layer i (the last one is the final normed output)
    assert len(plain) == len(pruned) == 4
    for i in range(3):  # embeddings, outputs of layers 0 and 1: untouched, bit for bit
        assert torch.equal(plain[i], pruned[i])
    assert pruned[3].shape[1] == ids.shape[1] - 64 + 16
    assert plain[3].shape[1] == ids.shape[1]


def test_full_budget_generates_exactly_like_the_unpruned_model(scene_llava):
    model, processor = scene_llava
    batch = _batch(model, processor, _images(128), QUESTIONS)
    plain_tokens, plain_scores = _generate(model, batch)
    with hiprune.apply(model, hiprune.build_method("fastv", budget=64, budget_mode="keep_after")) as session:
        tokens, scores = _generate(model, batch)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(scores, plain_scores)
    assert session.layer_records[0].visual == [64, 64, 64]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("which, layer, budget", [("scene", 2, 16), ("scene", 1, 8), ("tiny", 1, 64)])
def test_left_padded_batch_equals_each_prompt_alone(scene_llava, tiny_llava, which, layer, budget, attention):
    model, processor = scene_llava if which == "scene" else tiny_llava
    model = _model_variant(model, attention)
    images = _images(processor.image_processor.crop_size["height"])
    batch = _batch(model, processor, images, QUESTIONS)
    assert (batch["attention_mask"] == 0).any()  # the prompts differ in length: one row is left-padded
    with hiprune.apply(
        model, hiprune.build_method("fastv", budget=budget, layer=layer, budget_mode="keep_after")
    ) as session:
        tokens, scores = _generate(model, batch)
        [batched] = session.pop_layer_records()
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            alone_tokens, alone_scores = _generate(model, _batch(model, processor, [image], [question]))
            [alone] = session.pop_layer_records()
            assert torch.equal(alone.indices[0], batched.indices[row])
            assert torch.equal(alone_tokens[0], tokens[row])
            torch.testing.assert_close(alone_scores[0], scores[row], rtol=1e-4, atol=1e-4)
    assert batched.visual[layer:] == [budget] * (model.config.text_config.num_hidden_layers - layer)


def test_beam_search_batch_equals_each_prompt_alone(scene_llava):
    # Beams of one sample share its prefill (and so its kept positions); HF reorders cache rows only among them.
    model, processor = scene_llava
    images = _images(128)
    batch = _batch(model, processor, images, QUESTIONS)
    with hiprune.apply(model, hiprune.build_method("fastv", budget=16, budget_mode="keep_after")):
        tokens, _ = _generate(model, batch, num_beams=3)
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            alone, _ = _generate(model, _batch(model, processor, [image], [question]), num_beams=3)
            assert torch.equal(alone[0], tokens[row])
        full = hiprune.build_method("fastv", budget=64, budget_mode="keep_after")
    with hiprune.apply(model, full):
        full_tokens, _ = _generate(model, batch, num_beams=3)
    plain_tokens, _ = _generate(model, batch, num_beams=3)
    assert torch.equal(full_tokens, plain_tokens)


def test_embeddings_input(scene_llava):
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    embeds = model.model.get_input_embeddings()(ids)
    with (
        hiprune.apply(model, hiprune.build_method("fastv", budget=8, budget_mode="keep_after")) as session,
        torch.no_grad(),
    ):
        from_ids = model(input_ids=ids, pixel_values=pixels).logits
        # placeholder embeddings + pixel_values: the image tokens are found the way HF finds them
        from_embeds = model(inputs_embeds=embeds, pixel_values=pixels).logits
        assert torch.equal(session.layer_records[0].indices, session.layer_records[1].indices)
        torch.testing.assert_close(from_embeds, from_ids)
        # a prefill from embeddings alone (e.g. with the features already scattered in): nothing marks the image
        # tokens for certain, and running unpruned would be a silent fallback
        with pytest.raises(hiprune.PruningError, match="pre-merged inputs_embeds"):
            model(inputs_embeds=embeds)


def test_pruning_changes_the_answer_path(scene_llava):
    # Not a no-op: with few tokens kept, the prefill logits differ from the unpruned model's.
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        with hiprune.apply(model, hiprune.build_method("fastv", budget=4, layer=1, budget_mode="keep_after")):
            pruned = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
    assert not torch.allclose(plain, pruned, atol=1e-3)


def test_ratio_budget_keeps_a_share_per_image(tiny_llava):
    model, _ = tiny_llava
    ids, pixels = _single_input(model, 576)
    with (
        hiprune.apply(model, hiprune.build_method("fastv", budget=0.25, layer=1, budget_mode="keep_after")) as session,
        torch.no_grad(),
    ):
        model(input_ids=ids, pixel_values=pixels)
        assert session.tokens_per_image() == 576  # the LLM's input still holds every visual token
    assert session.layer_records[0].visual == [576, 144]


def test_two_images_per_row_keep_budget_each(scene_llava):
    model, _ = scene_llava
    g = torch.Generator().manual_seed(3)
    image = torch.full((64,), model.config.image_token_id)
    ids = torch.cat([torch.tensor([1, 5, 6]), image, torch.tensor([7, 8]), image, torch.tensor([9, 10, 11])])[None]
    pixels = torch.randn(2, 3, 128, 128, generator=g)
    with (
        hiprune.apply(model, hiprune.build_method("fastv", budget=10, layer=2, budget_mode="keep_after")) as session,
        torch.no_grad(),
    ):
        out = model(input_ids=ids, pixel_values=pixels)
    [record] = session.layer_records
    assert record.visual == [128, 128, 20] and record.indices.shape == (2, 10)
    assert out.logits.shape[1] == ids.shape[1] - 2 * 54


def test_model_is_restored_after_exit(scene_llava):
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    lm = model.model.language_model
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    configs = [layer.self_attn.config for layer in lm.layers]
    method = hiprune.build_method("fastv", budget=8, layer=2, budget_mode="keep_after")
    with pytest.raises(RuntimeError, match="boom"), hiprune.apply(model, method), torch.no_grad():
        assert "forward" in vars(model.model)
        assert all(len(layer._forward_pre_hooks) == 1 for layer in lm.layers)
        model(input_ids=ids, pixel_values=pixels)
        raise RuntimeError("boom")
    assert "forward" not in vars(model.model) and "get_image_features" not in vars(model.model)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in lm.layers)
    assert [layer.self_attn.config for layer in lm.layers] == configs
    assert not any(hasattr(layer.self_attn, "_hiprune_route") for layer in lm.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, before)


# ------------------------------------------------------------------------------------------------------------------
# what is not supported fails loudly
# ------------------------------------------------------------------------------------------------------------------
def test_right_padding_is_rejected(scene_llava):
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    padded = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 2, dtype=torch.long)], dim=1)
    method = hiprune.build_method("fastv", budget=8, budget_mode="keep_after")
    with hiprune.apply(model, method), torch.no_grad(), pytest.raises(hiprune.PruningError, match="right padding"):
        model(input_ids=padded, attention_mask=mask, pixel_values=pixels)


def test_static_cache_is_rejected(scene_llava):
    model, processor = scene_llava
    batch = _batch(model, processor, _images(128)[:1], QUESTIONS[:1])
    with (
        hiprune.apply(model, hiprune.build_method("fastv", budget=8, budget_mode="keep_after")),
        pytest.raises(hiprune.PruningError, match="DynamicCache"),
    ):
        _generate(model, batch, cache_implementation="static")


def test_rows_with_different_image_counts_are_rejected(scene_llava):
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    text_only = torch.randint(3, 500, ids.shape, generator=torch.Generator().manual_seed(1))
    method = hiprune.build_method("fastv", budget=8, budget_mode="keep_after")
    with hiprune.apply(model, method), torch.no_grad(), pytest.raises(hiprune.PruningError, match=r"\[64, 0\] image"):
        model(input_ids=torch.cat([ids, text_only]), pixel_values=pixels)


def test_cropped_cache_is_rejected(scene_llava):
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    with hiprune.apply(model, hiprune.build_method("fastv", budget=8, budget_mode="keep_after")), torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        out.cache.crop(-3)  # what assisted decoding does: the cache no longer ends where the pruned prefill did
        with pytest.raises(hiprune.PruningError, match="cropped"):
            model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True)


def test_decode_step_undone_by_crop_repeats_exactly(scene_llava):
    # eval/efficiency/bench.py times one decode step, then crops it off the cache (crop(-1)) and repeats: every layer
    # loses the same token, so the cache stays consistent with the pruned prefill.
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    with hiprune.apply(model, hiprune.build_method("fastv", budget=8, budget_mode="keep_after")), torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        first = model(input_ids=token, cache=out.cache, use_cache=True).logits
        out.cache.crop(-1)
        again = model(input_ids=token, cache=out.cache, use_cache=True).logits
    assert torch.equal(first, again)


def test_impossible_settings_are_rejected_before_patching(tiny_llava):
    model, _ = tiny_llava
    # the tiny LLM has 2 layers: the default K = 2 would prune nothing
    with (
        pytest.raises(ValueError, match=r"1\.\.1"),
        hiprune.apply(model, hiprune.build_method("fastv", budget=64, budget_mode="keep_after")),
    ):
        pass
    with (
        pytest.raises(ValueError, match="only 576"),
        hiprune.apply(model, hiprune.build_method("fastv", budget=600, layer=1, budget_mode="keep_after")),
    ):
        pass
    assert "forward" not in vars(model.model)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.language_model.layers)


@pytest.mark.parametrize("tiny_model_dir", ["llava_next", "video_llava", "qwen2_5_vl"], indirect=True)
def test_other_families_check_fastv_against_their_decoder(tiny_model_dir):
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    cls = getattr(transformers, json.loads((tiny_model_dir / "config.json").read_text())["architectures"][0])
    with torch.device("meta"):
        model = cls(config)
    adapter = hiprune.adapter_for(model)
    adapter.check_supported(hiprune.build_method("fastv", budget=8, layer=1, budget_mode="keep_after"))
    with pytest.raises(ValueError, match=r"2 layers: layer must lie in 1\.\.1"):  # the tiny LLMs have 2 layers
        adapter.check_supported(hiprune.build_method("fastv", budget=8, layer=2, budget_mode="keep_after"))


def test_decode_step_that_generates_the_image_token_id_is_a_plain_decode_step(scene_llava):
    # A model can generate the image placeholder's id; without images in the call it is text, not a new prefill.
    model, _ = scene_llava
    ids, pixels = _single_input(model, 64)
    image_token = torch.tensor([[model.config.image_token_id]])
    with (
        hiprune.apply(model, hiprune.build_method("fastv", budget=8, budget_mode="keep_after")) as session,
        torch.no_grad(),
    ):
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        pruned_prefills = len(session.pop_layer_records())
        step = model(input_ids=image_token, cache=out.cache, use_cache=True).logits
        assert session.pop_layer_records() == []  # the decode step pruned nothing
    assert pruned_prefills == 1 and step.shape[1] == 1 and torch.isfinite(step).all()
