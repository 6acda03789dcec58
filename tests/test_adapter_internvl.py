"""InternVL3 adapter: every 448-px tile pruned on its 16 x 16 pixel-shuffled grid (a ratio of every tile, or an int
budget per image split int(N' / tiles) over its tiles), scores as the mean over each token's 2 x 2 patches in the pixel
shuffle's order, the LLM gets exactly the kept tokens between <img> and </img>, tiles mapped to their images (HiPrune++
compares each with its own image's prompt; inputs from another processor call are refused), refusals before patching,
the object-layer probe on one tile per image, and lmms-eval runs."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_refused_before_patching,
    assert_run_config_refused,
    built,
    chat_batch,
    llm_inputs,
    loaded,
    run_smoke_pope,
    shape_image,
)

import hiprune
from hiprune.adapters.base import PruningError

# (width, height) -> tiles of the tiny processor (max_patches 12): 1 tile; 2 x 1 tiles + the thumbnail; 3 x 1 + thumbnail
ONE_TILE, THREE_TILES, FOUR_TILES = (320, 300), (600, 300), (900, 300)


@pytest.fixture(scope="module")
def tiny_iv():
    return (*loaded("internvl"), built("internvl"))


def _pruned_forward(tiny_iv, images, method, then=None):
    """One forward of ``images`` under ``method`` (``then(model, batch, session, records)`` inside the session);
    checks that the LLM got exactly every tile's kept tokens and returns (batch, records)."""
    model, processor, _ = tiny_iv
    with torch.no_grad():
        reference = model.model.get_image_features(chat_batch(processor, images)["pixel_values"]).pooler_output
    seen, hook = llm_inputs(model)
    try:
        with hiprune.apply(model, method, processor) as session, torch.no_grad():
            batch = chat_batch(processor, images)
            model(**batch)
            [records] = session.pop_records()
            if then is not None:
                then(model, batch, session, records)
    finally:
        hook.remove()
    got = seen[0][batch["input_ids"] == processor.image_token_id]
    expected = torch.cat([reference[t][r.indices] for t, r in enumerate(records)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    return batch, records


def test_llm_receives_exactly_the_kept_tokens_of_every_tile(tiny_iv):
    model, processor, _ = tiny_iv
    images = [shape_image(320, 300, 1), shape_image(600, 300, 2)]  # 1 tile; 2 tiles + the thumbnail
    batch, records = _pruned_forward(tiny_iv, images, hiprune.build_method("hiprune", budget=0.25, object_layer=3))
    assert [r.tokens_kept for r in records] == [64] * 4 and [r.tokens_in for r in records] == [256] * 4
    ids = batch["input_ids"]
    assert (ids == processor.image_token_id).sum(1).tolist() == [64, 192]
    assert ((ids == processor.start_image_token_id).sum(1) == 1).all()  # <img> ... </img> kept around the tokens
    assert "get_image_features" not in vars(model.model) and "replace_image_token" not in vars(processor)


def test_scores_are_means_over_the_pixel_shuffle_blocks(tiny_iv):
    """Captured states: the mean of a token's 4 patch states equals the mean of the 4 channel blocks that the
    pixel shuffle concatenated into that token (whatever their channel order)."""
    model, _, _ = tiny_iv
    adapter = hiprune.adapter_for(model)
    hidden = torch.randn(2, 1 + 32 * 32, 8)
    merged = adapter.merged_captures({"h": hidden}, 2)["h"]  # [2, 256, 8]
    shuffled = model.model.pixel_shuffle(hidden[:, 1:].reshape(2, 32, 32, 8)).reshape(2, 256, 4, 8)
    torch.testing.assert_close(merged, shuffled.mean(dim=2))


def test_an_int_budget_is_split_over_each_images_tiles(tiny_iv):
    """N' = 64 per image, int(64 / tiles) per tile (LLaVA-NeXT's official per-crop rule): 64; 3 x 21; 4 x 16 -- the
    processor's placeholders, the records and the LLM's input agree, tile by tile."""
    _, processor, _ = tiny_iv
    images = [shape_image(*size, seed) for seed, size in enumerate([ONE_TILE, THREE_TILES, FOUR_TILES])]

    def beam_search(model, batch, session, records):
        # generate() repeats every sample's row and encoder outputs; the input_ids check follows
        model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False)
        assert [r.tokens_kept for r in session.pop_records()[0]] == [r.tokens_kept for r in records]

    batch, records = _pruned_forward(tiny_iv, images, hiprune.build_method("hiprune", budget=64, object_layer=3),
                                     beam_search)
    assert [r.tokens_kept for r in records] == [64] + [21] * 3 + [16] * 4
    assert [r.tokens_in for r in records] == [256] * 8
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [64, 63, 64]


def test_inputs_of_another_processor_call_are_refused(tiny_iv):
    """The tile -> image map is the processor's last call: inputs it did not make fail, naming what differs."""
    model, processor, _ = tiny_iv
    one, three = shape_image(*ONE_TILE, 0), shape_image(*THREE_TILES, 1)
    with hiprune.apply(model, hiprune.build_method("hiprune", budget=64, object_layer=3), processor), torch.no_grad():
        batch = chat_batch(processor, [one, three])
        chat_batch(processor, [three])  # a later call: 3 tiles in all
        with pytest.raises(PruningError, match=r"cut 1 images into \[3\] tiles .* but the encoder got 4 tiles"):
            model(**batch)
        chat_batch(processor, [three, one])  # the same 4 tiles, the other way round
        with pytest.raises(PruningError, match="image 0: 64 image tokens in input_ids, but its 3 tiles pass 63"):
            model(**batch)
        with pytest.raises(PruningError, match="image 0: 64 image tokens"):  # generate() encodes before the forward
            model.generate(**batch, max_new_tokens=1)


def _prompted_batch(processor, images, questions):
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                            "text": q}]}],
                                           add_generation_prompt=True) for q in questions]
    return processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")


def test_hiprune_pp_compares_every_tile_with_its_own_images_prompt(tiny_iv):
    """Two images with different prompts in one batch: every tile keeps what it keeps when its image runs alone with
    its own prompt, and swapping the prompts changes the selection (the prompt matters)."""
    model, processor, _ = tiny_iv
    images = [shape_image(*ONE_TILE, 0), shape_image(*THREE_TILES, 1)]
    prompts = ["Is there a red circle?", "What colour is the large square in the corner?"]
    method = hiprune.build_method("hiprune_pp", budget=48, object_layer=3)

    def kept(imgs, qs):
        with hiprune.apply(model, method, processor) as session, torch.no_grad():
            session.set_prompts(qs)
            model.model.get_image_features(_prompted_batch(processor, imgs, qs)["pixel_values"])  # the encoder only
            [records] = session.pop_records()
        return [r.indices.tolist() for r in records]

    together = kept(images, prompts)
    assert [len(k) for k in together] == [48] + [16] * 3
    assert together == kept(images[:1], prompts[:1]) + kept(images[1:], prompts[1:])
    assert kept(images, prompts[::-1]) != together


@pytest.mark.parametrize("name, options, message", [
    ("hiprune", {"budget": 8, "object_layer": 3}, r"int\(8 / 13 tiles\) = 0 tokens per tile"),
    ("hiprune", {"budget": 300, "object_layer": 3}, "asks for 300 tokens but the image has only 256"),
    ("trim", {"budget": 0.25}, "CLIP text tower"),
    ("visionzip", {"budget": 0.25}, "does not lay out yet"),
    ("tome", {"budget": 0.25}, "pixel shuffle"),
    ("fastv", {"budget": 300}, "the image has only 256"),  # checked on a one-tile image
    ("hiprune", {"budget": 0.25}, "layers 1..8"),
])
def test_impossible_settings_are_refused_before_patching(tiny_iv, name, options, message):
    model, processor, _ = tiny_iv
    assert_refused_before_patching(model, processor, hiprune.build_method(name, **options), message)


def test_an_int_budget_is_checked_on_the_most_tiled_image_before_loading():
    """model.max_patches=12: 12 tiles + the thumbnail; an int budget below 13 leaves a tile nothing."""
    assert_run_config_refused(["model=tiny_internvl3", "method=hiprune", "budget=8", "benchmark=smoke_pope"],
                              r"int\(8 / 13 tiles\)")


def test_pruning_needs_each_images_tile_count(tiny_iv):
    """Without the processor passed to apply, an encoder call fails naming the missing tile counts, unless the caller
    gives them (expect_tiles, from the image processor's num_patches)."""
    model, processor, _ = tiny_iv
    pixels = processor.image_processor([shape_image(600, 300, 1)], return_tensors="pt")
    with hiprune.apply(model, hiprune.build_method("random", budget=0.25)) as session, torch.no_grad():
        with pytest.raises(hiprune.PruningError, match="no processor call recorded"):
            model.model.get_image_features(pixels["pixel_values"])
        session.adapter.expect_tiles(pixels["num_patches"])
        out = model.model.get_image_features(pixels["pixel_values"])
        assert out.pooler_output.shape[:2] == (int(pixels["num_patches"][0]), 64)
    assert "get_image_features" not in vars(model.model) and "forward" not in vars(model.model)


def test_object_layer_probe_reads_one_tile_per_image(tiny_iv):
    """Every image as one 448-px tile (no padding): its 16 x 16 pixel-shuffled grid; a mask covering the whole image
    holds every token, so each layer's top-k set has IoU k / n with it."""
    from PIL import Image

    from eval.report.probe import probe

    model, processor, _ = tiny_iv
    images = [shape_image(*THREE_TILES, 1), shape_image(*ONE_TILE, 2)]
    masks = [Image.new("L", image.size, 255) for image in images]
    result = probe(model, processor, images, top=0.1, masks=masks)
    assert result.grid == (16, 16) and result.layers == list(range(1, 9)) and result.top_k == 25
    assert result.mask_iou == pytest.approx([25 / 256] * 8)
    assert all(value > 0 for value in result.dispersion) and 1 <= result.suggested_layer <= 8
    assert "448-px tile" in result.encoder_input


@pytest.mark.slow
def test_lmms_eval_runs_the_registered_model_on_the_local_task(tiny_iv, smoke_task_dir):
    from lmms_eval.models import get_model

    from eval.lmms.internvl import HiPruneInternVL

    _, _, path = tiny_iv
    cls = get_model("hiprune_internvl")
    assert cls is HiPruneInternVL
    lmm = cls(pretrained=str(path), method="fastervlm", budget=0.125, device="cpu", batch_size=2, max_patches=2)
    kept = run_smoke_pope(lmm, limit=2, batch_size=2)
    assert len(kept) == 2 and all(per_tile and set(per_tile) == {32} for per_tile in kept.values())


@pytest.mark.slow
def test_lmms_eval_runs_hiprune_pp_with_an_int_budget(tiny_iv, smoke_task_dir):
    """HiPrune++ through lmms-eval: each sample's question is its images' prompt; N' = 60 per image, int(60 / tiles)
    per tile (max_patches=2: 1 tile, or 2 + the thumbnail)."""
    from eval.lmms.internvl import HiPruneInternVL

    _, _, path = tiny_iv
    lmm = HiPruneInternVL(pretrained=str(path), method="hiprune_pp", budget=60, object_layer=3, device="cpu",
                          batch_size=2, max_patches=2, max_new_tokens=1)
    kept = run_smoke_pope(lmm, limit=2, batch_size=2)
    assert len(kept) == 2 and all(per_tile in ([60], [20] * 3) for per_tile in kept.values()), kept
