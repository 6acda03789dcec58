"""SparseVLM through the LLM plumbing on the trained scene model (models/scene-llava: 3 Llama layers, 64 visual tokens):
pruning after layers 0 and 1 with schedule [32, 12] -> 32 kept + 2 cluster tokens (32 pruned -> 10 candidates -> 2
clusters), then 12 of those 34 + 1 cluster (22 pruned -> 7 candidates -> 1 cluster): visual tokens per layer
[64, 34, 13].

The reference is a hand-run of the decoder without KV cache: raters from the input embeddings, each pruning layer's
rater attention from its own q / k projections, the kept tokens, the recycled cluster tokens (the method's own
recycling of the layer's outputs) placed after the last kept image token, positions renumbered 0..n-1. The hooked
model's prefill and cached decode steps must give the same logits; a left-padded batch of 4 equals each sample alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO
from llm_support import attention_variant, prefill_and_decode, greedy_with_scores, noise_images, single_input
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hiprune
from eval.lmms.prompting import LlavaInputBuilder
from hiprune.methods.sparsevlm import text_raters

SCENE_DIR = REPO / "models" / "scene-llava"
OPTIONS = {"layers": [0, 1], "schedule": [32, 12]}
QUESTIONS = [
    "Is there a red circle in the image?",
    "What colour is the square in the picture? Answer briefly.",
    "How many shapes?",
    "Is the triangle to the left of the circle, or is it to the right of it?",
]


@pytest.fixture(scope="module")
def scene(scene_llava):
    return scene_llava






def _rater_attention(layer, x, raters, rotary):
    """Mean over the rater rows of layer's head-averaged causal attention over x [n, D] at positions 0..n-1."""
    attn, cfg = layer.self_attn, layer.self_attn.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(-1, heads, d).transpose(0, 1)[None]
    k = attn.k_proj(h).view(-1, kv_heads, d).transpose(0, 1)[None]
    cos, sin = rotary(x[None], torch.arange(len(x))[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = k[0].repeat_interleave(heads // kv_heads, 0)
    rows = []
    for r in raters.tolist():
        logits = torch.einsum("hd,hnd->hn", q[0, :, r], keys) / math.sqrt(d)
        logits[:, r + 1 :] = float("-inf")
        rows.append(torch.softmax(logits, dim=-1).mean(0))
    return torch.stack(rows).mean(0)


def reference(model, method, prompt, pixels, generated=()):
    lm = model.model.language_model
    ids = torch.cat([prompt[0], torch.tensor(list(generated), dtype=torch.long)])
    T = prompt.shape[1]
    with torch.no_grad():
        x = lm.embed_tokens(ids)
        image_pos = (prompt[0] == model.config.image_token_id).nonzero()[:, 0]
        x[image_pos] = torch.cat(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        after = torch.arange(int(image_pos[-1]) + 1, T)
        raters = after[text_raters(x[image_pos], x[after])]  # prompt positions: they stay in the sequence
        kinds = ["text"] * len(ids)  # per current token: "text" (its prompt position in ``where``) or "image"
        where = list(range(len(ids)))
        for p in image_pos.tolist():
            kinds[p] = "image"
        image_ids = {p: i for i, p in enumerate(image_pos.tolist())}
        ident = [image_ids.get(p, -1) for p in where]  # image token id (ids >= 64: cluster tokens)
        next_id, stages, kept_log = (
            len(image_pos),
            {s.layer - 1: (i, s) for i, s in enumerate(method.drop_schedule(64, 3))},
            [],
        )
        for i, layer in enumerate(lm.layers):
            n = len(x)
            causal = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
            positions = torch.arange(n)[None]
            cos, sin = lm.rotary_emb(x[None], positions)
            x_in = x
            x = layer(x[None], attention_mask=causal, position_ids=positions, position_embeddings=(cos, sin))[0]
            if i not in stages:
                continue
            index, stage = stages[i]
            rater_rows = torch.tensor([where.index(int(r)) for r in raters])
            scores = _rater_attention(layer, x_in, rater_rows, lm.rotary_emb)
            image_rows = torch.tensor([j for j, kind in enumerate(kinds) if kind == "image"])
            image_scores = scores[image_rows]
            ranked = image_scores.sort(descending=True).values
            assert ranked[stage.keep - 1] - ranked[stage.keep] > 1e-6, "near-tie at a stage's boundary"
            keep = image_scores.topk(stage.keep).indices.sort().values
            dropped = torch.tensor([j for j in range(len(image_rows)) if j not in keep.tolist()])
            clusters = method.recycle_tokens(x[image_rows[dropped]], image_scores[dropped], index)
            assert clusters.shape[0] == stage.added
            kept_rows = set(image_rows[keep].tolist())
            last = max(kept_rows)
            new_kinds, new_where, new_ident, pieces = [], [], [], []
            for j in range(n):
                if kinds[j] == "image" and j not in kept_rows:
                    continue
                pieces.append(x[j])
                new_kinds.append(kinds[j]), new_where.append(where[j]), new_ident.append(ident[j])
                if j == last:
                    for c in range(stage.added):
                        pieces.append(clusters[c])
                        new_kinds.append("image"), new_where.append(-1), new_ident.append(next_id + c)
            next_id += stage.added
            x, kinds, where, ident = torch.stack(pieces), new_kinds, new_where, new_ident
            kept_log.append(sorted(k for k, kind in zip(ident, kinds) if kind == "image"))
        return model.lm_head(lm.norm(x)), kept_log


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefill_and_cached_decode_equal_the_reference(scene, attention):
    model = attention_variant(scene[0], attention)
    method = hiprune.build_method("sparsevlm", **OPTIONS)
    ids, pixels = single_input(model)
    T, steps = ids.shape[1], 4
    session, prefill_lengths, out, generated, decode = prefill_and_decode(model, method, ids, pixels, steps)

    assert prefill_lengths == [T, T - 64 + 34, T - 64 + 13]
    [record] = session.layer_records
    assert record.visual == [64, 34, 13] and record.tokens == prefill_lengths
    assert [out.cache.layers[i].get_seq_length() for i in range(3)] == [n + steps for n in record.tokens]
    expected, kept = reference(model, method, ids, pixels)
    assert kept == [record.stages[0][1][0].tolist(), record.stages[1][1][0].tolist()]
    assert kept[0][-2:] == [64, 65] and max(kept[1]) == 66  # cluster ids follow the image's 64 tokens
    torch.testing.assert_close(out.logits[0], expected, rtol=1e-4, atol=1e-5)
    for t in range(1, steps + 1):
        logits, again = reference(model, method, ids, pixels, generated[:t])
        assert again == kept
        torch.testing.assert_close(decode[t], logits[-1], rtol=1e-4, atol=1e-5)


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
    with hiprune.apply(model, hiprune.build_method("sparsevlm", **OPTIONS)) as session:
        tokens, scores = generate(together)
        [batched] = session.pop_layer_records()
        for row, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
            alone_tokens, alone_scores = generate(batch([image], [question]))
            [alone] = session.pop_layer_records()
            for (layer, kept), (alone_layer, alone_kept) in zip(batched.stages, alone.stages, strict=True):
                assert layer == alone_layer and torch.equal(alone_kept[0], kept[row])
            assert alone.visual == batched.visual == [64, 34, 13]
            assert torch.equal(alone_tokens[0], tokens[row])
            torch.testing.assert_close(alone_scores[0], scores[row], rtol=1e-4, atol=1e-4)
