"""InternVL3 adapter: every 448-px tile pruned on its 16 x 16 pixel-shuffled grid with a ratio budget, scores as the mean
over each token's 2 x 2 patches in the pixel shuffle's order, the LLM gets exactly the kept tokens between <img> and
</img>, refusals before patching, and an lmms-eval run."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_refused_before_patching,
    built,
    chat_batch,
    llm_inputs,
    loaded,
    run_smoke_pope,
    shape_image,
)

import hiprune


@pytest.fixture(scope="module")
def tiny_iv():
    return (*loaded("internvl"), built("internvl"))


def test_llm_receives_exactly_the_kept_tokens_of_every_tile(tiny_iv):
    model, processor, _ = tiny_iv
    images = [shape_image(320, 300, 1), shape_image(600, 300, 2)]  # 1 tile; 2 tiles + the thumbnail
    with torch.no_grad():
        reference = model.model.get_image_features(chat_batch(processor, images)["pixel_values"]).pooler_output
    seen, hook = llm_inputs(model)
    try:
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=0.25, object_layer=3), processor) as session, \
                torch.no_grad():
            batch = chat_batch(processor, images)
            model(**batch)
            [records] = session.pop_records()
    finally:
        hook.remove()
    assert [r.tokens_kept for r in records] == [64] * 4 and [r.tokens_in for r in records] == [256] * 4
    ids = batch["input_ids"]
    assert (ids == processor.image_token_id).sum(1).tolist() == [64, 192]
    assert ((ids == processor.start_image_token_id).sum(1) == 1).all()  # <img> ... </img> kept around the tokens
    got = seen[0][ids == processor.image_token_id]
    expected = torch.cat([reference[t][r.indices] for t, r in enumerate(records)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
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


@pytest.mark.parametrize("name, options, message", [
    ("hiprune", {"budget": 64, "object_layer": 3}, "ratio of every tile"),
    ("hiprune_pp", {"budget": 0.25, "object_layer": 3}, "which image \\(prompt\\) a tile belongs to"),
    ("visionzip", {"budget": 0.25}, "does not lay out yet"),
    ("tome", {"budget": 0.25}, "pixel shuffle"),
    ("fastv", {"budget": 300}, "the image has only 256"),  # checked on a one-tile image
    ("hiprune", {"budget": 0.25}, "layers 1..8"),
])
def test_impossible_settings_are_refused_before_patching(tiny_iv, name, options, message):
    model, processor, _ = tiny_iv
    assert_refused_before_patching(model, processor, hiprune.build_method(name, **options), message)


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
