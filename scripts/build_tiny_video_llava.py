#!/usr/bin/env python
"""Build a tiny, random-initialised Video-LLaVA checkpoint (HF ``VideoLlavaForConditionalGeneration``), offline.

Real geometry, tiny widths: two CLIP towers (image and video, as LanguageBind's) at 224 px / patch 14 -> 16 x 16 =
256 patch tokens (+ CLS), 12 layers each, ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``
(images: 256 tokens; video frames keep their CLS: 257 per frame, 8 frames = 2056 tokens), a 2-layer Llama, and the
tokenizer of ``scripts/build_tiny_llava.py`` plus a ``<video>`` token. The output head answers "yes"/"no" like the
tiny LLaVA's (calibrated on random images and videos).

    HF_HUB_OFFLINE=1 python scripts/build_tiny_video_llava.py [--out DIR] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-video-llava"
BUILDER_VERSION = 1


def load_next():
    """scripts/build_tiny_llava_next.py (shared build helpers) as a module."""
    name = "scripts_build_tiny_llava_next"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("build_tiny_llava_next.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 14,
    "num_frames": 8,  # frames per video the build's calibration and verification use (Video-LLaVA's 8)
    "vision_num_hidden_layers": 12,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_attention_heads": 4,
    "text_hidden_size": 64,
    "text_num_hidden_layers": 2,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 2,
    "text_intermediate_size": 128,
    "max_position_embeddings": 4096,
    "bpe_vocab_size": 600,
    "corpus_sentences": 400,
    "torch_dtype": "float32",
    "verify": True,
}


def chat_template() -> str:
    """The tiny LLaVA's Vicuna v1 template, with ``<video>\\n`` for video items (as llava-hf's Video-LLaVA)."""
    base = load_next().load_base()
    image_loop = "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\\n' -}}{%- endfor -%}"
    video_loop = "{%- for content in message['content'] | selectattr('type', 'equalto', 'video') -%}{{- '<video>\\n' -}}{%- endfor -%}"
    if image_loop not in base.CHAT_TEMPLATE:
        raise RuntimeError("build_tiny_llava.CHAT_TEMPLATE changed; update the video template")
    return base.CHAT_TEMPLATE.replace(image_loop, image_loop + video_loop)


def random_videos(n: int, frames: int, seed: int, size=(48, 64)):
    """n random videos as uint8 arrays [frames, H, W, 3] (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(frames, *size, 3), dtype=np.uint8) for _ in range(n)]


def _processor(tokenizer, p: dict[str, Any]):
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor, VideoLlavaVideoProcessor

    base = load_next().load_base()
    common = dict(
        do_resize=True,
        size={"shortest_edge": p["image_size"]},
        resample=3,
        do_center_crop=True,
        crop_size={"height": p["image_size"], "width": p["image_size"]},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=base.CLIP_MEAN,
        image_std=base.CLIP_STD,
        do_convert_rgb=True,
    )
    return VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**common),
        video_processor=VideoLlavaVideoProcessor(**common),
        tokenizer=tokenizer,
        patch_size=p["patch_size"],
        vision_feature_select_strategy="default",
        image_token="<image>",
        video_token="<video>",
        chat_template=chat_template(),
        num_additional_image_tokens=1,
    )


def verify(out_dir: Path, num_frames: int, verbose: bool = False) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

    next_builder = load_next()
    base = next_builder.load_base()
    with base._quiet_transformers():
        model = VideoLlavaForConditionalGeneration.from_pretrained(out_dir, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(out_dir, local_files_only=True)
    video = random_videos(1, num_frames, 321)[0]
    prompt = f"{base.VICUNA_SYSTEM_PROMPT} USER: <video>\nIs there a red circle? ASSISTANT:"
    inputs = processor(text=prompt, videos=[video], return_tensors="pt")
    n_video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    result = {
        "input_len": int(inputs["input_ids"].shape[1]),
        "n_video_tokens": n_video_tokens,
        "pixel_values_videos_shape": list(inputs["pixel_values_videos"].shape),
        "new_token_ids": out[0, inputs["input_ids"].shape[1] :].tolist(),
    }
    if verbose:
        print(f"[verify] {result}")
    if out.shape[1] <= inputs["input_ids"].shape[1]:
        raise RuntimeError("verification failed: generate() returned no new tokens")
    return result


def build_tiny_video_llava(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False,
                           **overrides) -> Path:
    """Build (or reuse) the tiny Video-LLaVA in ``out_dir``; returns its path. Deterministic for a seed."""
    nb = load_next()
    params = nb.params_with(DEFAULTS, seed, overrides)
    expected = nb.recipe(BUILDER_VERSION, params)

    def make(work: Path) -> dict:
        import torch
        from transformers import GenerationConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

        base = nb.load_base()
        random.seed(seed)
        torch.manual_seed(seed)
        tokenizer = base.build_tokenizer(
            params["bpe_vocab_size"], base.build_corpus(params["corpus_sentences"], seed),
            model_max_length=params["max_position_embeddings"],
        )
        tokenizer.add_tokens(["<video>"], special_tokens=True)
        side = params["image_size"] // params["patch_size"]
        config = VideoLlavaConfig(
            vision_config=nb.vision_config(params),
            text_config=nb.text_config(params, tokenizer),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_seq_length=side * side,
            video_seq_length=(side * side + 1) * params["num_frames"],
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=False,
        )
        config.pad_token_id = tokenizer.pad_token_id
        with base._quiet_transformers():
            torch.manual_seed(seed)
            model = VideoLlavaForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _processor(tokenizer, params)
            system = base.VICUNA_SYSTEM_PROMPT
            hidden = []
            with torch.no_grad():
                for image in nb.calibration_images(4, seed):
                    batch = processor(text=f"{system} USER: <image>\nIs there a cat? ASSISTANT:", images=[image],
                                      return_tensors="pt")
                    hidden.append(model.model(**batch).last_hidden_state[:, -1])
                for video in random_videos(4, params["num_frames"], seed):
                    batch = processor(text=f"{system} USER: <video>\nIs there a cat? ASSISTANT:", videos=[video],
                                      return_tensors="pt")
                    hidden.append(model.model(**batch).last_hidden_state[:, -1])
            nb.yes_no_head(model, tokenizer, torch.cat(hidden), seed)
            model.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16,
            )
            model.save_pretrained(work)
            processor.save_pretrained(work)
            n_params = sum(t.numel() for t in model.parameters())
            result = verify(work, params["num_frames"], verbose) if params["verify"] else None
        return {
            "n_parameters": n_params,
            "vocab_size": len(tokenizer),
            "image_token_id": config.image_token_id,
            "video_token_id": config.video_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "verify": result and {k: result[k] for k in ("input_len", "n_video_tokens", "new_token_ids")},
        }

    t0 = time.perf_counter()
    out = nb.atomic_build(out_dir, expected, make, force)
    if verbose:
        print(f"[build] {out} ready in {time.perf_counter() - t0:.1f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = ap.parse_args(argv)
    build_tiny_video_llava(args.out, seed=args.seed, force=args.force, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
