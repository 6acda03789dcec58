"""Shared fixtures: the offline tiny LLaVA and smoke task, built by the project's own scripts (idempotent)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_llava_dir() -> Path:
    """assets/tiny-llava, built if missing (the same folder `make smoke` uses)."""
    return load_script("build_tiny_llava").build_tiny_llava(ASSETS / "tiny-llava")


@pytest.fixture(scope="session")
def smoke_task_dir() -> Path:
    """assets/smoke_pope (the data the committed eval/tasks/hiprune_smoke_pope task reads), built if missing."""
    module = load_script("build_smoke_task")
    out = ASSETS / "smoke_pope"
    module.main(["--out", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir):
    """(model, processor) loaded once per session; tests must leave them as they found them."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    return model, processor


@pytest.fixture(scope="session")
def shape_images():
    """Three small non-square RGB images with different content."""
    from PIL import Image, ImageDraw

    images = []
    for i, (size, colour) in enumerate([((200, 120), "red"), ((90, 160), "blue"), ((300, 300), "green")]):
        image = Image.new("RGB", size, (30 * i, 80, 200 - 40 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse([10, 10, size[0] // 2, size[1] // 2], fill=colour)
        draw.rectangle([size[0] // 2, size[1] // 3, size[0] - 5, size[1] - 5], fill="yellow")
        images.append(image)
    return images


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_llava_dir) -> Path:
    """assets/tiny-clip: random CLIP text tower + projections paired with the tiny LLaVA (HiPrune++)."""
    return load_script("build_tiny_clip").build_tiny_clip(ASSETS / "tiny-clip", tiny_llava_dir)
