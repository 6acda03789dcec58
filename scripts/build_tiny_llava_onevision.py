#!/usr/bin/env python
"""Build a tiny, random-initialised LLaVA-OneVision checkpoint, fully offline.

The structure of llava-hf/llava-onevision-qwen2-0.5b-ov-hf where it matters for token pruning, with tiny widths:
a SigLIP tower at the real geometry (384 px, patch 14 -> 27 x 27 = 729 tokens per crop, no CLS token, 12 layers
(real: 26), ``vision_feature_layer=-1``, ``vision_feature_select_strategy="full"``), the real ``image_grid_pinpoints`` (1 x 1 to
6 x 6 crops of 384 px) and ``vision_aspect_ratio="anyres_max_9"``, a GELU projector, a 2-layer Qwen2 LLM, and the
byte-level BPE tokenizer of ``scripts/build_tiny_qwen2_5_vl.py`` (Qwen's special tokens) with ``<image>`` and
``<video>`` added. The image processor is LLaVA-OneVision's (SigLIP normalisation 0.5 / 0.5, bicubic, padding to
the best pinpoint). The LLM's output head is set so that greedy decoding answers "yes"/"no" from the image, then
stops.

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_llava_onevision [--out DIR] [--seed 0] [--force]

Written to a temporary sibling directory, verified (reload + ``generate``) and renamed into place; ``build_info.json``
(written last) marks a complete build, and re-running with the same recipe is a no-op.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from scripts import asset_build
from scripts import build_tiny_qwen2_5_vl as tiny_qwen  # Qwen's special tokens and the byte-level BPE tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-llava-onevision"
BUILDER_VERSION = 1

SYSTEM_PROMPT = "You are a helpful assistant."
# llava-onevision-qwen2-*-ov-hf: every (rows, cols) grid of 1..6 crops of 384 px
PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
# LLaVA's qwen_1_5 conversation (lmms-eval's llava_onevision), as a chat template for processor.apply_chat_template
CHAT_TEMPLATE = tiny_qwen.images_first_chat_template("<image>")

DEFAULTS: dict[str, Any] = {
    "image_size": 384,
    "patch_size": 14,
    "vision_num_hidden_layers": 12,  # real: 26 (fewer layers keep the tests fast on CPU)
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_attention_heads": 2,
    "text_hidden_size": 64,
    "text_num_hidden_layers": 2,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 2,
    "text_intermediate_size": 128,
    "max_position_embeddings": 32768,
    "bpe_vocab_size": 700,
    "corpus_sentences": 400,
    "torch_dtype": "float32",
    "verify": True,
}


def prompt(question: str, n_images: int = 1) -> str:
    """lmms-eval's llava_onevision prompt: images before the question, LLaVA's qwen_1_5 conversation."""
    images = " ".join(["<image>"] * n_images) + "\n" if n_images else ""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{images}{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def _tokenizer(p: dict[str, Any]):
    return tiny_qwen.tokenizer_with(p, ["<image>", "<video>"], CHAT_TEMPLATE)


def _config(p: dict[str, Any], tokenizer):
    from transformers import LlavaOnevisionConfig

    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": p["vision_hidden_size"],
        "intermediate_size": p["vision_intermediate_size"],
        "num_hidden_layers": p["vision_num_hidden_layers"],
        "num_attention_heads": p["vision_num_attention_heads"],
        "image_size": p["image_size"],
        "patch_size": p["patch_size"],
        "vision_use_head": False,
    }
    text = tiny_qwen.qwen2_text_config(p, tokenizer)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _processor(tokenizer, p: dict[str, Any]):
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": p["image_size"], "width": p["image_size"]},
        image_mean=asset_build.SIGLIP_MEAN,
        image_std=asset_build.SIGLIP_STD,
        image_grid_pinpoints=PINPOINTS,
        do_pad=True,
    )
    side = p["image_size"] // p["patch_size"]
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(
            size={"height": p["image_size"], "width": p["image_size"]}, image_mean=asset_build.SIGLIP_MEAN, image_std=asset_build.SIGLIP_STD
        ),
        num_image_tokens=side * side,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def verify(out_dir: Path, verbose: bool = False) -> dict[str, Any]:
    from transformers import LlavaOnevisionForConditionalGeneration

    model, processor = asset_build.load_checkpoint(LlavaOnevisionForConditionalGeneration, out_dir)
    image = asset_build.calibration_images(1, 123, sizes=((300, 420),))[0]
    inputs = processor(images=image, text=prompt("Is there a red circle?"), return_tensors="pt")
    return asset_build.check_generation(model, inputs, verbose)


def build_tiny_llava_onevision(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False,
                               **overrides) -> Path:
    """Build (or reuse) the tiny LLaVA-OneVision in ``out_dir``; returns its path. Deterministic for a seed."""
    params = asset_build.build_params(DEFAULTS, seed, overrides)
    # 384 / 14 is not whole: SigLIP's patch convolution drops the last 6 pixels (27 x 27 patches), as the real tower

    def make(work: Path) -> dict:
        import torch
        from transformers import LlavaOnevisionForConditionalGeneration

        random.seed(seed)
        torch.manual_seed(seed)
        tokenizer = _tokenizer(params)
        config = _config(params, tokenizer)
        with asset_build.quiet_transformers():
            torch.manual_seed(seed)
            model = LlavaOnevisionForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _processor(tokenizer, params)
            question = prompt("Is there a red circle in the image?\nAnswer the question using a single word or phrase.")
            images = asset_build.calibration_images(8, seed, sizes=((300, 320), (300, 700), (700, 300)))
            asset_build.calibrate_yes_no_head(model, tokenizer, processor, question, images,
                                              torch.Generator().manual_seed(seed + 1), marker_orthogonal_to_mean=True)
            model.generation_config = tiny_qwen.generation_config(tokenizer, config.text_config.bos_token_id)
            return asset_build.save_vlm_build(work, model, processor, tokenizer, verify, params, verbose)

    recipe = asset_build.build_recipe(BUILDER_VERSION, params)
    return asset_build.build_atomically(out_dir, recipe, make, force, verbose)


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_llava_onevision)


if __name__ == "__main__":
    sys.exit(main())
