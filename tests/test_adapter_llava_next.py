"""LLaVA-NeXT adapter: per-crop budgets and the official 'spatial' layout (base crop, then sub-image tokens in raster
order over the stitched grid), HF's native unpad + newline layout as an option, captured scores equal to an eager
reference, LLM input length, generate, batch invariance, an lmms-eval run, and clear errors."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import run_smoke_pope
from PIL import Image, ImageDraw
from transformers import AutoConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import hiprune
from eval.efficiency.flops import flops_exact
from eval.running.run import flops_summary
from hiprune.adapters.llava_next import resolve_layout, spread_budget
from hiprune.capture import AttentionScores

SIDE = 24
PROMPT = "USER: <image>\nIs there a red circle? ASSISTANT:"


@pytest.fixture(scope="module")
def tiny_next(tiny_llava_next, tiny_llava_next_dir):
    return (*tiny_llava_next, tiny_llava_next_dir)


def _image(width, height, seed):
    image = Image.new("RGB", (width, height), (40 * seed % 255, 120, 200 - 30 * seed))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 8, height // 8, width // 2, height // 2], fill="red")
    draw.rectangle([width // 2, height // 3, width - 4, height - 4], fill="yellow")
    return image


@pytest.fixture(scope="module")
def images():
    """A: square-ish, 2x2 grid (5 crops); B: wide, 1x2 grid (3 crops); C: tall, 2x1 grid (3 crops)."""
    return {"A": _image(700, 660, 1), "B": _image(300, 120, 2), "C": _image(110, 280, 3)}


def _batch(processor, images, prompt=PROMPT):
    return processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True)


def _llm_inputs(model):
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    return seen, hook


def _reference_features(model, pixel_values, image_sizes):
    """Projected features per image [crops, 576, D] and the crops, computed directly from the plain modules."""
    adapter = hiprune.adapter_for(model)
    crops = adapter._crops_per_image(pixel_values, image_sizes)
    flat = torch.cat(crops)
    with torch.no_grad():
        hidden = model.model.vision_tower(flat, output_hidden_states=True).hidden_states[-2][:, 1:]
        projected = model.model.multi_modal_projector(hidden)
    return list(torch.split(projected, [len(c) for c in crops])), flat


def _expected_official(features, records, grid):
    """Base kept tokens, then the kept sub-image tokens sorted by their position in the stitched grid."""
    _, npw = grid
    base = features[0][records[0].indices]
    parts, positions = [], []
    for crop, record in enumerate(records[1:], start=1):
        ci, cj = divmod(crop - 1, npw)
        r, c = record.indices // SIDE, record.indices % SIDE
        positions.append((ci * SIDE + r) * npw * SIDE + cj * SIDE + c)
        parts.append(features[crop][record.indices])
    order = torch.cat(positions).argsort()
    return torch.cat([base, torch.cat(parts)[order]])


# --- counts ---------------------------------------------------------------------------------------------------
def test_spread_budget_is_equal_shares_with_caps():
    assert spread_budget(640, [576] * 5) == [128] * 5
    assert spread_budget(640, [576] * 3) == [213] * 3  # int(640 / 3): the rest is not handed out, as official
    assert spread_budget(640, [576, 48, 48, 576, 576]) == [181, 48, 48, 181, 181]
    assert spread_budget(5000, [576, 100, 30]) == [576, 100, 30]  # more than the image has: keep everything
    with pytest.raises(ValueError, match="cannot give every one"):
        spread_budget(2, [576, 576, 576])


def test_kept_counts_follow_the_conventions(tiny_next):
    model, processor, _ = tiny_next
    square, wide = (660, 700), (120, 300)
    adapter = hiprune.adapter_for(model, layout="official")
    full = adapter.image_layout(square, hiprune.build_method("none"))
    assert full.crop_grid == (2, 2) and full.kept == [576] * 5 and full.total == 2880 and full.newlines == 0
    for budget, per_crop in ((640, 128), (320, 64), (160, 32)):
        method = hiprune.build_method("hiprune", budget=budget)
        assert adapter.image_layout(square, method).kept == [per_crop] * 5
        assert adapter.tokens_per_image(method) == budget  # the reference image: a 2x2 grid
        assert adapter.image_layout(wide, method).kept == [budget // 3] * 3  # 1x2 grid: 3 crops
    assert adapter.image_layout(square, hiprune.build_method("random", budget=0.25)).kept == [144] * 5

    adapter = hiprune.adapter_for(model, layout="native")
    for size in (square, wide, (280, 110), (500, 380), (672, 672), (30, 900), (3000, 40)):  # 0 columns left: newlines only
        layout = adapter.image_layout(size, hiprune.build_method("none"))
        hf_count = processor._get_number_of_features(*size, 336, 336) - 1  # HF's own token count (CLS dropped)
        assert layout.total == hf_count, size
        assert layout.newlines == layout.unpadded[2]
        pruned = adapter.image_layout(size, hiprune.build_method("hiprune", budget=320))
        assert 320 - len(pruned.grids) < sum(pruned.kept) <= 320
        assert all(g.keep <= g.tokens for g in pruned.grids) and pruned.total == sum(pruned.kept) + pruned.newlines


def test_processor_emits_the_layout_count_and_is_restored(tiny_next, images):
    model, processor, _ = tiny_next
    sizes = [(im.height, im.width) for im in images.values()]
    hf_counts = (_batch(processor, list(images.values()))["input_ids"] == processor.image_token_id).sum(1).tolist()
    counts = {}
    for layout in ("official", "native"):
        method = hiprune.build_method("hiprune", budget=320)
        with hiprune.apply(model, method, processor, layout=layout) as session:
            ids = _batch(processor, list(images.values()))["input_ids"]
            counts[layout] = (ids == processor.image_token_id).sum(1).tolist()
            assert counts[layout] == [session.adapter.image_layout(s, method).total for s in sizes]
    assert counts["official"] == [320, 318, 318]  # 5 x 64, 3 x 106, 3 x 106
    assert counts["native"] != counts["official"]  # + one newline per unpadded row
    assert "replace_image_token" not in vars(processor)
    assert "get_image_features" not in vars(model.model) and "pack_image_features" not in vars(model.model)
    assert (_batch(processor, list(images.values()))["input_ids"] == processor.image_token_id).sum(1).tolist() == hf_counts


# --- one official HiPrune forward, checked several ways --------------------------------------------------------
@pytest.fixture(scope="module")
def official_run(tiny_next, images):
    model, processor, _ = tiny_next
    seen, hook = _llm_inputs(model)
    try:
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=320), processor) as session, torch.no_grad():
            batch = _batch(processor, [images["A"], images["B"]])
            model(**batch)
    finally:
        hook.remove()
    [records] = session.pop_records()
    return batch, seen[0], records


def test_llm_gets_base_then_stitched_raster_tokens(tiny_next, official_run):
    model, processor, _ = tiny_next
    batch, embeds, records = official_run
    features, _ = _reference_features(model, batch["pixel_values"], batch["image_sizes"])
    assert [r.tokens_kept for r in records] == [64] * 5 + [106] * 3
    assert all(torch.equal(r.indices, r.indices.sort().values) for r in records)
    per_image = [(records[:5], (2, 2)), (records[5:], (1, 2))]
    for row, (feats, (recs, grid)) in enumerate(zip(features, per_image)):
        got = embeds[row][batch["input_ids"][row] == processor.image_token_id]
        assert got.shape[0] == sum(r.tokens_kept for r in recs)
        torch.testing.assert_close(got, _expected_official(feats, recs, grid), rtol=0, atol=1e-6)


def test_kept_indices_equal_select_hiprune_on_eager_attention(tiny_next, official_run):
    model, _, _ = tiny_next
    batch, _, records = official_run
    _, crops = _reference_features(model, batch["pixel_values"], batch["image_sizes"])
    chosen = [0, 4, 6]  # A's base image, A's last sub-image, B's first sub-image (crops are independent)
    crops, records = crops[chosen], [records[k] for k in chosen]
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(crops, output_attentions=True).attentions
    object_scores = hiprune.global_attention(attentions[8], skip_cls=True)  # layer 9
    deep_scores = hiprune.global_attention(attentions[10], skip_cls=True)  # vision_feature_layer -2 of 12 -> 11
    budgets = [64, 64, 106]
    for crop, (record, budget) in enumerate(zip(records, budgets)):
        expected = hiprune.select_hiprune(object_scores[crop : crop + 1], deep_scores[crop : crop + 1], (SIDE, SIDE), budget)
        assert torch.equal(record.indices, expected[0]), crop

    adapter = hiprune.adapter_for(model)
    modules = {"object": adapter.attention_module(9), "deep": adapter.attention_module(adapter.feature_layer())}
    with torch.no_grad(), AttentionScores(modules) as capture:
        model.model.vision_tower(crops, output_hidden_states=True)
        captured = capture.collect()
    torch.testing.assert_close(captured["object"][:, 1:], object_scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(captured["deep"][:, 1:], deep_scores, rtol=1e-5, atol=1e-7)


def test_native_layout_keeping_everything_equals_hf(tiny_next, images):
    model, processor, _ = tiny_next
    pair = [images["B"], images["C"]]  # unpadding removes rows of B's grid and columns of C's
    batch = _batch(processor, pair)
    with torch.no_grad():
        plain = model.model(**batch).last_hidden_state
    # random with a budget above every image's token count keeps all tokens through the adapter's own layout
    method = hiprune.build_method("random", budget=100000)
    with hiprune.apply(model, method, processor, layout="native"), torch.no_grad():
        assert torch.equal(_batch(processor, pair)["input_ids"], batch["input_ids"])
        laid_out = model.model(**batch).last_hidden_state
    assert torch.equal(plain, laid_out)


# --- generate, LLM input length, batch invariance, every method ------------------------------------------------
@dataclasses.dataclass
class _InsideLLM(hiprune.RandomPrune):
    name: ClassVar[str] = "llm_probe"
    stage: ClassVar[str] = "llm"


CASES = [
    ("official", "none", {}),
    ("official", "random", {"budget": 320, "seed": 3}),
    ("official", "hiprune", {"budget": 320}),
    ("official", "hiprune_pp", {"budget": 320}),
    ("native", "hiprune", {"budget": 320}),
]


@pytest.mark.parametrize("layout,name,options", CASES, ids=["-".join(map(str, c[:2])) for c in CASES])
def test_generate_batch_of_two_equals_singles(tiny_next, images, tiny_clip_dir, layout, name, options):
    model, processor, _ = tiny_next
    method = hiprune.build_method(name, **options)
    encoder = None
    if method.needs_prompt:
        encoder = hiprune.ClipPromptEncoder.from_pretrained(str(tiny_clip_dir))  # pads right whatever the tokenizer
    pair = [images["B"], images["C"]]
    questions = ["Is there a red circle?", "What colour is the square?"]

    def generate(session, imgs, qs):
        batch = processor(text=[f"USER: <image>\n{q} ASSISTANT:" for q in qs], images=imgs, return_tensors="pt",
                          padding=True)
        if method.needs_prompt:
            session.set_prompts(qs)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        return batch, out[:, batch["input_ids"].shape[1]:]

    layouts = [hiprune.adapter_for(model, layout=layout).image_layout((im.height, im.width), method) for im in pair]
    first = [0, len(layouts[0].grids), len(layouts[0].grids) + len(layouts[1].grids)]
    seen, hook = _llm_inputs(model)
    try:
        with hiprune.apply(model, method, processor, prompt_encoder=encoder, layout=layout) as session:
            batch, batched = generate(session, pair, questions)
            [records] = session.pop_records()
            steps = [s.shape for s in seen]
            singles = []
            for k in range(2):
                singles.append(generate(session, pair[k : k + 1], questions[k : k + 1])[1][0])
                [single] = session.pop_records()
                assert len(single) == first[k + 1] - first[k]
                for a, b in zip(single, records[first[k] : first[k + 1]]):
                    assert a.tokens_kept == b.tokens_kept
                    assert (a.indices is None and b.indices is None) or torch.equal(a.indices, b.indices)
    finally:
        hook.remove()
    n_visual = [layout.total for layout in layouts]
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == n_visual
    assert steps[0][:2] == batch["input_ids"].shape  # the LLM's first step sees text + kept visual tokens
    assert [s[1] for s in steps[1:]] == [1, 1]  # then one token per step from the KV cache
    assert [r.tokens_kept for r in records] == [k for layout in layouts for k in layout.kept]
    if layout == "official":
        assert n_visual == ([1728, 1728] if name == "none" else [318, 318])
    assert batched.shape == (2, 3)
    for row, single in zip(batched, singles):
        assert torch.equal(row, single)


# --- impossible settings -------------------------------------------------------------------------------------
def test_impossible_settings_are_rejected_before_patching(tiny_next):
    model, _, _ = tiny_next
    cases = [
        (hiprune.build_method("hiprune", budget=4), "int\\(4 / 5 crops\\) = 0"),
        (hiprune.build_method("hiprune", budget=4000), "800 tokens per crop but a crop has only 576"),
        (hiprune.build_method("hiprune", budget=640, object_layer=13), "layers 1..12"),
        (hiprune.build_method("hiprune_pp", budget=640), "needs a prompt encoder"),
        (_InsideLLM(budget=64), "prunes inside the LLM"),
    ]
    for method, message in cases:
        with pytest.raises(ValueError, match=message), hiprune.apply(model, method):
            pass
        assert "get_image_features" not in vars(model.model) and "pack_image_features" not in vars(model.model)
    with pytest.raises(ValueError, match="unknown LLaVA-NeXT layout"):
        hiprune.adapter_for(model, layout="unpadded")


def test_resolve_layout_auto_is_native_for_none_and_official_for_pruning():
    none, pruning = hiprune.build_method("none"), hiprune.build_method("hiprune", budget=320)
    assert resolve_layout("auto", none) == "native"
    assert resolve_layout("auto", pruning) == "official"
    assert resolve_layout("auto", hiprune.build_method("random", budget=320)) == "official"
    for forced in ("official", "native"):
        assert resolve_layout(forced, none) == resolve_layout(forced, pruning) == forced
    with pytest.raises(ValueError, match="layout"):
        resolve_layout("spatial", none)


def test_lmms_vanilla_runs_the_standard_layout_and_pruned_rows_the_official_one(tiny_next):
    """layout=auto (the default): method none gets HF's unpad + newline layout, exactly the token count an unpatched
    processor gives; a pruning method gets the official layout; the settings say which ran."""
    from transformers import AutoProcessor

    from eval.lmms.llava_next import HiPruneLlavaNext

    _, _, path = tiny_next
    image = _image(500, 300, 1)  # not square: unpadding removes rows, and the grid choice has no tie
    fresh = AutoProcessor.from_pretrained(path)
    standard = fresh(text=[PROMPT], images=[image], return_tensors="pt")
    standard_tokens = int((standard["input_ids"] == fresh.image_token_id).sum())
    grid = get_anyres_image_grid_shape(tuple(standard["image_sizes"][0].tolist()),
                                       fresh.image_processor.image_grid_pinpoints, fresh.image_processor.crop_size["height"])
    crops = 1 + grid[0] * grid[1]
    assert standard_tokens != crops * SIDE * SIDE  # unpadded, with newline tokens

    counts = {}
    for method, options, layout in [("none", {}, "native"), ("hiprune", {"budget": 320}, "official"),
                                    ("none", {"layout": "official"}, "official")]:
        lmm = HiPruneLlavaNext(pretrained=str(path), method=method, device="cpu", pinpoint_order="checkpoint",
                               **options)
        try:
            assert lmm.settings["layout"] == layout
            assert lmm.session.adapter.layout == layout
            batch, _ = lmm.build_inputs(["Is there a red circle?"], [[image]])
            counts[(method, layout)] = int((batch["input_ids"] == lmm.processor.image_token_id).sum())
        finally:
            lmm.close()
    assert counts[("none", "native")] == standard_tokens
    assert counts[("hiprune", "official")] == crops * (320 // crops)
    assert counts[("none", "official")] == crops * SIDE * SIDE


# --- lmms-eval ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lmms_eval_runs_the_registered_model_on_the_local_task(tiny_next, smoke_task_dir):
    from lmms_eval.models import get_model

    from eval.lmms.llava_next import HiPruneLlavaNext

    _, _, path = tiny_next
    cls = get_model("hiprune_llava_next")
    assert cls is HiPruneLlavaNext
    lmm = cls(pretrained=str(path), method="hiprune", budget=320, device="cpu", batch_size=2)
    kept = run_smoke_pope(lmm, limit=2, batch_size=2)
    assert len(kept) == 2
    for per_crop in kept.values():  # one entry per crop grid: int(320 / crops) each
        assert per_crop == [320 // len(per_crop)] * len(per_crop)
    assert lmm.tokens_per_image == 320
    # LLaVA's tie-breaking between grids: a small square image gets a 2x1 (tall) grid, as in the official code
    assert lmm.session.adapter.image_layout((200, 200), lmm.method).crop_grid == (2, 1)
    assert lmm.processor.image_processor.image_grid_pinpoints == lmm.session.adapter.config.image_grid_pinpoints
    # the run's FLOPs: every crop through the whole tower; the LLM's visual input is the kept tokens (the official
    # layout adds no newline tokens), the rest of the prompt is text
    key = next(iter(lmm.kept_tokens))
    assert lmm.visual_input_tokens[key] == {doc: sum(per_crop) for doc, per_crop in lmm.kept_tokens[key].items()}
    config = lmm.session.adapter.config  # lmms-eval dropped the model after evaluating
    exact = [flops_exact(config, lmm.prefill_tokens[key][doc] - sum(per_crop), sum(per_crop), n_images=len(per_crop),
                         logits_to_keep=1)["total"] for doc, per_crop in lmm.kept_tokens[key].items()]
    summary = flops_summary(lmm, config)
    assert summary["samples"] == 2 and summary["tflops_exact"] == pytest.approx(sum(exact) / 2 / 1e12, rel=1e-12)
    assert exact[0] > flops_exact(config, 10, 320, n_images=1)["total"]  # more than one crop's tower was counted


# --- preprocessing: LLaVA's process_anyres_image ------------------------------------------------------------------
def _llava_anyres_reference(image: Image.Image, pinpoints_wh, crop: int, mean, std) -> torch.Tensor:
    """LLaVA's process_anyres_image written out from its description: pick the grid (w, h) with the largest effective
    resolution, then the least waste; resize into it keeping the aspect ratio (PIL bicubic, ceil, capped) and paste
    centred on black; cut crop x crop tiles in raster order; the base image squashed to crop x crop; each tile scaled
    to [0, 1] and normalised (CLIP's resize and centre crop leave a crop-sized tile as it is)."""
    w, h = image.size
    best, best_effective, best_waste = None, -1, float("inf")
    for gw, gh in pinpoints_wh:
        scale = min(gw / w, gh / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = gw * gh - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (gw, gh), effective, waste
    gw, gh = best
    if gw / w < gh / h:
        new_w, new_h = gw, min(math.ceil(h * gw / w), gh)
    else:
        new_w, new_h = min(math.ceil(w * gh / h), gw), gh
    canvas = Image.new("RGB", (gw, gh), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((gw - new_w) // 2, (gh - new_h) // 2))
    tiles = [image.resize((crop, crop), Image.BICUBIC)]
    tiles += [canvas.crop((x, y, x + crop, y + crop)) for y in range(0, gh, crop) for x in range(0, gw, crop)]
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return torch.stack([torch.from_numpy(((np.asarray(t, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
                        for t in tiles])


def test_lmms_preprocessing_defaults_to_llavas_anyres_pil_path(tiny_next):
    """image_backend=pil (the default) gives LLaVA's process_anyres_image pixels (independent reference above) on a
    wide, a tall and a near-square image; the torchvision backend (the option) differs from it."""
    from eval.lmms.llava_next import HiPruneLlavaNext, anyres_image_processor

    _, _, path = tiny_next
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
              [(500, 300), (170, 410), (640, 600)]]
    lmm = HiPruneLlavaNext(pretrained=str(path), method="none", device="cpu")
    try:
        assert lmm.settings["image_backend"] == "pil"
        saved = lmm.processor.image_processor
        # the checkpoint's pinpoints as LLaVA reads them, (width, height), in the checkpoint's order
        pinpoints_wh = [tuple(p) for p in AutoConfig.from_pretrained(path).image_grid_pinpoints]
        batch, _ = lmm.build_inputs(["Q"] * len(images), [[image] for image in images])
        torchvision = anyres_image_processor(saved, "torchvision")(images, return_tensors="pt")["pixel_values"]
    finally:
        lmm.close()
    crop = saved.crop_size["height"]
    for row, image in enumerate(images):
        reference = _llava_anyres_reference(image, pinpoints_wh, crop, saved.image_mean, saved.image_std)
        assert len(reference) in (3, 5)
        got = batch["pixel_values"][row, : len(reference)]
        assert torch.allclose(got, reference, atol=1e-5), f"image {row}: {(got - reference).abs().max()}"
        assert (torchvision[row, : len(reference)] - reference).abs().max() > 1e-2
    with pytest.raises(ValueError, match="image_backend"):
        anyres_image_processor(saved, "opencv")
