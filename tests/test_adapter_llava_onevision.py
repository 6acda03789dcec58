"""LLaVA-OneVision adapter (SigLIP, no CLS, anyres_max crops): per-crop budgets in the 'spatial' layout, the LLM gets
exactly the kept tokens, HF's native layout (anyres_max downsampling) counted exactly for method none, refusals
before patching (CLS methods, TRIM's CLIP text tower, LLM-side methods, pruning in the native layout), and an
lmms-eval run."""

from __future__ import annotations

import pytest
import torch

import hiprune
from conftest import (
    assert_refused_before_patching,
    assert_run_config_refused,
    built,
    llm_inputs,
    loaded,
    run_smoke_pope,
    shape_image,
)

SIDE = 27
PROMPT = "<|im_start|>user\n<image>\nIs there a red circle?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny_ov():
    return (*loaded("llava_onevision"), built("llava_onevision"))


def _expected_official(features, records, grid):
    """Base kept tokens, then the kept sub-image tokens sorted by their position in the stitched grid."""
    _, npw = grid
    parts, positions = [], []
    for crop, record in enumerate(records[1:], start=1):
        ci, cj = divmod(crop - 1, npw)
        r, c = record.indices // SIDE, record.indices % SIDE
        positions.append((ci * SIDE + r) * npw * SIDE + cj * SIDE + c)
        parts.append(features[crop][record.indices])
    order = torch.cat(positions).argsort()
    return torch.cat([features[0][records[0].indices], torch.cat(parts)[order]])


def test_llm_receives_exactly_the_kept_tokens_of_every_crop(tiny_ov):
    model, processor, _ = tiny_ov
    images = [shape_image(700, 300, 1), shape_image(300, 120, 2)]  # a 1 x 2 grid (3 crops), a 1 x 1 grid (2 crops)
    seen, hook = llm_inputs(model)
    try:
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=320), processor) as session, torch.no_grad():
            batch = processor(text=[PROMPT] * 2, images=images, return_tensors="pt", padding=True)
            model(**batch)
            [records] = session.pop_records()
    finally:
        hook.remove()
    assert [r.tokens_kept for r in records] == [106] * 3 + [160] * 2  # int(320 / crops) per crop
    assert session.adapter.describe_encoder()["cls"] == "none"
    adapter = session.adapter
    crops = adapter._crops_per_image(batch["pixel_values"], batch["image_sizes"])
    with torch.no_grad():  # every token of the last SigLIP layer ("full"), projected
        hidden = model.model.vision_tower(torch.cat(crops), output_hidden_states=True).hidden_states[-1]
        features = torch.split(model.model.multi_modal_projector(hidden), [len(c) for c in crops])
    for row, (recs, grid) in enumerate([(records[:3], (1, 2)), (records[3:], (1, 1))]):
        got = seen[0][row][batch["input_ids"][row] == processor.image_token_id]
        torch.testing.assert_close(got, _expected_official(features[row], recs, grid), rtol=0, atol=1e-6)
    assert "get_image_features" not in vars(model.model) and "pack_image_features" not in vars(model.model)


def test_ratio_budgets_and_the_native_layout_count_like_hf(tiny_ov):
    model, processor, _ = tiny_ov
    official = hiprune.adapter_for(model)
    assert official.image_layout((660, 700), hiprune.build_method("random", budget=0.25)).kept == [182] * 5
    assert official.tokens_per_image(hiprune.build_method("hiprune", budget=370)) == 370  # 37 crops x 10
    native = hiprune.adapter_for(model, layout="native")
    none = hiprune.build_method("none")
    # 1500 x 1500: a 4 x 4 grid, unpadded 108 x 108 tokens, downsampled (anyres_max_9) to 81 x 81 + 81 newlines
    for size in ((660, 700), (120, 300), (1500, 1500), (400, 2000)):
        hf = processor._get_number_of_features(*size, 384, 384)
        assert native.image_layout(size, none).total == hf, size
    assert native.image_layout((1500, 1500), none).kept == [729, 81 * 81]


@pytest.mark.parametrize("name, options, message", [
    ("fastervlm", {}, "CLS token's attention; the llava_onevision encoder has none"),
    ("visionzip", {}, "CLS token's attention"),
    ("hired", {}, "CLS token's attention"),
    ("trim", {}, "CLIP text tower"),
    ("fastv", {}, "gets HF's own LLaVA-OneVision sequence \\(layout=native\\)"),
    ("hiprune", {"object_layer": 13}, "layers 1..12"),
    ("hiprune", {"budget": 36}, "int\\(36 / 37 crops\\) = 0"),
])
def test_impossible_settings_are_refused_before_patching(tiny_ov, name, options, message):
    model, processor, _ = tiny_ov
    method = hiprune.build_method(name, **{"budget": 64, **options})
    assert_refused_before_patching(model, processor, method, message)
    assert_refused_before_patching(model, processor, hiprune.build_method("random", budget=64), "anyres_max",
                                   layout="native")


def test_refusals_come_before_loading_in_a_run_config():
    assert_run_config_refused(
        ["model=tiny_llava_onevision", "method=fastervlm", "budget=64", "benchmark=smoke_pope"], "CLS token"
    )
    assert_run_config_refused(  # LLM-side methods get HF's own sequence (layout=auto picks it)
        ["model=tiny_llava_onevision", "method=fastv", "budget=0.5", "model.layout=official", "benchmark=smoke_pope"],
        "layout=native"
    )


@pytest.mark.slow
def test_lmms_eval_runs_the_registered_model_on_the_local_task(tiny_ov, smoke_task_dir):
    from lmms_eval.models import get_model

    from eval.lmms.llava_onevision import HiPruneLlavaOnevision

    _, _, path = tiny_ov
    cls = get_model("hiprune_llava_onevision")
    assert cls is HiPruneLlavaOnevision
    lmm = cls(pretrained=str(path), method="hiprune_pp", budget=0.25, device="cpu", batch_size=1)
    assert lmm.settings["layout"] == "official"
    kept = run_smoke_pope(lmm, limit=1, batch_size=1)
    assert len(kept) == 1
    for per_crop in kept.values():  # one entry per crop grid: round(729 * 0.25) each
        assert per_crop == [182] * len(per_crop) and len(per_crop) >= 2


def test_object_layer_probe_reads_the_siglip_base_image(tiny_ov):
    from eval.report.probe import probe

    model, processor, _ = tiny_ov
    result = probe(model, processor, [shape_image(300, 200, 1)], top=0.05,
                   model_cfg={"image_backend": "checkpoint"})
    assert result.grid == (SIDE, SIDE) and result.layers == list(range(1, 13))
    assert result.top_k == int(SIDE * SIDE * 0.05) and len(result.dispersion) == 12
    assert all(value > 0 for value in result.dispersion) and 1 <= result.suggested_layer <= 12


def test_lmms_vanilla_rows_get_the_standard_layout(tiny_ov):
    """layout=auto: method none counts exactly the tokens an unpatched processor emits (unpad + newlines), pruning
    methods the 'spatial' layout."""
    from transformers import AutoProcessor

    from eval.lmms.llava_onevision import HiPruneLlavaOnevision

    _, _, path = tiny_ov
    image = shape_image(700, 300, 1)
    fresh = AutoProcessor.from_pretrained(path)
    standard = fresh(text=[PROMPT], images=[image], return_tensors="pt")
    counts = {}
    for method, options in [("none", {}), ("random", {"budget": 0.25})]:
        lmm = HiPruneLlavaOnevision(pretrained=str(path), method=method, device="cpu", **options)
        try:
            batch, expected = lmm.build_inputs(["Is there a red circle?"], [[image]])
            counts[method] = (lmm.settings["layout"], int((batch["input_ids"] == fresh.image_token_id).sum()), expected)
        finally:
            lmm.close()
    assert counts["none"][:2] == ("native", int((standard["input_ids"] == fresh.image_token_id).sum()))
    assert counts["random"] == ("official", 3 * 182, [[182] * 3])
