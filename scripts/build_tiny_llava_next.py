#!/usr/bin/env python
"""Build a tiny, random-initialised LLaVA-NeXT (llava-v1.6) checkpoint, fully offline.

Real geometry, tiny widths: CLIP 336px / patch 14 -> 24 x 24 = 576 patch tokens (+ CLS) per crop,
``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``, 12 CLIP layers, a 2-layer Llama, and the
tokenizer of ``scripts/build_tiny_llava.py`` (trained locally). ``image_grid_pinpoints`` is limited to
``[[336, 672], [672, 336], [672, 672]]`` so that a square-ish image is split on a 2 x 2 grid (4 crops + the base
image = 5 x 576 = 2880 tokens in the official 'spatial' layout), and wide or tall images on 1 x 2 / 2 x 1 grids
(3 crops), so one batch can mix crop counts. The LLM's output head is set like the tiny LLaVA's (greedy decoding
answers "yes"/"no" from the random network, then stops).

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_llava_next [--out DIR] [--seed 0] [--force]

The build is written to a temporary sibling directory, verified (reload + ``generate``) and renamed into place;
``build_info.json`` (written last) marks a complete build, and re-running with the same recipe is a no-op.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from scripts import asset_build
from scripts import build_tiny_llava as tiny_llava  # the Vicuna-v1 chat template and the Llama tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-llava-next"
BUILDER_VERSION = 1

DEFAULTS: dict[str, Any] = {
    "image_size": 336,
    "patch_size": 14,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]],
    **asset_build.TINY_CLIP_LLAMA,
    "max_position_embeddings": 4096,  # as vicuna-7b-v1.5: 2880 image tokens + a prompt fit
}


def _processor(tokenizer, p: dict[str, Any]):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        **asset_build.clip_image_processor_kwargs(p["image_size"]),
        do_pad=True,
        image_grid_pinpoints=[list(x) for x in p["image_grid_pinpoints"]],
    )
    # With the CLS token counted and dropped, the processor counts 576 tokens for the base image, as llava-hf's.
    return asset_build.llava_style_processor(
        LlavaNextProcessor, tokenizer, p["patch_size"], tiny_llava.CHAT_TEMPLATE, image_processor=image_processor
    )


def verify(out_dir: Path, verbose: bool = False) -> dict[str, Any]:
    from transformers import LlavaNextForConditionalGeneration

    model, processor = asset_build.load_checkpoint(LlavaNextForConditionalGeneration, out_dir)
    image = asset_build.calibration_images(1, 123, sizes=((300, 320),))[0]
    prompt = f"{asset_build.VICUNA_SYSTEM_PROMPT} USER: <image>\nIs there a red circle? ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return asset_build.check_generation(model, inputs, verbose)


def build_tiny_llava_next(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False,
                          **overrides) -> Path:
    """Build (or reuse) the tiny LLaVA-NeXT in ``out_dir``; returns its path. Deterministic for a seed."""
    params = asset_build.build_params(DEFAULTS, seed, overrides)
    asset_build.require_whole_patches(params)

    def make(work: Path) -> dict:
        import torch
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        random.seed(seed)
        torch.manual_seed(seed)
        tokenizer = tiny_llava.tokenizer_for(params)
        config = asset_build.llava_style_config(
            LlavaNextConfig, params, tokenizer, image_grid_pinpoints=[list(x) for x in params["image_grid_pinpoints"]]
        )
        with asset_build.quiet_transformers():
            torch.manual_seed(seed)
            model = LlavaNextForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _processor(tokenizer, params)
            # Calibrated one image at a time on images of a few shapes (their crop counts differ).
            prompt = f"{asset_build.VICUNA_SYSTEM_PROMPT} USER: <image>\nIs there a red circle in the image? ASSISTANT:"
            images = asset_build.calibration_images(8, seed)
            asset_build.calibrate_yes_no_head(model, tokenizer, processor, prompt, images,
                                              torch.Generator().manual_seed(seed + 1), marker_orthogonal_to_mean=True)
            model.generation_config = asset_build.greedy_generation_config(tokenizer)
            return asset_build.save_vlm_build(work, model, processor, tokenizer, verify, params, verbose)

    recipe = asset_build.build_recipe(BUILDER_VERSION, params)
    return asset_build.build_atomically(out_dir, recipe, make, force, verbose)


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_llava_next)


if __name__ == "__main__":
    sys.exit(main())
