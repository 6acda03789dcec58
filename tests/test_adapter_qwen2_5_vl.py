"""Qwen2.5-VL adapter: per-image ratio budgets, scores equal a manual recomputation after un-windowing and 2x2
averaging, kept tokens keep their unpruned M-RoPE positions (or compact ones), generation with a KV cache, batch
invariance with images of different sizes, every method, exact restore, and an lmms-eval run."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hiprune
from hiprune.adapters.base import PruningError
from hiprune.adapters.qwen2_5_vl import KEPT_ATTRIBUTE, Qwen25VLAdapter
from hiprune.methods import HiPrune

REPO = Path(__file__).resolve().parents[1]
SIZES = [(112, 168), (84, 140)]  # (h, w) px -> 8x12 and 6x10 patches -> 4x6 = 24 and 3x5 = 15 merged tokens
QUESTIONS = ["Is there a red circle in the image?", "What colour is the square?"]
OBJECT_LAYER = 4  # full-attention block of the tiny tower (fullatt_block_indexes [3, 7])


@pytest.fixture(scope="module")
def images():
    """Random-noise images (no two patches alike, so the window permutation can be recovered by matching rows)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _texts(processor, questions):
    return [
        processor.apply_chat_template(
            [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True,
        )
        for q in questions
    ]


def _batch(processor, images, questions):
    return processor(text=_texts(processor, questions), images=list(images), padding=True, padding_side="left",
                     return_tensors="pt")


def _generate(model, batch, n=4, **kwargs):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


def _merged(grid):
    return int(grid.prod()) // 4


class _LLMInputs:
    """Records what the language model receives: inputs_embeds shapes and position ids per call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append((tuple(kwargs["inputs_embeds"].shape), kwargs.get("position_ids")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@dataclass
class SpyHiPrune(HiPrune):
    """HiPrune that remembers what it was shown."""

    seen: list = field(default_factory=list)

    def select(self, tokens, budget):
        self.seen.append((tokens, budget))
        return super().select(tokens, budget)


def test_tiny_build_has_windowed_and_full_attention_blocks(tiny_qwen_dir, tiny_qwen):
    model, processor = tiny_qwen
    vision = model.config.vision_config
    assert (vision.depth, list(vision.fullatt_block_indexes), vision.window_size) == (8, [3, 7], 56)
    assert (vision.patch_size, vision.spatial_merge_size, processor.image_processor.merge_size) == (14, 2, 2)
    assert 1 <= OBJECT_LAYER <= vision.depth and OBJECT_LAYER - 1 in vision.fullatt_block_indexes
    assert processor.tokenizer.eos_token == "<|im_end|>" and "<|vision_start|>" in processor.chat_template
    size = sum(p.stat().st_size for p in tiny_qwen_dir.rglob("*") if p.is_file())
    assert 0.5e6 < size < 3e6
    assert json.loads((tiny_qwen_dir / "build_info.json").read_text())["verify"]["n_image_tokens"] > 0


# --- counts, lengths ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.334, 0.112, 7])
def test_kept_counts_follow_the_ratio_per_image(tiny_qwen, images, budget):
    model, processor = tiny_qwen
    full = _batch(processor, images, QUESTIONS)
    grids = full["image_grid_thw"]
    n = [_merged(g) for g in grids]
    expected = [round(k * budget) if isinstance(budget, float) else budget for k in n]  # half to even
    method = hiprune.build_method("hiprune", budget=budget, object_layer=OBJECT_LAYER)
    with hiprune.apply(model, method, processor) as session, _LLMInputs(model) as llm:
        batch = _batch(processor, images, QUESTIONS)
        emitted = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
        _generate(model, batch)
    assert n == [24, 15]
    assert emitted == expected
    [grid_records] = session.records
    assert [(g.tokens_in, g.tokens_kept) for g in grid_records] == list(zip(n, expected))
    text = full["attention_mask"].sum(1) - torch.tensor(n)
    assert batch["attention_mask"].sum(1).tolist() == (text + torch.tensor(expected)).tolist()
    assert llm.calls[0][0][:2] == (2, int((text + torch.tensor(expected)).max()))  # prefill: padded text + N'
    assert all(shape[1] == 1 for shape, _ in llm.calls[1:])  # then one token per step from the KV cache


# --- scores ------------------------------------------------------------------------------------------------------

def _reference_scores(model, pixel_values, grid_thw, layers, windows=False):
    """Per image [n] merged scores of each 1-based block in ``layers``, recomputed from the block's inputs.

    The window permutation is recovered by matching the rows entering block 1 with the patch embeddings in processor
    order; each image is a separate softmax (the official flash path's scores: no window mask), or with ``windows``
    each chunk of the block's cu_seqlens (an image, or a window); heads then queries are averaged
    (hiprune.global_attention on the full probability maps); a merged token averages its 4 patches.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = model.model.visual
    inputs = {}

    def grab(name):
        def hook(module, args, kwargs):
            inputs[name] = (args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"], kwargs["position_embeddings"])
        return hook

    handles = [visual.blocks[0].register_forward_pre_hook(grab("first"), with_kwargs=True)]
    handles += [visual.blocks[i - 1].attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            visual(pixel_values, grid_thw=grid_thw)
            embedded = visual.patch_embed(pixel_values)
    finally:
        for h in handles:
            h.remove()
    order = {row.numpy().tobytes(): i for i, row in enumerate(embedded)}
    assert len(order) == embedded.shape[0], "patches must be distinct to recover the permutation"
    permutation = torch.tensor([order[row.numpy().tobytes()] for row in inputs["first"][0]])  # window pos -> raster

    out = {}
    for layer in layers:
        hidden, cu_seqlens, (cos, sin) = inputs[layer]
        attn = visual.blocks[layer - 1].attn
        with torch.no_grad():
            q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            parts = []
            if not windows:  # the images lie one after the other in window order
                cu_seqlens = torch.tensor([0, *itertools.accumulate(int(g.prod()) for g in grid_thw)])
            for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
                logits = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling
                parts.append(hiprune.global_attention(torch.softmax(logits, -1).unsqueeze(0), skip_cls=False)[0])
        window_order = torch.cat(parts)
        raster = torch.empty_like(window_order)
        raster[permutation] = window_order
        merged = raster.view(-1, 4).mean(-1)
        out[layer] = list(torch.split(merged, [_merged(g) for g in grid_thw]))
    return out


# a full-attention block; a windowed one scored over each image without the window mask (the default, as the
# official flash path), and per window (window_scores="window")
@pytest.mark.parametrize("object_layer, window_scores", [(OBJECT_LAYER, "image"), (2, "image"), (2, "window")])
def test_captured_scores_equal_a_manual_recomputation(tiny_qwen, images, object_layer, window_scores):
    model, processor = tiny_qwen
    assert Qwen25VLAdapter(model).full_attention_layers() == [4, 8]
    assert Qwen25VLAdapter(model).window_scores == "image"
    method = SpyHiPrune(budget=0.334, object_layer=object_layer)
    batch = _batch(processor, images, QUESTIONS)
    with hiprune.apply(model, method, processor, window_scores=window_scores), torch.no_grad():
        model(**_batch(processor, images, QUESTIONS))
    reference = _reference_scores(model, batch["pixel_values"], batch["image_grid_thw"], [object_layer, 8],
                                  windows=window_scores == "window")
    if object_layer == 2:  # the two readings of a windowed block differ
        other = _reference_scores(model, batch["pixel_values"], batch["image_grid_thw"], [2],
                                  windows=window_scores != "window")
        assert not torch.allclose(other[2][0], reference[2][0], rtol=1e-3)
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in batch["image_grid_thw"]]
    assert sorted(tokens.grid for tokens, _ in method.seen) == sorted(grids)  # one call per distinct grid
    for tokens, budget in method.seen:
        i = grids.index(tokens.grid)
        assert budget == round(_merged(batch["image_grid_thw"][i]) * 0.334)
        torch.testing.assert_close(tokens.scores["object"][0], reference[object_layer][i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(tokens.scores["deep"][0], reference[8][i], rtol=1e-5, atol=1e-7)


def test_other_blocks_keep_their_kernel_and_features_are_the_merger_output(tiny_qwen, images):
    model, processor = tiny_qwen
    batch = _batch(processor, images, QUESTIONS)
    with torch.no_grad():
        plain = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        with hiprune.apply(model, hiprune.build_method("random", budget=1.0)):  # keeps every token
            out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=1.0, object_layer=OBJECT_LAYER)):
            scored = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    for a, b, c, kept in zip(plain, out.pooler_output, scored, getattr(out, KEPT_ATTRIBUTE)):
        assert torch.equal(kept, torch.arange(a.shape[0]))
        assert torch.equal(a, b) and torch.equal(a, c)  # captured blocks still use the model's own kernel


# --- positions, generation ---------------------------------------------------------------------------------------

def _kept_mask(input_ids, attention_mask, image_token_id, n_full, kept_per_image):
    """Per sample: which tokens of the unpruned (valid) sequence survive pruning."""
    masks = []
    for image, (ids, valid) in enumerate(zip(input_ids, attention_mask.bool())):  # one image per sample
        ids = ids[valid]
        keep = torch.ones(ids.shape[0], dtype=torch.bool)
        start = int((ids == image_token_id).nonzero()[0])
        keep[start:start + n_full[image]] = False
        keep[start + kept_per_image[image]] = True
        masks.append(keep)
    return masks


def test_kept_tokens_keep_their_unpruned_positions(tiny_qwen, images):
    model, processor = tiny_qwen
    full = _batch(processor, images, QUESTIONS)
    reference, reference_deltas = model.model.get_rope_index(
        full["input_ids"], full["mm_token_type_ids"], full["image_grid_thw"], attention_mask=full["attention_mask"]
    )
    method = hiprune.build_method("hiprune", budget=0.223, object_layer=OBJECT_LAYER)
    with hiprune.apply(model, method, processor) as session, _LLMInputs(model) as llm, torch.no_grad():
        batch = _batch(processor, images, QUESTIONS)
        model(**batch)
        deltas = model.model.rope_deltas.clone()
    positions = llm.calls[0][1]
    assert positions.shape == (3, *batch["input_ids"].shape)
    kept = [g.indices for g in session.records[0]]
    masks = _kept_mask(full["input_ids"], full["attention_mask"], model.config.image_token_id,
                       [_merged(g) for g in full["image_grid_thw"]], kept)
    for b, keep in enumerate(masks):
        ours = positions[:, b, batch["attention_mask"][b].bool()]
        theirs = reference[:, b, full["attention_mask"][b].bool()]
        assert torch.equal(ours, theirs[:, keep])  # text and kept image tokens: the unpruned positions, gaps remain
        assert int(deltas[b]) == int(theirs.max()) + 1 - int(keep.sum())
        assert int(deltas[b]) == int(reference_deltas[b]) + int((~keep).sum())  # next position = unpruned next


def test_decoding_continues_at_the_unpruned_positions(tiny_qwen, images):
    model, processor = tiny_qwen
    with _LLMInputs(model) as plain:
        _generate(model, _batch(processor, images, QUESTIONS), n=3)
    method = hiprune.build_method("hiprune", budget=0.112, object_layer=OBJECT_LAYER)
    with hiprune.apply(model, method, processor), _LLMInputs(model) as pruned:
        batch = _batch(processor, images, QUESTIONS)
        cached = _generate(model, batch, n=3)
        uncached = _generate(model, batch, n=3, use_cache=False)
    assert len(plain.calls) == 3 and pruned.calls[1][0] == (2, 1, model.config.text_config.hidden_size)
    for (_, ours), (_, theirs) in zip(pruned.calls[1:3], plain.calls[1:3]):
        assert torch.equal(ours[-3:], theirs[-3:])  # the M-RoPE rows of each decoding step: as without pruning
    assert torch.equal(cached, uncached)  # KV cache vs recomputing the whole pruned sequence at every step


def test_manual_decoding_uses_the_pruned_rope_deltas(tiny_qwen, images):
    model, processor = tiny_qwen
    method = hiprune.build_method("random", budget=0.334)
    with hiprune.apply(model, method, processor), torch.no_grad():
        batch = _batch(processor, images[:1], QUESTIONS[:1])
        generated = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        out = model(**batch, use_cache=True)
        step = generated.sequences[:, -2:-1]
        nxt = model(input_ids=step, cache=out.cache, use_cache=True)  # no position ids: HF adds model.rope_deltas
    torch.testing.assert_close(out.logits[:, -1], generated.logits[0])
    torch.testing.assert_close(nxt.logits[:, -1], generated.logits[1])


def test_compact_positions_are_contiguous(tiny_qwen, images):
    model, processor = tiny_qwen
    method = hiprune.build_method("random", budget=0.334)
    with hiprune.apply(model, method, processor, positions="compact") as session, _LLMInputs(model) as llm:
        assert session.adapter.positions == "compact"
        batch = _batch(processor, images, QUESTIONS)
        _generate(model, batch, n=2)
    prefill, decode = llm.calls[0][1], llm.calls[1][1]
    for b in range(2):
        valid = batch["attention_mask"][b].bool()
        length = int(valid.sum())
        assert torch.equal(prefill[1:, b, valid], torch.arange(length).expand(3, -1))
        assert decode[1:, b, -1].tolist() == [length] * 3


def test_position_mode_is_validated(tiny_qwen):
    model, _ = tiny_qwen
    with pytest.raises(ValueError, match="position mode"):
        with hiprune.apply(model, hiprune.build_method("none"), positions="dense"):
            pass
    with pytest.raises(ValueError, match="no option"):
        with hiprune.apply(model, hiprune.build_method("none"), colour="red"):
            pass
    with pytest.raises(ValueError, match="position mode"):
        Qwen25VLAdapter(model, positions="dense")


# --- batching, methods, restore ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options", [
    ("none", {}),
    ("random", {"budget": 0.334, "seed": 3}),
    ("hiprune", {"budget": 0.334, "object_layer": OBJECT_LAYER}),
    ("hiprune_pp", {"budget": 0.334, "object_layer": OBJECT_LAYER}),
])
def test_batch_of_two_sizes_equals_singles(tiny_qwen, images, name, options):
    model, processor = tiny_qwen
    method = hiprune.build_method(name, **options)
    with hiprune.apply(model, method, processor) as session:
        if method.needs_prompt:
            session.set_prompts(QUESTIONS)
        batched = _generate(model, _batch(processor, images, QUESTIONS))
        kept_batched = [g.indices for g in session.pop_records()[0]]
        for i, (image, question) in enumerate(zip(images, QUESTIONS)):
            if method.needs_prompt:
                session.set_prompts([question])
            single = _generate(model, _batch(processor, [image], [question]))[0]
            [record] = session.pop_records()[0]
            assert torch.equal(single, batched[i])
            if record.indices is not None:
                assert torch.equal(record.indices, kept_batched[i])
            else:
                assert kept_batched[i] is None


def test_none_is_bit_identical_to_the_plain_model(tiny_qwen, images):
    model, processor = tiny_qwen
    batch = _batch(processor, images, QUESTIONS)
    with torch.no_grad():
        plain = model(**batch).logits
    with hiprune.apply(model, hiprune.build_method("none"), processor), torch.no_grad():
        assert torch.equal(model(**_batch(processor, images, QUESTIONS)).logits, plain)


def test_apply_restores_model_and_processor_exactly(tiny_qwen, images):
    model, processor = tiny_qwen
    batch = _batch(processor, images, QUESTIONS)
    with torch.no_grad():
        before = model(**batch).logits
    block = model.model.visual.blocks[OBJECT_LAYER - 1].attn
    config = block.config
    method = hiprune.build_method("hiprune", budget=0.112, object_layer=OBJECT_LAYER)
    with pytest.raises(RuntimeError, match="boom"), hiprune.apply(model, method, processor):
        assert {"get_image_features", "get_rope_index", "forward"} <= set(vars(model.model))
        assert "replace_image_token" in vars(processor)
        raise RuntimeError("boom")
    assert not {"get_image_features", "get_rope_index", "forward", "get_video_features"} & set(vars(model.model))
    assert "replace_image_token" not in vars(processor)
    assert block.config is config
    after = _batch(processor, images, QUESTIONS)
    assert torch.equal(after["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**after).logits, before)


def test_impossible_settings_fail_clearly(tiny_qwen, images):
    model, processor = tiny_qwen
    build = hiprune.build_method
    with pytest.raises(ValueError, match="layers 1..8"), hiprune.apply(model, build("hiprune", budget=0.334)):
        pass  # HiPrune's default object layer 9 (CLIP) does not exist in the 8-block tiny tower
    pp = build("hiprune_pp", budget=0.334, object_layer=OBJECT_LAYER)
    with pytest.raises(ValueError, match="no prompt encoder"), hiprune.apply(model, pp, processor, object()):
        pass
    with pytest.raises(ValueError, match="pass the processor"), hiprune.apply(model, pp):
        pass
    with hiprune.apply(model, build("hiprune", budget=20, object_layer=OBJECT_LAYER), processor), \
            pytest.raises(ValueError, match="has only 15 .*15 merged tokens, patch grid"):
        _batch(processor, images, QUESTIONS)  # the second image has 15 tokens
    assert "forward" not in vars(model.model)
    with hiprune.apply(model, build("hiprune", budget=0.334, object_layer=OBJECT_LAYER)), torch.no_grad(), \
            pytest.raises(PruningError, match="placeholder tokens but 8 kept"):
        model(**_batch(processor, images, QUESTIONS))  # full placeholder count: the processor was not patched


def test_fetch_image_copy_matches_qwen_vl_utils(images):
    from eval.lmms import qwen2_5_vl as lq

    qwen_vl_utils = pytest.importorskip("qwen_vl_utils")
    element = {"image": images[0], "min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}
    ours = lq.smart_resize(500, 300, 28, 200704, 1605632), lq.smart_resize(50, 3000, 28, 3136, 200704)
    theirs = qwen_vl_utils.smart_resize(500, 300, 28, 200704, 1605632), qwen_vl_utils.smart_resize(50, 3000, 28, 3136, 200704)
    assert ours == theirs
    assert lq.fetch_image(element).size == qwen_vl_utils.fetch_image(element).size


@pytest.mark.filterwarnings("ignore:Passing `min_pixels`:FutureWarning")  # lmms-eval's way of loading the processor
def test_lmms_inputs_match_lmms_eval_qwen2_5_vl(tiny_qwen_dir, images):
    """Prompt, resize and pixels exactly as lmms-eval 0.7.3's qwen2_5_vl builds them (method none: full counts)."""
    process_vision_info = pytest.importorskip("qwen_vl_utils").process_vision_info
    from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url
    from transformers import AutoProcessor

    from eval.lmms.qwen2_5_vl import HiPruneQwen25VL

    limits = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}
    # lmms-eval 0.7.3's data URLs are JPEG quality 85 (the harness's default is the authors' 75: test below)
    model = HiPruneQwen25VL(pretrained=str(tiny_qwen_dir), method="none", device="cpu", jpeg_quality=85, **limits)
    try:
        contexts = [f"<image>{q}" for q in QUESTIONS]
        ours, expected = model.build_inputs(contexts, [[im] for im in images])
    finally:
        model.close()
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir, **limits)  # as lmms-eval loads it
    messages = [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": [
             {"type": "image", "image": encode_image_to_data_url(im, image_format="JPEG", mime_type="image/jpeg",
                                                                 convert_rgb=True, quality=85), **limits},
             {"type": "text", "text": q}]}]
        for im, q in zip(images, QUESTIONS)
    ]
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, _ = process_vision_info(messages)
    theirs = processor(text=texts, images=image_inputs, padding=True, padding_side="left", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    assert expected == [[_merged(g)] for g in theirs["image_grid_thw"]]


def test_default_jpeg_round_trip_is_pil_default_quality_75(tiny_qwen_dir, images):
    """The authors' lmms-eval copy saves each image with PIL's default JPEG quality (75) before the processor."""
    from eval.lmms import qwen2_5_vl as lq

    assert lq.HiPruneQwen25VL.loading_options["jpeg_quality"] == 75
    limits = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}
    model = lq.HiPruneQwen25VL(pretrained=str(tiny_qwen_dir), method="none", device="cpu", **limits)
    try:
        assert model.settings["jpeg_quality"] == 75
        for image in images:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG")  # PIL's default quality, as the authors' copy
            buffer.seek(0)
            reference = lq.fetch_image({"image": Image.open(buffer), **limits}, model.patch_size, model.merge_size)
            ours = model.prepare_image(image)
            assert ours.size == reference.size
            assert np.array_equal(np.asarray(ours), np.asarray(reference))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=85)
            buffer.seek(0)
            at_85 = lq.fetch_image({"image": Image.open(buffer), **limits}, model.patch_size, model.merge_size)
            assert not np.array_equal(np.asarray(ours), np.asarray(at_85))  # the quality is not a no-op here
    finally:
        model.close()


def test_generation_defaults_match_lmms_eval_qwen2_5_vl(tiny_qwen_dir):
    """128 new tokens unless the task or model_args say otherwise; "\\n\\n" never stops an answer; the end-of-text token
    is the default stop; answers are cut at each stop string in turn and not stripped (lmms-eval's qwen2_5_vl)."""
    from eval.lmms.qwen2_5_vl import HiPruneQwen25VL

    model = HiPruneQwen25VL(pretrained=str(tiny_qwen_dir), method="none", device="cpu")
    try:
        assert model.max_new_tokens == 128
        eos = model.tokenizer.decode(model.tokenizer.eos_token_id)
        answers = [" A\n\nB", f"yes{eos}no", "x Q: y\nz"]
        assert model.finish_answers(answers, ["\n\n"]) == answers
        assert model.finish_answers(answers, None) == [" A\n\nB", "yes", "x Q: y\nz"]
        assert model.finish_answers(answers, ["Q:", "\n", ""]) == [" A", f"yes{eos}no", "x "]

        seen = {}
        generate = model._model.generate

        def recording_generate(**kwargs):
            seen.update(kwargs)
            return generate(**kwargs)

        model._model.generate = recording_generate
        model._generate_batch(["Say something."], {"until": ["\n\n"]}, [None], [0], "t", "s")
        assert seen["max_new_tokens"] == 128
        model._generate_batch(["Say something."], {"max_new_tokens": 3}, [None], [0], "t", "s")
        assert seen["max_new_tokens"] == 3
    finally:
        model.close()
    model = HiPruneQwen25VL(pretrained=str(tiny_qwen_dir), method="none", device="cpu", max_new_tokens=1024)
    try:
        assert model.max_new_tokens == 1024  # model_args still set the default
    finally:
        model.close()


# --- lmms-eval ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["hiprune", "hiprune_pp"])
def test_lmms_eval_cli_runs_registered_qwen_model_on_local_task(tmp_path, tiny_qwen_dir, smoke_task_dir, method):
    from lmms_eval.models import get_model

    from eval.lmms.qwen2_5_vl import HiPruneQwen25VL

    assert get_model("hiprune_qwen2_5_vl") is HiPruneQwen25VL
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "hiprune_qwen2_5_vl",
        "--model_args", f"pretrained={tiny_qwen_dir},method={method},budget=0.334,object_layer=4,device=cpu",
        "--tasks", "hiprune_smoke_pope", "--include_path", str(REPO / "eval" / "tasks"),
        "--limit", "4", "--batch_size", "2", "--output_path", str(tmp_path), "--log_samples",
    ]
    done = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [results_file] = list(tmp_path.rglob("*_results.json"))
    results = json.loads(results_file.read_text())["results"]["hiprune_smoke_pope"]
    assert 0.0 <= results["pope_accuracy,none"] <= 1.0
    assert "pope_f1_score,none" in results
    [samples_file] = list(tmp_path.rglob("*_samples_hiprune_smoke_pope.jsonl"))
    answers = [json.loads(line)["filtered_resps"] for line in samples_file.read_text().splitlines()]
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    assert len(answers) == 4 and set(answers) <= {"yes", "no"}  # the tiny model's answer head, through the pruned LLM


def test_cls_attention_pattern_is_impossible_without_a_cls_token(tiny_qwen):
    model, _ = tiny_qwen
    with pytest.raises(ValueError, match="has none"):
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=0.334, object_layer=4, attention="cls")):
            pass
