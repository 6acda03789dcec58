#!/usr/bin/env python
"""Build a tiny, random-initialised InternVL3 checkpoint (the ``-hf`` format), fully offline.

The structure of OpenGVLab/InternVL3-1B-hf where it matters for token pruning, with tiny widths: an InternViT tower at
the real geometry (448-px tiles, patch 14 -> CLS + 32 x 32 patches; 8 layers, real: 24; layer scale, mean pooling
off the path), the CLS token dropped and a 2 x 2 pixel shuffle (256 tokens per tile) before the projector, a 2-layer
Qwen2 LLM; GOT-OCR2's image processor with InternVL's settings (dynamic 1..12 tiles of 448 px + a thumbnail, ImageNet
normalisation), the byte-level BPE tokenizer of ``scripts/build_tiny_qwen2_5_vl.py`` with InternVL's ``<img>``,
``</img>``, ``<IMG_CONTEXT>`` and ``<video>`` tokens, and a Qwen-style chat template with images first
(``<IMG_CONTEXT>\\n`` per image, as InternVL3's). The output head is set so that greedy decoding answers "yes"/"no"
from the image, then stops.

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_internvl [--out DIR] [--seed 0] [--force]

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
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-internvl"
BUILDER_VERSION = 1

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # InternVL's preprocessor_config.json
IMAGENET_STD = [0.229, 0.224, 0.225]
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
CHAT_TEMPLATE = tiny_qwen.images_first_chat_template("<IMG_CONTEXT>")  # images first, as InternVL3's

DEFAULTS: dict[str, Any] = {
    "image_size": 448,
    "patch_size": 14,
    "vision_num_hidden_layers": 8,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_attention_heads": 2,
    "max_patches": 12,
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


def prompt(processor, question: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _tokenizer(p: dict[str, Any]):
    tokenizer = tiny_qwen.tokenizer_with(p, list(INTERNVL_TOKENS.values()), CHAT_TEMPLATE)
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(INTERNVL_TOKENS))  # named: start_image_token ...
    return tokenizer


def _config(p: dict[str, Any], tokenizer):
    from transformers import InternVLConfig

    vision = {
        "hidden_size": p["vision_hidden_size"],
        "intermediate_size": p["vision_intermediate_size"],
        "num_hidden_layers": p["vision_num_hidden_layers"],
        "num_attention_heads": p["vision_num_attention_heads"],
        "image_size": [p["image_size"], p["image_size"]],
        "patch_size": [p["patch_size"], p["patch_size"]],
        "norm_type": "layer_norm",
        "use_mean_pooling": True,
        "layer_scale_init_value": 0.1,
        "hidden_act": "gelu",
    }
    text = tiny_qwen.qwen2_text_config(p, tokenizer)
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(p["image_size"] // p["patch_size"] // 2) ** 2, downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _processor(tokenizer, p: dict[str, Any]):
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    size = {"height": p["image_size"], "width": p["image_size"]}
    image_processor = GotOcr2ImageProcessorPil(
        size=size, crop_to_patches=True, min_patches=1, max_patches=p["max_patches"],
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    video_processor = InternVLVideoProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=(p["image_size"] // p["patch_size"] // 2) ** 2,
                             chat_template=CHAT_TEMPLATE)


def verify(out_dir: Path, verbose: bool = False) -> dict[str, Any]:
    from transformers import InternVLForConditionalGeneration

    model, processor = asset_build.load_checkpoint(InternVLForConditionalGeneration, out_dir)
    image = asset_build.calibration_images(1, 123, sizes=((300, 700),))[0]
    inputs = processor(text=[prompt(processor, "Is there a red circle?")], images=[image], return_tensors="pt")
    return asset_build.check_generation(model, inputs, verbose)


def build_tiny_internvl(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False,
                        **overrides) -> Path:
    """Build (or reuse) the tiny InternVL3 in ``out_dir``; returns its path. Deterministic for a seed."""
    params = asset_build.build_params(DEFAULTS, seed, overrides)
    asset_build.require_whole_patches(params)

    def make(work: Path) -> dict:
        import torch
        from transformers import InternVLForConditionalGeneration

        random.seed(seed)
        torch.manual_seed(seed)
        tokenizer = _tokenizer(params)
        config = _config(params, tokenizer)
        with asset_build.quiet_transformers():
            torch.manual_seed(seed)
            model = InternVLForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _processor(tokenizer, params)
            question = prompt(processor, "Is there a red circle in the image?\n"
                                         "Answer the question using a single word or phrase.")
            images = asset_build.calibration_images(8, seed, sizes=((300, 320), (300, 700), (700, 300)))
            asset_build.calibrate_yes_no_head(model, tokenizer, processor, question, images,
                                              torch.Generator().manual_seed(seed + 1), marker_orthogonal_to_mean=True)
            model.generation_config = tiny_qwen.generation_config(tokenizer, config.text_config.bos_token_id)
            return asset_build.save_vlm_build(work, model, processor, tokenizer, verify, params, verbose)

    recipe = asset_build.build_recipe(BUILDER_VERSION, params)
    return asset_build.build_atomically(out_dir, recipe, make, force, verbose)


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_internvl)


if __name__ == "__main__":
    sys.exit(main())
