#!/usr/bin/env python
"""Build a tiny, random-initialised Video-LLaVA checkpoint (HF ``VideoLlavaForConditionalGeneration``), offline.

Real geometry, tiny widths: two CLIP towers (image and video, as LanguageBind's) at 224 px / patch 14 -> 16 x 16 =
256 patch tokens (+ CLS), 12 layers each, ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``
(images: 256 tokens; video frames keep their CLS: 257 per frame, 8 frames = 2056 tokens), a 2-layer Llama, and the
tokenizer of ``scripts/build_tiny_llava.py`` plus a ``<video>`` token. The output head answers "yes"/"no" like the
tiny LLaVA's (calibrated on random images and videos).

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_video_llava [--out DIR] [--seed 0] [--force]
"""

from __future__ import annotations

import random
import sys
from functools import partial
from pathlib import Path
from typing import Any

from scripts import asset_build
from scripts import build_tiny_llava as tiny_llava  # the Vicuna-v1 chat template and the Llama tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-video-llava"
BUILDER_VERSION = 1

DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 14,
    "num_frames": 8,  # frames per video the build's calibration and verification use (Video-LLaVA's 8)
    **asset_build.TINY_CLIP_LLAMA,
    "max_position_embeddings": 4096,
}


def chat_template() -> str:
    """The tiny LLaVA's Vicuna v1 template, with ``<video>\\n`` for video items (as llava-hf's Video-LLaVA)."""
    image_loop = "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\\n' -}}{%- endfor -%}"
    video_loop = "{%- for content in message['content'] | selectattr('type', 'equalto', 'video') -%}{{- '<video>\\n' -}}{%- endfor -%}"
    if image_loop not in tiny_llava.CHAT_TEMPLATE:
        raise RuntimeError("build_tiny_llava.CHAT_TEMPLATE changed; update the video template")
    return tiny_llava.CHAT_TEMPLATE.replace(image_loop, image_loop + video_loop)


def random_videos(n: int, frames: int, seed: int, size=(48, 64)):
    """n random videos as uint8 arrays [frames, H, W, 3] (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(frames, *size, 3), dtype=np.uint8) for _ in range(n)]


def _processor(tokenizer, p: dict[str, Any]):
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor, VideoLlavaVideoProcessor

    preprocessing = asset_build.clip_image_processor_kwargs(p["image_size"])  # the same for images and frames
    return asset_build.llava_style_processor(
        VideoLlavaProcessor,
        tokenizer,
        p["patch_size"],
        chat_template(),
        image_processor=VideoLlavaImageProcessor(**preprocessing),
        video_processor=VideoLlavaVideoProcessor(**preprocessing),
        video_token="<video>",
    )


def verify(out_dir: Path, num_frames: int, verbose: bool = False) -> dict[str, Any]:
    from transformers import VideoLlavaForConditionalGeneration

    model, processor = asset_build.load_checkpoint(VideoLlavaForConditionalGeneration, out_dir)
    video = random_videos(1, num_frames, 321)[0]
    prompt = f"{asset_build.VICUNA_SYSTEM_PROMPT} USER: <video>\nIs there a red circle? ASSISTANT:"
    inputs = processor(text=prompt, videos=[video], return_tensors="pt")
    new_tokens = asset_build.generate_new_tokens(model, inputs, max_new_tokens=3)
    result = {
        "input_len": int(inputs["input_ids"].shape[1]),
        "n_video_tokens": int((inputs["input_ids"] == model.config.video_token_id).sum()),
        "pixel_values_videos_shape": list(inputs["pixel_values_videos"].shape),
        "new_token_ids": new_tokens.tolist(),
    }
    if verbose:
        print(f"[verify] {result}")
    asset_build.require_new_tokens(new_tokens)
    return result


def build_tiny_video_llava(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False,
                           **overrides) -> Path:
    """Build (or reuse) the tiny Video-LLaVA in ``out_dir``; returns its path. Deterministic for a seed."""
    params = asset_build.build_params(DEFAULTS, seed, overrides)
    asset_build.require_whole_patches(params)

    def make(work: Path) -> dict:
        import torch
        from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

        random.seed(seed)
        torch.manual_seed(seed)
        tokenizer = tiny_llava.tokenizer_for(params)
        tokenizer.add_tokens(["<video>"], special_tokens=True)
        side = params["image_size"] // params["patch_size"]
        config = asset_build.llava_style_config(
            VideoLlavaConfig,
            params,
            tokenizer,
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            video_seq_length=(side * side + 1) * params["num_frames"],  # frames keep their CLS
        )
        with asset_build.quiet_transformers():
            torch.manual_seed(seed)
            model = VideoLlavaForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _processor(tokenizer, params)
            system = asset_build.VICUNA_SYSTEM_PROMPT
            hidden = []
            with torch.no_grad():
                for image in asset_build.calibration_images(4, seed):
                    batch = processor(text=f"{system} USER: <image>\nIs there a cat? ASSISTANT:", images=[image],
                                      return_tensors="pt")
                    hidden.append(model.model(**batch).last_hidden_state[:, -1])
                for video in random_videos(4, params["num_frames"], seed):
                    batch = processor(text=f"{system} USER: <video>\nIs there a cat? ASSISTANT:", videos=[video],
                                      return_tensors="pt")
                    hidden.append(model.model(**batch).last_hidden_state[:, -1])
            asset_build.install_yes_no_head(
                model, tokenizer, torch.cat(hidden), torch.Generator().manual_seed(seed + 1),
                marker_orthogonal_to_mean=True,
            )
            model.generation_config = asset_build.greedy_generation_config(tokenizer)
            verify_saved = (
                partial(verify, num_frames=params["num_frames"], verbose=verbose) if params["verify"] else None
            )
            info = asset_build.save_and_verify(
                work, model, processor, tokenizer, verify_saved, ("input_len", "n_video_tokens", "new_token_ids")
            )
        return {**info, "image_token_id": config.image_token_id, "video_token_id": config.video_token_id}

    recipe = asset_build.build_recipe(BUILDER_VERSION, params)
    return asset_build.build_atomically(out_dir, recipe, make, force, verbose)


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_video_llava)


if __name__ == "__main__":
    sys.exit(main())
