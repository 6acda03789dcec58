"""LLaVA-OneVision adapter (SigLIP, no CLS, anyres_max crops): per-crop budgets in the 'spatial' layout, the LLM gets
exactly the kept tokens, HF's native layout (anyres_max downsampling) counted exactly for method none, multi-image
samples (one padded crop per image, the image's whole budget), refusals before patching (CLS methods, TRIM's CLIP
text tower, LLM-side methods, pruning in the native layout), and lmms-eval runs."""

from __future__ import annotations

import pytest
import torch

import hiprune
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
from eval.config import compose_config
from eval.running.methods import build_from_config

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


def test_model_config_runs_vispruners_global_port(tiny_ov):
    """No CLS token: the model config's cls_free_scores=global gives VisPruner its global-attention port (every crop:
    round(729 x 0.25)); VisionZip's port, which sets each grid's budget by its own rule, stays refused on crops."""
    model, processor, _ = tiny_ov
    image = shape_image(420, 300, 1)
    cfg = compose_config(["model=tiny_llava_onevision", "method=vispruner", "budget=0.25", "benchmark=smoke_pope"])
    assert cfg.method.options.attention == "global"
    with hiprune.apply(model, build_from_config(cfg.method, cfg.budget), processor) as session, torch.no_grad():
        batch = chat_batch(processor, [image])
        model(**batch)
        [records] = session.pop_records()
    assert [r.tokens_kept for r in records] == [182] * len(records) and len(records) > 1
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 182 * len(records)
    assert_run_config_refused(["model=tiny_llava_onevision", "method=visionzip", "budget=0.25",
                               "benchmark=smoke_pope"], "own rule")


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


PROMPT_TWO = "<|im_start|>user\n<image> <image>\nWhich one is larger?<|im_end|>\n<|im_start|>assistant\n"


def _multi_image_batch(processor, images):
    """[[a, b], [c]]: a two-image sample and a one-image sample (HF's batch_num_images [2, 1])."""
    return processor(text=[PROMPT_TWO, PROMPT], images=images, return_tensors="pt", padding=True)


def test_multi_image_samples_prune_one_padded_crop_per_image(tiny_ov):
    """Each image of a multi-image sample is one 384-px crop (padded to a square, no anyres crops) keeping the image's
    whole budget, without a newline token; the one-image sample keeps its per-crop rule."""
    model, processor, _ = tiny_ov
    images = [[shape_image(700, 300, 1), shape_image(300, 500, 2)], [shape_image(300, 120, 3)]]
    seen, hook = llm_inputs(model)
    try:
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=64), processor) as session, torch.no_grad():
            batch = _multi_image_batch(processor, images)
            model(**batch)
            [records] = session.pop_records()
    finally:
        hook.remove()
    assert batch["batch_num_images"].tolist() == [2, 1]
    assert [r.tokens_kept for r in records] == [64, 64, 32, 32]  # N' per image; int(64 / 2 crops) per crop
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [128, 64]
    with torch.no_grad():  # the two images' single crops, encoded directly
        crops = batch["pixel_values"][:2, 0]
        hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states[-1]
        features = model.model.multi_modal_projector(hidden)
    got = seen[0][0][batch["input_ids"][0] == processor.image_token_id]
    expected = torch.cat([features[0][records[0].indices], features[1][records[1].indices]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_multi_image_samples_in_the_native_layout_count_like_hf(tiny_ov):
    """Method none, native layout: HF's own multi-image layout (729 tokens + one newline per image), as an unpatched
    processor emits it and the encoder packs it."""
    model, processor, _ = tiny_ov
    images = [[shape_image(700, 300, 1), shape_image(300, 500, 2)], [shape_image(300, 120, 3)]]
    plain = _multi_image_batch(processor, images)
    with hiprune.apply(model, hiprune.build_method("none"), processor, layout="native") as session, torch.no_grad():
        batch = _multi_image_batch(processor, images)
        packed = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                batch_num_images=batch["batch_num_images"]).pooler_output
        [records] = session.pop_records()
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    counts = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert [len(image) for image in packed][:2] == [729 + 1] * 2 and counts[0] == 2 * (729 + 1)
    assert len(packed[2]) == counts[1]
    assert [r.tokens_in for r in records][:2] == [729, 729]


def test_lmms_model_answers_a_two_image_doc(tiny_ov, monkeypatch):
    """Through the lmms-eval model's generate_until (lmms-eval passes a doc's visuals as a list): a two-image doc and a
    one-image doc in one batch, HiPrune++ with N' = 64 per image; the records say what the LLM's input held."""
    from lmms_eval.api.instance import Instance
    from transformers import LlavaOnevisionForConditionalGeneration

    from eval.lmms.llava_onevision import HiPruneLlavaOnevision

    model, _, path = tiny_ov  # the lmms-eval model loads the conftest's copy, so the hook sees the LLM's input
    monkeypatch.setattr(LlavaOnevisionForConditionalGeneration, "from_pretrained",
                        classmethod(lambda klass, *args, **kwargs: model))
    docs = [{"visuals": [shape_image(700, 300, 1), shape_image(300, 500, 2)], "question": "Which one is larger?"},
            {"visuals": [shape_image(300, 120, 3)], "question": "Is there a red circle?"}]
    counts = []

    def count(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            counts.extend((kwargs["input_ids"] == model.config.image_token_id).sum(1).tolist())

    hook = model.model.register_forward_pre_hook(count, with_kwargs=True)
    lmm = HiPruneLlavaOnevision(pretrained=str(path), method="hiprune_pp", budget=64, device="cpu", batch_size=2)
    lmm.task_dict = {"probe": {"test": dict(enumerate(docs))}}
    requests = [Instance("generate_until", (doc["question"], {"max_new_tokens": 1}, lambda d: d["visuals"], i,
                                            "probe", "test"), idx=0, metadata={"task": "probe", "doc_id": i,
                                                                               "repeats": 1})
                for i, doc in enumerate(docs)]
    try:
        answers = lmm.generate_until(requests)
    finally:
        hook.remove()
        lmm.close()
    assert len(answers) == 2
    assert lmm.kept_tokens[("probe", "test")] == {0: [64, 64], 1: [32, 32]}
    assert sorted(counts) == [64, 128]
