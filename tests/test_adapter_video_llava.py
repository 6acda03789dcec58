"""Video-LLaVA adapter: images keep N' tokens; videos split the budget over frames (int(N' / frames) per frame, every
frame's CLS kept on top), scores from the right tower equal an eager reference, LLM input length, generate, batch
invariance (adapter and lmms model, mixed image/video samples), an lmms-eval video run, and clear errors."""

from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image, ImageDraw

import hiprune

SIDE = 16
FRAMES = 4


@pytest.fixture(scope="module")
def tiny_video(tiny_video_llava, tiny_video_llava_dir):
    return (*tiny_video_llava, tiny_video_llava_dir)


def _video(seed, frames=FRAMES, size=(48, 64)):
    """A circle moving across a noisy background: uint8 [frames, H, W, 3]."""
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    out = rng.integers(100, 200, size=(frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        x = 8 + (width - 16) * f // max(frames - 1, 1)
        out[f][(yy - height // 2) ** 2 + (xx - x) ** 2 < 36] = (220, 30, 30)
    return out


def _image(width, height, seed):
    image = Image.new("RGB", (width, height), (40 * seed % 255, 120, 200 - 30 * seed))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 8, height // 8, width // 2, height // 2], fill="red")
    return image


VIDEOS = [_video(1), _video(2)]
IMAGES = [_image(120, 80, 1), _image(90, 150, 2)]


def _batch(processor, kind, visuals, questions=None):
    questions = questions or ["Is there a red circle?"] * len(visuals)
    text = [f"USER: <{kind}>\n{q} ASSISTANT:" for q in questions]
    key = "videos" if kind == "video" else "images"
    batch = processor(text=text, **{key: visuals}, return_tensors="pt", padding=True)
    if "pixel_values_images" in batch:
        batch["pixel_values"] = batch.pop("pixel_values_images")
    return dict(batch)


def _llm_inputs(model):
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    return seen, hook


def _eager_scores(tower, pixels):
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(pixels, output_attentions=True).attentions
    return hiprune.global_attention(attentions[8], skip_cls=True), hiprune.global_attention(attentions[10], skip_cls=True)


# --- counts ---------------------------------------------------------------------------------------------------
def test_kept_counts_per_image_and_per_frame(tiny_video):
    model, _, _ = tiny_video
    adapter = hiprune.adapter_for(model, num_frames=8)
    none = hiprune.build_method("none")
    assert adapter.image_tokens(none) == 256 and adapter.video_tokens(none, 8) == 8 * 257
    method = hiprune.build_method("hiprune", budget=64)
    assert adapter.image_tokens(method) == 64
    assert adapter.frame_tokens(method, 4) == 16 and adapter.video_tokens(method, 4) == 4 * 17  # + CLS per frame
    assert adapter.frame_tokens(method, 3) == 21  # int(64 / 3)
    ratio = hiprune.build_method("random", budget=0.25)
    assert adapter.image_tokens(ratio) == 64 and adapter.video_tokens(ratio, 8) == 8 * 65
    assert adapter.tokens_per_image(method) == 64
    assert adapter.tokens_per_image(hiprune.build_method("hiprune", budget=1000)) == 8 * (125 + 1)  # fits a video only
    additive = hiprune.build_method("hiprune_pp", budget=64, mode="additive")
    assert adapter.image_tokens(additive) == 70 and adapter.frame_tokens(additive, 4) == 18  # 16 + round(1.6)
    with pytest.raises(ValueError, match="int\\(3 / 4 frames\\) = 0"):
        adapter.frame_tokens(hiprune.build_method("hiprune", budget=3), 4)


def test_processor_emits_kept_counts_and_is_restored(tiny_video):
    model, processor, _ = tiny_video
    video_id, image_id = model.config.video_token_id, model.config.image_token_id
    with hiprune.apply(model, hiprune.build_method("hiprune", budget=64), processor):
        assert (_batch(processor, "video", VIDEOS)["input_ids"] == video_id).sum(1).tolist() == [68, 68]
        assert (_batch(processor, "image", IMAGES)["input_ids"] == image_id).sum(1).tolist() == [64, 64]
    for name in ("replace_image_token", "replace_video_token"):
        assert name not in vars(processor)
    for name in ("get_image_features", "get_video_features"):
        assert name not in vars(model.model)
    assert (_batch(processor, "video", VIDEOS)["input_ids"] == video_id).sum(1).tolist() == [4 * 257] * 2


# --- what the LLM receives, against direct recomputation ------------------------------------------------------
def test_video_frames_keep_cls_plus_kept_patches_picked_from_video_tower_attention(tiny_video):
    model, processor, _ = tiny_video
    seen, hook = _llm_inputs(model)
    try:
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=64), processor) as session, torch.no_grad():
            batch = _batch(processor, "video", VIDEOS)
            model(**batch)
    finally:
        hook.remove()
    [records] = session.pop_records()
    assert records.kind == "video" and [r.tokens_kept for r in records] == [16] * (2 * FRAMES)

    frames = batch["pixel_values_videos"].flatten(0, 1)
    with torch.no_grad():
        hidden = model.model.video_tower(frames, output_hidden_states=True).hidden_states[-2]  # CLS kept for video
        projected = model.model.multi_modal_projector(hidden)
    object_scores, deep_scores = _eager_scores(model.model.video_tower, frames)
    expected = hiprune.select_hiprune(object_scores, deep_scores, (SIDE, SIDE), 16)
    assert torch.equal(torch.stack([r.indices for r in records]), expected)
    weight = "embeddings.patch_embedding.weight"  # the towers differ, so the video tower's scores were the ones used
    assert not torch.equal(model.model.image_tower.state_dict()[weight], model.model.video_tower.state_dict()[weight])

    for row in range(2):
        got = seen[0][row][batch["input_ids"][row] == model.config.video_token_id]
        want = torch.cat([
            torch.cat([projected[f, :1], projected[f, 1:][records[f].indices]])
            for f in range(row * FRAMES, (row + 1) * FRAMES)
        ])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_images_keep_budget_tokens_picked_from_image_tower_attention(tiny_video):
    model, processor, _ = tiny_video
    seen, hook = _llm_inputs(model)
    try:
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=64), processor) as session, torch.no_grad():
            batch = _batch(processor, "image", IMAGES)
            model(**batch)
    finally:
        hook.remove()
    [records] = session.pop_records()
    assert records.kind == "image" and [r.tokens_kept for r in records] == [64, 64]
    pixels = batch["pixel_values"]
    with torch.no_grad():
        hidden = model.model.image_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        projected = model.model.multi_modal_projector(hidden)
    expected = hiprune.select_hiprune(*_eager_scores(model.model.image_tower, pixels), (SIDE, SIDE), 64)
    assert torch.equal(torch.stack([r.indices for r in records]), expected)
    for row in range(2):
        got = seen[0][row][batch["input_ids"][row] == model.config.image_token_id]
        torch.testing.assert_close(got, projected[row][records[row].indices], rtol=0, atol=1e-6)


# --- generate, LLM input length, batch invariance, every method ------------------------------------------------
CASES = [
    ("video", "none", {}),
    ("video", "random", {"budget": 64, "seed": 3}),
    ("video", "hiprune", {"budget": 64}),
    ("video", "hiprune_pp", {"budget": 64}),
    ("image", "hiprune", {"budget": 64}),
]


@pytest.mark.parametrize("kind,name,options", CASES, ids=["-".join(c[:2]) for c in CASES])
def test_generate_batch_of_two_equals_singles(tiny_video, tiny_clip_dir, kind, name, options):
    model, processor, _ = tiny_video
    method = hiprune.build_method(name, **options)
    encoder = None
    if method.needs_prompt:
        encoder = hiprune.ClipPromptEncoder.from_pretrained(str(tiny_clip_dir))
    visuals = VIDEOS if kind == "video" else IMAGES
    questions = ["Is there a red circle?", "Which way does it move?"]
    token_id = model.config.video_token_id if kind == "video" else model.config.image_token_id

    def generate(session, vis, qs):
        batch = _batch(processor, kind, vis, qs)
        if method.needs_prompt:
            session.set_prompts(qs)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        return batch, out[:, batch["input_ids"].shape[1]:]

    seen, hook = _llm_inputs(model)
    try:
        with hiprune.apply(model, method, processor, prompt_encoder=encoder) as session:
            batch, batched = generate(session, visuals, questions)
            [records] = session.pop_records()
            steps = [s.shape for s in seen]
            per = len(records) // 2
            singles = []
            for k in range(2):
                singles.append(generate(session, visuals[k : k + 1], questions[k : k + 1])[1][0])
                [single] = session.pop_records()
                for a, b in zip(single, records[per * k : per * (k + 1)], strict=True):
                    assert a.tokens_kept == b.tokens_kept
                    assert (a.indices is None and b.indices is None) or torch.equal(a.indices, b.indices)
            adapter = session.adapter
    finally:
        hook.remove()
    if kind == "video":
        n_visual = adapter.video_tokens(method, FRAMES)
        assert [r.tokens_kept for r in records] == [adapter.frame_tokens(method, FRAMES)] * (2 * FRAMES)
    else:
        n_visual = adapter.image_tokens(method)
    assert (batch["input_ids"] == token_id).sum(1).tolist() == [n_visual] * 2
    assert steps[0][:2] == batch["input_ids"].shape  # the LLM's first step: text + kept visual tokens
    assert [s[1] for s in steps[1:]] == [1, 1]  # then one token per step from the KV cache
    assert batched.shape == (2, 3)
    for row, single in zip(batched, singles):
        assert torch.equal(row, single)


def _requests(model, docs):
    model.task_dict = {"probe": {"test": dict(enumerate(docs))}}
    gen = {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]}
    return [
        Instance("generate_until", (doc["question"], dict(gen), lambda d: d["visuals"], i, "probe", "test"), idx=0,
                 metadata={"task": "probe", "doc_id": i, "repeats": 1})
        for i, doc in enumerate(docs)
    ]


def test_lmms_model_answers_mixed_samples_identically_at_any_batch_size(tiny_video, smoke_video_dir):
    from eval.lmms.video_llava import HiPruneVideoLlava

    _, _, path = tiny_video
    clip = str(smoke_video_dir / "videos" / "clip_00.mp4")
    docs = [
        {"visuals": [clip], "question": "Does the circle move to the right?"},
        {"visuals": [IMAGES[0]], "question": "Is there a red circle?"},
        {"visuals": [IMAGES[1], clip], "question": "Is the circle in the video the one in the image?"},
        {"visuals": [], "question": "What is two plus two?"},
    ]
    runs = []
    for batch_size in (1, 4):
        lmm = HiPruneVideoLlava(pretrained=str(path), method="hiprune", budget=64, device="cpu", batch_size=batch_size,
                                num_frames=FRAMES)
        answers = lmm.generate_until(_requests(lmm, docs))
        runs.append((answers, dict(lmm.kept_digests[("probe", "test")]), dict(lmm.kept_tokens[("probe", "test")])))
        lmm.close()
    assert runs[0] == runs[1]
    kept = runs[0][2]
    assert kept == {0: [16] * FRAMES, 1: [64], 2: [64] + [16] * FRAMES, 3: []}  # per grid, in the sample's visual order


# --- impossible settings ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _InsideLLM(hiprune.RandomPrune):
    name: ClassVar[str] = "llm_probe"
    stage: ClassVar[str] = "llm"


def test_impossible_settings_are_rejected_clearly(tiny_video):
    model, processor, _ = tiny_video
    cases = [
        (hiprune.build_method("hiprune", budget=5000), "only 256 \\(images\\).*only 256 \\(videos\\)"),
        (hiprune.build_method("hiprune", budget=64, object_layer=13), "layers 1..12"),
        (hiprune.build_method("hiprune_pp", budget=64), "needs a prompt encoder"),
        (_InsideLLM(budget=64), "prunes inside the LLM"),
    ]
    for method, message in cases:
        with pytest.raises(ValueError, match=message), hiprune.apply(model, method):
            pass
        assert "get_video_features" not in vars(model.model)
    # a budget that fits an image but cannot be split over a long video's frames fails when that video comes
    with hiprune.apply(model, hiprune.build_method("hiprune", budget=6), processor), pytest.raises(
        ValueError, match="int\\(6 / 8 frames\\) = 0 tokens per frame"
    ):
        processor(text="USER: <video>\nhi ASSISTANT:", videos=[_video(3, frames=8)], return_tensors="pt")
    with pytest.raises(ValueError, match="num_frames"):
        hiprune.adapter_for(model, num_frames=0)


# --- lmms-eval ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lmms_eval_runs_the_registered_model_on_the_local_video_task(tiny_video, smoke_video_dir):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model

    from eval.lmms.video_llava import HiPruneVideoLlava
    from eval.config import REPO_ROOT
    from eval.running.run import task_manager

    _, _, path = tiny_video
    cls = get_model("hiprune_video_llava")
    assert cls is HiPruneVideoLlava
    lmm = cls(pretrained=str(path), method="hiprune", budget=64, device="cpu", batch_size=2, num_frames=FRAMES)
    try:
        results = simple_evaluate(
            model=lmm, tasks=["hiprune_smoke_video"], limit=2, batch_size=2,
            task_manager=task_manager(str(REPO_ROOT / "eval" / "tasks")), bootstrap_iters=0,
        )
    finally:
        lmm.close()
    assert 0.0 <= results["results"]["hiprune_smoke_video"]["mvbench_accuracy,none"] <= 100.0
    kept = lmm.kept_tokens[("hiprune_smoke_video", "test")]
    assert kept == {i: [16] * FRAMES for i in range(2)}  # int(64 / 4 frames) per frame
