"""Run a vision-stage method through ``hiprune.apply`` on each family's tiny model (LLaVA-1.5, LLaVA-NeXT in the
official 'spatial' layout, Qwen2.5-VL, Video-LLaVA per frame) and check the path around it: the method's
``select`` is spied on, the pipeline must record exactly what it returned, and the LLM must receive exactly the
features it passed on, in the family's layout. Method tests then compare every spied selection with the method's
pure selection function on the tokens it was shown.

Used by tests/test_method_<name>.py (the tiny models are built by the project's scripts if missing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from conftest import ASSETS, built, llm_inputs, loaded, shape_image
from PIL import Image

import hiprune
from scripts import build_tiny_clip
from hiprune.methods.base import Method, Selection, VisionTokens

REPO = ASSETS.parent


@dataclass
class Call:
    tokens: VisionTokens
    budget: int
    selection: Selection


def spy(method: Method) -> list[Call]:
    """Make ``method.select`` remember every call (an instance attribute: the class stays untouched)."""
    calls: list[Call] = []
    original = method.select

    def select(tokens: VisionTokens, budget: int) -> Selection:
        selection = original(tokens, budget)
        calls.append(Call(tokens, budget, selection))
        return selection

    method.select = select
    return calls


def _noise(height, width, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- models (loaded once per test session, shared with the conftest fixtures) ---------------------------------
def family_model(family: str):
    """(model, processor) of the family's tiny model, built if missing, loaded once (conftest.loaded)."""
    return loaded(family)


# --- one run per family ----------------------------------------------------------------------------------------
def run_llava(method: Method) -> list[Call]:
    """Two images, batch 2; the LLM receives each image's selected features in the method's order."""
    model, processor = family_model("llava")
    calls = spy(method)
    seen, hook = llm_inputs(model)
    try:
        with torch.no_grad(), hiprune.apply(model, method, processor, prompt_encoder(method)) as session:
            _set_prompts(session, method, 2)
            batch = processor(text=["USER: <image>\nIs there a red circle? ASSISTANT:"] * 2,
                              images=[shape_image(200, 120, 1), shape_image(90, 160, 2)], return_tensors="pt",
                              padding=True)
            model(**batch)
    finally:
        hook.remove()
    [call] = calls
    _check_records(session, [call.selection], [0, 1])
    image = batch["input_ids"] == model.config.image_token_id
    cls = 1 if method.keeps_cls else 0
    for b in range(2):
        torch.testing.assert_close(seen[0][b][image[b]][cls:], call.selection.features[b], rtol=0, atol=0)
    if cls:  # the CLS token in front: the feature layer's CLS state through the projector, from the plain modules
        with torch.no_grad():
            hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
            expected = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 0])
        for b in range(2):
            torch.testing.assert_close(seen[0][b][image[b]][0], expected[b], rtol=1e-5, atol=1e-6)
    return calls


def run_llava_next(method: Method) -> list[Call]:
    """One 700 x 660 image (2 x 2 grid: base + 4 crops), official layout: base kept tokens, then the crops' kept
    tokens in raster order over the stitched grid. Every select row is matched to its crop by its features (crops
    with different budgets go through different calls; a crop left without tokens through none)."""
    model, processor = family_model("llava_next")
    calls = spy(method)
    seen, hook = llm_inputs(model)
    try:
        encoder = prompt_encoder(method)
        with torch.no_grad(), hiprune.apply(model, method, processor, encoder, layout="official") as session:
            _set_prompts(session, method, 1)
            batch = processor(text=["USER: <image>\nIs there a red circle? ASSISTANT:"],
                              images=[shape_image(700, 660, 1)], return_tensors="pt", padding=True)
            model(**batch)
    finally:
        hook.remove()
    with torch.no_grad():  # the projected features of the 5 crops, straight from the plain modules
        hidden = model.model.vision_tower(batch["pixel_values"][0][:5], output_hidden_states=True).hidden_states
        crops = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
    records = session.records[0]
    assert len(records) == 5, "base + 4 crops"
    passed = {k: crops[k][:0] for k in range(5)}  # what each crop passed on (none for a crop without a call)
    for call in calls:
        for row in range(call.tokens.batch_size):
            [crop] = [k for k in range(5) if torch.allclose(call.tokens.features[row], crops[k], atol=1e-5)]
            assert torch.equal(records[crop].indices, call.selection.indices[row].cpu())
            passed[crop] = call.selection.features[row]
            if call.selection.sources is None:  # a pure selection passes the crop's own tokens on
                torch.testing.assert_close(passed[crop], crops[crop][records[crop].indices])
    side = hiprune.adapter_for(model).side
    parts, positions = [], []
    for crop in range(1, 5):
        ci, cj = divmod(crop - 1, 2)
        indices = records[crop].indices
        positions.append((ci * side + indices // side) * 2 * side + cj * side + indices % side)
        parts.append(passed[crop])
    order = torch.cat(positions).argsort(stable=True)
    expected = torch.cat([passed[0], torch.cat(parts)[order]])
    image = batch["input_ids"][0] == model.config.image_token_id
    torch.testing.assert_close(seen[0][0][image], expected, rtol=1e-5, atol=1e-5)
    return calls


def run_qwen(method: Method) -> list[Call]:
    """Two noise images of 24 and 15 merged tokens; each is its own grid, the LLM receives its selection."""
    model, processor = family_model("qwen2_5_vl")
    calls = spy(method)
    seen, hook = llm_inputs(model)
    questions = ["Is there a red circle in the image?", "What colour is the square?"]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True,
        )
        for q in questions
    ]
    try:
        with torch.no_grad(), hiprune.apply(model, method, processor, prompt_encoder(method)) as session:
            _set_prompts(session, method, 2)
            batch = processor(text=texts, images=[_noise(112, 168, 0), _noise(84, 140, 1)], padding=True,
                              padding_side="left", return_tensors="pt")
            model(**batch)
    finally:
        hook.remove()
    assert [call.tokens.num_tokens for call in calls] == [24, 15]
    _check_records(session, [call.selection for call in calls], [0, 0])
    image = batch["input_ids"] == model.config.image_token_id
    for b, call in enumerate(calls):
        torch.testing.assert_close(seen[0][b][image[b]], call.selection.features[0], rtol=0, atol=0)
    return calls


def run_video(method: Method, frames: int = 4) -> list[Call]:
    """Two videos of ``frames`` frames: every frame is a grid; the LLM receives, frame after frame, the frame's CLS
    and its selected features."""
    model, processor = family_model("video_llava")
    calls = spy(method)
    seen, hook = llm_inputs(model)
    videos = [np.asarray([np.asarray(_noise(48, 64, 10 * v + f)) for f in range(frames)]) for v in range(2)]
    try:
        with torch.no_grad(), hiprune.apply(model, method, processor, prompt_encoder(method)) as session:
            _set_prompts(session, method, 2)
            batch = dict(processor(text=["USER: <video>\nWhat moves? ASSISTANT:"] * 2, videos=videos,
                                   return_tensors="pt", padding=True))
            model(**batch)
    finally:
        hook.remove()
    [call] = calls
    assert call.tokens.batch_size == 2 * frames
    _check_records(session, [call.selection], list(range(2 * frames)))
    video = batch["input_ids"] == model.config.video_token_id
    for b in range(2):
        tokens = seen[0][b][video[b]].view(frames, -1, seen[0].shape[-1])
        torch.testing.assert_close(tokens[:, 1:], call.selection.features[b * frames:(b + 1) * frames], rtol=0, atol=0)
    return calls


def prompt_encoder(method: Method):
    """The tiny CLIP text tower paired with the tiny CLIP-tower models, for prompt-aware methods (else None)."""
    if not method.needs_prompt:
        return None
    path = build_tiny_clip.build_tiny_clip(ASSETS / "tiny-clip", built("llava"))
    return hiprune.ClipPromptEncoder.from_pretrained(str(path))


def _set_prompts(session, method: Method, n: int) -> None:
    if method.needs_prompt:
        session.set_prompts(["Is there a red circle?"] * n)


def _check_records(session, selections: list[Selection], rows: list[int]) -> None:
    """The pipeline recorded, grid by grid, what the method returned."""
    [records] = session.records
    flat = [s.indices[r] for s in selections for r in range(s.indices.shape[0])]
    assert len(records) == len(flat) == len(rows)
    for record, indices in zip(records, flat):
        front = 1 if session.method.keeps_cls and records.kind == "image" else 0  # the CLS put in front, counted
        assert torch.equal(record.indices, indices.cpu()) and record.tokens_kept == indices.shape[0] + front


def refused_before_patching(family: str, method: Method, match: str) -> None:
    """``hiprune.apply`` refuses ``method`` on ``family`` with a message matching ``match`` and patches nothing."""
    import pytest

    model, processor = family_model(family)
    before = dict(vars(model.model))
    with pytest.raises(ValueError, match=match), hiprune.apply(model, method, processor):
        pass
    assert dict(vars(model.model)).keys() == before.keys()
