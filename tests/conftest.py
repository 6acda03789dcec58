"""Shared fixtures: one tiny model per family, built by the project's own builders (scripts/, idempotent: an existing
complete build is reused), the offline tasks they answer, and small images.

Tiny models: ``<family>_dir`` is the checkpoint folder, ``<family>`` the (model, processor) pair loaded once per
session; tests must leave a shared model as they found them (``hiprune.apply`` restores it on exit).

    family             folder                      fixtures
    llava              assets/tiny-llava           tiny_llava_dir, tiny_llava
    llava_next         assets/tiny-llava-next      tiny_llava_next_dir, tiny_llava_next
    qwen2_5_vl         assets/tiny-qwen2.5-vl      tiny_qwen_dir, tiny_qwen
    video_llava        assets/tiny-video-llava     tiny_video_llava_dir, tiny_video_llava
    llava_onevision    assets/tiny-llava-onevision loaded("llava_onevision")
    qwen3_vl           assets/tiny-qwen3-vl        loaded("qwen3_vl")
    internvl           assets/tiny-internvl        loaded("internvl")
    scene              models/scene-llava          scene_llava_dir, scene_llava   (trained, committed; not built)

``tiny_model_dir`` / ``tiny_model`` are the same, parametrised over the families, for tests that hold for every one
(``@pytest.mark.parametrize("tiny_model", ["llava_next"], indirect=True)`` picks some).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image, ImageDraw

import hiprune
from scripts import (
    build_scene_tasks,
    build_smoke_task,
    build_smoke_video_task,
    build_tiny_clip,
    build_tiny_internvl,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen3_vl,
    build_tiny_video_llava,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"


@dataclass(frozen=True)
class TinyModel:
    """Where a family's tiny checkpoint lives, how it is built (None: committed), and its transformers class."""

    folder: Path
    build: Callable[[Path], Path] | None
    model_class: str


TINY_MODELS = {
    "llava": TinyModel(ASSETS / "tiny-llava", build_tiny_llava.build_tiny_llava, "LlavaForConditionalGeneration"),
    "llava_next": TinyModel(ASSETS / "tiny-llava-next", build_tiny_llava_next.build_tiny_llava_next,
                            "LlavaNextForConditionalGeneration"),
    "qwen2_5_vl": TinyModel(ASSETS / "tiny-qwen2.5-vl", build_tiny_qwen2_5_vl.build_tiny_qwen2_5_vl,
                            "Qwen2_5_VLForConditionalGeneration"),
    "video_llava": TinyModel(ASSETS / "tiny-video-llava", build_tiny_video_llava.build_tiny_video_llava,
                             "VideoLlavaForConditionalGeneration"),
    "llava_onevision": TinyModel(ASSETS / "tiny-llava-onevision", build_tiny_llava_onevision.build_tiny_llava_onevision,
                                 "LlavaOnevisionForConditionalGeneration"),
    "qwen3_vl": TinyModel(ASSETS / "tiny-qwen3-vl", build_tiny_qwen3_vl.build_tiny_qwen3_vl,
                          "Qwen3VLForConditionalGeneration"),
    "internvl": TinyModel(ASSETS / "tiny-internvl", build_tiny_internvl.build_tiny_internvl,
                          "InternVLForConditionalGeneration"),
    "scene": TinyModel(REPO / "models" / "scene-llava", None, "LlavaForConditionalGeneration"),
}


@functools.cache
def built(family: str) -> Path:
    """The family's checkpoint folder, built first if it is missing or incomplete."""
    spec = TINY_MODELS[family]
    if spec.build is None:
        if not (spec.folder / "config.json").is_file():
            raise FileNotFoundError(f"{spec.folder} is missing: it is committed to the repository")
        return spec.folder
    return spec.build(spec.folder)


@functools.cache
def loaded(family: str):
    """(model, processor) of the family's checkpoint, float32, in eval mode; loaded once per session."""
    path = built(family)
    model_class = getattr(transformers, TINY_MODELS[family].model_class)
    model = model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="session", params=sorted(TINY_MODELS))
def tiny_model_dir(request) -> Path:
    return built(request.param)


@pytest.fixture(scope="session", params=sorted(TINY_MODELS))
def tiny_model(request):
    return loaded(request.param)


@pytest.fixture(scope="session")
def tiny_llava_dir() -> Path:
    return built("llava")


@pytest.fixture(scope="session")
def tiny_llava():
    return loaded("llava")


@pytest.fixture(scope="session")
def tiny_llava_next_dir() -> Path:
    return built("llava_next")


@pytest.fixture(scope="session")
def tiny_llava_next():
    return loaded("llava_next")


@pytest.fixture(scope="session")
def tiny_qwen_dir() -> Path:
    return built("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen():
    return loaded("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_video_llava_dir() -> Path:
    return built("video_llava")


@pytest.fixture(scope="session")
def tiny_video_llava():
    return loaded("video_llava")


@pytest.fixture(scope="session")
def scene_llava_dir() -> Path:
    return built("scene")


@pytest.fixture(scope="session")
def scene_llava():
    return loaded("scene")


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_llava_dir) -> Path:
    """assets/tiny-clip: random CLIP text tower + projections paired with the tiny LLaVA (HiPrune++)."""
    return build_tiny_clip.build_tiny_clip(ASSETS / "tiny-clip", tiny_llava_dir)


# --- offline tasks ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smoke_task_dir() -> Path:
    """assets/smoke_pope (the data the committed eval/tasks/hiprune_smoke_pope task reads), built if missing."""
    out = ASSETS / "smoke_pope"
    build_smoke_task.main(["--out", str(out)])
    return out


@pytest.fixture(scope="session")
def smoke_video_dir() -> Path:
    """assets/smoke_video (eval/tasks/hiprune_smoke_video's videos), built if missing."""
    return build_smoke_video_task.build(ASSETS / "smoke_video")


@pytest.fixture(scope="session")
def scene_tasks_dir() -> Path:
    """assets/scene_tasks with the test split the scene tasks read, built if missing."""
    return build_scene_tasks.build(ASSETS / "scene_tasks", splits=("test",))


# --- images -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shape_images():
    """Three small non-square RGB images with different content."""
    images = []
    for i, (size, colour) in enumerate([((200, 120), "red"), ((90, 160), "blue"), ((300, 300), "green")]):
        image = Image.new("RGB", size, (30 * i, 80, 200 - 40 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse([10, 10, size[0] // 2, size[1] // 2], fill=colour)
        draw.rectangle([size[0] // 2, size[1] // 3, size[0] - 5, size[1] - 5], fill="yellow")
        images.append(image)
    return images


def shape_image(width: int, height: int, seed: int) -> Image.Image:
    """A ``width`` x ``height`` RGB image, its background set by ``seed``, with a red circle and a yellow rectangle."""
    image = Image.new("RGB", (width, height), (40 * seed % 255, 120, 200 - 30 * seed))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 8, height // 8, width // 2, height // 2], fill="red")
    draw.rectangle([width // 2, height // 3, width - 4, height - 4], fill="yellow")
    return image


# --- adapter test helpers -----------------------------------------------------------------------------------------
def chat_batch(processor, images, question: str = "Is there a red circle?"):
    """One user turn (an image, then ``question``) per image, through the processor's chat template, left-padded."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True, padding_side="left")


def llm_inputs(model):
    """(list, hook): the hook appends the ``inputs_embeds`` of every call of the model's language model to the list."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    return seen, hook


def assert_refused_before_patching(model, processor, method, message: str, **apply_options) -> None:
    """``hiprune.apply`` raises ValueError matching ``message`` and leaves the model and processor unpatched."""
    with pytest.raises(ValueError, match=message), hiprune.apply(model, method, processor, **apply_options):
        pass
    assert "get_image_features" not in vars(model.model) and "replace_image_token" not in vars(processor)


def assert_run_config_refused(overrides: list[str], message: str) -> None:
    """Planning a run of the config composed from ``overrides`` raises ConfigError matching ``message``."""
    from eval.config import ConfigError, compose_config
    from eval.running import run as run_module

    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=message):
        run_module.plan_run(cfg)


def run_smoke_pope(lmm, limit: int, batch_size: int):
    """Evaluate the registered lmms-eval model ``lmm`` on ``limit`` samples of the local POPE smoke task (closing it
    afterwards); checks the accuracy is a fraction and returns the kept tokens ``lmm`` recorded per sample."""
    from lmms_eval.evaluator import simple_evaluate

    from eval.config import REPO_ROOT
    from eval.running.run import task_manager

    try:
        results = simple_evaluate(
            model=lmm, tasks=["hiprune_smoke_pope"], limit=limit, batch_size=batch_size,
            task_manager=task_manager(str(REPO_ROOT / "eval" / "tasks")), bootstrap_iters=0,
        )
    finally:
        lmm.close()
    assert 0.0 <= results["results"]["hiprune_smoke_pope"]["pope_accuracy,none"] <= 1.0
    return lmm.kept_tokens[("hiprune_smoke_pope", "test")]
