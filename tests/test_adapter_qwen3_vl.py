"""Qwen3-VL adapter: per-image ratio budgets, the LLM gets exactly the kept tokens with their own DeepStack features and
their unpruned M-RoPE positions, keeping everything equals the unpruned model, refusals before patching, the
object-layer probe on the merged grid, and an lmms-eval run."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_refused_before_patching,
    assert_run_config_refused,
    built,
    chat_batch,
    loaded,
    run_smoke_pope,
    shape_image,
)

import hiprune
from eval.config import compose_config
from eval.running.methods import build_from_config
from hiprune.methods.visionzip import qwen_split

QUESTION = "Is there a red circle?"


@pytest.fixture(scope="module")
def tiny_q3():
    return (*loaded("qwen3_vl"), built("qwen3_vl"))


def test_llm_receives_the_kept_tokens_their_deepstack_features_and_positions(tiny_q3):
    model, processor, _ = tiny_q3
    images = [shape_image(130, 100, 1), shape_image(100, 170, 2)]  # merged grids of different sizes: one budget each
    unpruned = chat_batch(processor, images)
    with torch.no_grad():
        reference = model.model.get_image_features(unpruned["pixel_values"], unpruned["image_grid_thw"])
        positions, _ = model.model.get_rope_index(unpruned["input_ids"], unpruned["mm_token_type_ids"],
                                                  unpruned["image_grid_thw"], attention_mask=unpruned["attention_mask"])
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    method = hiprune.build_method("hiprune", budget=0.5, object_layer=3)
    try:
        with hiprune.apply(model, method, processor) as session, torch.no_grad():
            batch = chat_batch(processor, images)
            model(**batch)
            [records] = session.pop_records()
    finally:
        hook.remove()
    sizes = [int(g.prod()) // 4 for g in unpruned["image_grid_thw"]]
    assert [r.tokens_in for r in records] == sizes
    assert [r.tokens_kept for r in records] == [round(n * 0.5) for n in sizes]
    kept = [r.indices for r in records]
    [call] = seen
    mask = call["visual_pos_masks"]
    assert torch.equal(mask, batch["input_ids"] == model.config.image_token_id)
    expected = torch.cat([features[index] for features, index in zip(reference.pooler_output, kept)])
    torch.testing.assert_close(call["inputs_embeds"][mask], expected, rtol=0, atol=1e-6)
    assert len(call["deepstack_visual_embeds"]) == len(reference.deepstack_features) == 3
    for got, layer in zip(call["deepstack_visual_embeds"], reference.deepstack_features):
        torch.testing.assert_close(got, torch.cat([f[index] for f, index in zip(layer, kept)]), rtol=0, atol=1e-6)
    # kept tokens at their unpruned M-RoPE positions; the text after each image where it is without pruning
    image_ids = unpruned["input_ids"] == model.config.image_token_id
    for row in range(2):
        full = positions[:, row][:, image_ids[row]]
        assert torch.equal(call["position_ids"][-3:, row][:, mask[row]], full[:, kept[row]])
        assert torch.equal(call["position_ids"][-3:, row, -1], positions[:, row, -1])


def test_keeping_every_token_generates_like_the_unpruned_model(tiny_q3):
    model, processor, _ = tiny_q3
    images = [shape_image(100, 170, 2)]
    with torch.no_grad():
        plain = model.generate(**chat_batch(processor, images), max_new_tokens=3, do_sample=False)
        with hiprune.apply(model, hiprune.build_method("random", budget=1.0), processor):
            pruned = model.generate(**chat_batch(processor, images), max_new_tokens=3, do_sample=False)
    assert torch.equal(plain, pruned)
    assert "get_image_features" not in vars(model.model) and "get_video_features" not in vars(model.model)


@pytest.mark.parametrize("name, options, message", [
    ("fastervlm", {}, "CLS token's attention; the qwen3_vl encoder has none"),
    ("trim", {}, "CLIP text tower"),
    ("tome", {}, "DeepStack mergers"),
    ("sparsevlm", {"budget": 0.334, "layers": [0, 1, 2]}, "a recycled token stands for several dropped ones"),
    ("hiprune", {"object_layer": 9}, "layers 1..8"),
])
def test_impossible_settings_are_refused_before_patching(tiny_q3, name, options, message):
    model, processor, _ = tiny_q3
    assert_refused_before_patching(model, processor, hiprune.build_method(name, **{"budget": 0.5, **options}), message)


def test_refusals_come_before_loading_in_a_run_config():
    assert_run_config_refused(["model=tiny_qwen3vl", "method=trim", "budget=0.5", "benchmark=smoke_pope"],
                              "CLIP text tower")
    assert_run_config_refused(["model=tiny_qwen3vl", "method=sparsevlm", "budget=0.334", "benchmark=smoke_pope",
                               "method.options.layers=[0,1,2]"], "recycled token")  # inside the DeepStack layers


def test_model_config_runs_the_global_attention_ports(tiny_q3):
    """No CLS token: the model config's cls_free_scores=global gives VisPruner and VisionZip their global-attention
    ports (as on Qwen2.5-VL), which run on every image's merged grid."""
    model, processor, _ = tiny_q3
    image = shape_image(130, 100, 1)
    n = int(chat_batch(processor, [image])["image_grid_thw"].prod()) // 4
    for name, option, expected in [("vispruner", "attention", round(0.25 * n)),
                                   ("visionzip", "variant", sum(qwen_split(0.25, n)))]:
        cfg = compose_config(["model=tiny_qwen3vl", f"method={name}", "budget=0.25", "benchmark=smoke_pope"])
        assert cfg.method.options[option] == "global"
        method = build_from_config(cfg.method, cfg.budget)
        with hiprune.apply(model, method, processor) as session, torch.no_grad():
            model(**chat_batch(processor, [image]))
            [records] = session.pop_records()
        assert [r.tokens_kept for r in records] == [expected], name


def test_object_layer_probe_reads_the_merged_grid(tiny_q3):
    """Every image resized to side x side px: (side / 32)^2 merged tokens; a mask covering the whole (unpadded) image
    holds every token, so each layer's top-k set has IoU k / n with it."""
    from PIL import Image

    from eval.report.probe import probe

    model, processor, _ = tiny_q3
    images = [shape_image(300, 200, 1), shape_image(150, 220, 2)]
    masks = [Image.new("L", image.size, 255) for image in images]
    result = probe(model, processor, images, top=0.1, masks=masks, side=256)
    assert result.grid == (8, 8) and result.layers == list(range(1, 9)) and result.top_k == 6
    assert result.mask_iou == pytest.approx([6 / 64] * 8)
    assert all(value > 0 for value in result.dispersion) and 1 <= result.suggested_layer <= 8
    assert all(row[i] == pytest.approx(1.0) for i, row in enumerate(result.overlap))
    with pytest.raises(ValueError, match="multiple of Qwen3-VL's 32-px merged token"):
        probe(model, processor, images, side=250)


@pytest.mark.slow
def test_lmms_eval_runs_the_registered_model_on_the_local_task(tiny_q3, smoke_task_dir):
    from lmms_eval.models import get_model

    from eval.lmms.qwen3_vl import HiPruneQwen3VL

    _, _, path = tiny_q3
    cls = get_model("hiprune_qwen3_vl")
    assert cls is HiPruneQwen3VL
    lmm = cls(pretrained=str(path), method="hiprune", budget=0.25, object_layer=3, device="cpu", batch_size=2,
              min_pixels=64 * 64, max_pixels=256 * 256)
    kept = run_smoke_pope(lmm, limit=2, batch_size=2)
    assert len(kept) == 2 and all(len(per_image) == 1 and per_image[0] >= 1 for per_image in kept.values())
    assert lmm.settings["jpeg_quality"] == 0
