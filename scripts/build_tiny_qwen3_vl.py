#!/usr/bin/env python
"""Build a tiny, random-initialised Qwen3-VL checkpoint, fully offline.

The structure of Qwen/Qwen3-VL-2B-Instruct where it matters for token pruning, with tiny widths: a full-attention
vision encoder (patch 16, temporal patch 2, 2 x 2 spatial merge: one LLM token per 32 x 32 pixels; 8 blocks, real: 24)
with DeepStack mergers after blocks 2 / 4 / 6 (0-based indexes [1, 3, 5]; real: [5, 11, 17] of 24) and learned
position embeddings resampled per image (2304 = 48 x 48, as the real tower); a 4-layer Qwen3 decoder with M-RoPE
(interleaved sections, head dim 16) that adds the three DeepStack features after its first three layers; the
Qwen2-VL image processor with Qwen3-VL's settings (patch 16, SigLIP normalisation 0.5 / 0.5), and the byte-level BPE
tokenizer and chat template of ``scripts/build_tiny_qwen2_5_vl.py`` (the same special tokens; with a system
message, as lmms-eval sends, Qwen3-VL's template renders the same text). The output head is set so that greedy
decoding answers "yes"/"no" from the image, then stops.

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_qwen3_vl [--out DIR] [--seed 0] [--force]

Written to a temporary sibling directory, verified (reload + ``generate``) and renamed into place; ``build_info.json``
(written last) marks a complete build, and re-running with the same recipe is a no-op.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from scripts import asset_build
from scripts import build_tiny_qwen2_5_vl as tiny_qwen  # Qwen's tokenizer, special tokens and chat template

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-qwen3-vl"
BUILDER_VERSION = 1

DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "vision_depth": 8,
    "deepstack_visual_indexes": [1, 3, 5],
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_heads": 2,
    "num_position_embeddings": 2304,
    "text_hidden_size": 64,
    "text_num_hidden_layers": 4,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 2,
    "text_head_dim": 16,
    "text_intermediate_size": 128,
    "mrope_section": [2, 3, 3],  # sums to head_dim / 2 = 8 (real: [24, 20, 20] of 64)
    "max_position_embeddings": 32768,
    "min_pixels": 64 * 64,
    "max_pixels": 32 * 32 * 16384,
    "bpe_vocab_size": 700,
    "corpus_sentences": 400,
    "torch_dtype": "float32",
    "verify": True,
}


def _config(p: dict[str, Any], tokenizer):
    from transformers import Qwen3VLConfig

    vision = {
        **tiny_qwen.vision_widths(p),
        "hidden_act": "gelu_pytorch_tanh",
        "num_position_embeddings": p["num_position_embeddings"],
        "deepstack_visual_indexes": list(p["deepstack_visual_indexes"]),
    }
    text = {
        **tiny_qwen.text_widths(p, tokenizer),
        "head_dim": p["text_head_dim"],
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": list(p["mrope_section"]),
                            "mrope_interleaved": True},
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    config = Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        **tiny_qwen.vision_token_ids(tokenizer),
        tie_word_embeddings=False,  # the answer head below rewrites output rows only
    )
    return config


def _processor(tokenizer, p: dict[str, Any]):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=p["min_pixels"], max_pixels=p["max_pixels"], patch_size=p["patch_size"], temporal_patch_size=2,
        merge_size=2, image_mean=asset_build.SIGLIP_MEAN, image_std=asset_build.SIGLIP_STD, do_convert_rgb=True,
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=p["patch_size"], temporal_patch_size=2, merge_size=2,
                                            image_mean=asset_build.SIGLIP_MEAN, image_std=asset_build.SIGLIP_STD)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=tiny_qwen.CHAT_TEMPLATE)


def verify(out_dir: Path, verbose: bool = False) -> dict[str, Any]:
    from transformers import Qwen3VLForConditionalGeneration

    model, processor = asset_build.load_checkpoint(Qwen3VLForConditionalGeneration, out_dir)
    image = asset_build.calibration_images(1, 123, sizes=((120, 200),))[0]
    text = tiny_qwen.prompt(processor, "Is there a red circle?")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    grid = inputs["image_grid_thw"][0].tolist()
    if n_image_tokens != grid[0] * grid[1] * grid[2] // 4:
        raise RuntimeError(f"processor emitted {n_image_tokens} image tokens for a {grid} patch grid")
    new_tokens = asset_build.generate_new_tokens(model, inputs, max_new_tokens=3)
    result = {"input_len": int(inputs["input_ids"].shape[1]), "n_image_tokens": n_image_tokens,
              "image_grid_thw": grid, "new_token_ids": new_tokens.tolist()}
    if verbose:
        print(f"[verify] {result}")
    asset_build.require_new_tokens(new_tokens)
    return result


def build_tiny_qwen3_vl(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False,
                        **overrides) -> Path:
    """Build (or reuse) the tiny Qwen3-VL in ``out_dir``; returns its path. Deterministic for a seed."""
    params = asset_build.build_params(DEFAULTS, seed, overrides)

    def make(work: Path) -> dict:
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        random.seed(seed)
        torch.manual_seed(seed)
        corpus = asset_build.build_corpus(params["corpus_sentences"], seed)
        tokenizer = tiny_qwen.build_tokenizer(params["bpe_vocab_size"], corpus, params["max_position_embeddings"])
        config = _config(params, tokenizer)
        with asset_build.quiet_transformers():
            torch.manual_seed(seed)
            model = Qwen3VLForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _processor(tokenizer, params)
            question = tiny_qwen.prompt(processor, "Is there a red circle in the image?\n"
                                                   "Answer the question using a single word or phrase.")
            images = asset_build.calibration_images(12, seed, sizes=((96, 128), (128, 96), (160, 96)))
            asset_build.calibrate_yes_no_head(model, tokenizer, processor, question, images,
                                              torch.Generator().manual_seed(seed + 1))
            bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
            model.generation_config = tiny_qwen.generation_config(tokenizer, bos)
            return asset_build.save_vlm_build(work, model, processor, tokenizer, verify, params, verbose)

    recipe = asset_build.build_recipe(BUILDER_VERSION, params)
    return asset_build.build_atomically(out_dir, recipe, make, force, verbose)


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_qwen3_vl)


if __name__ == "__main__":
    sys.exit(main())
