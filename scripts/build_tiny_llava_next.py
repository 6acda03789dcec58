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

    HF_HUB_OFFLINE=1 python scripts/build_tiny_llava_next.py [--out DIR] [--seed 0] [--force]

The build is written to a temporary sibling directory, verified (reload + ``generate``) and renamed into place;
``build_info.json`` (written last) marks a complete build, and re-running with the same recipe is a no-op.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-llava-next"
BUILDER_VERSION = 1
BUILD_INFO = "build_info.json"


def load_base():
    """scripts/build_tiny_llava.py as a module (tokenizer, corpus, chat template, helpers); scripts/ is no package."""
    name = "scripts_build_tiny_llava"  # the name tests/conftest.py's load_script uses: one module object
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("build_tiny_llava.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


DEFAULTS: dict[str, Any] = {
    "image_size": 336,
    "patch_size": 14,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]],
    "vision_num_hidden_layers": 12,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_attention_heads": 4,
    "text_hidden_size": 64,
    "text_num_hidden_layers": 2,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 2,
    "text_intermediate_size": 128,
    "max_position_embeddings": 4096,  # as vicuna-7b-v1.5: 2880 image tokens + a prompt fit
    "bpe_vocab_size": 600,
    "corpus_sentences": 400,
    "torch_dtype": "float32",
    "verify": True,
}


# ----------------------------------------------------------------------------------------------
# shared by the tiny LLaVA-NeXT and Video-LLaVA builders
# ----------------------------------------------------------------------------------------------


def text_config(p: dict[str, Any], tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p["text_hidden_size"],
        intermediate_size=p["text_intermediate_size"],
        num_hidden_layers=p["text_num_hidden_layers"],
        num_attention_heads=p["text_num_attention_heads"],
        num_key_value_heads=p["text_num_key_value_heads"],
        max_position_embeddings=p["max_position_embeddings"],
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def vision_config(p: dict[str, Any]):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=p["vision_hidden_size"],
        intermediate_size=p["vision_intermediate_size"],
        num_hidden_layers=p["vision_num_hidden_layers"],
        num_attention_heads=p["vision_num_attention_heads"],
        image_size=p["image_size"],
        patch_size=p["patch_size"],
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=p["vision_hidden_size"],
    )


def yes_no_head(model, tokenizer, hidden: torch.Tensor, seed: int) -> None:  # noqa: F821
    """The tiny LLaVA's answer head (see build_tiny_llava._yes_no_answerer), from calibration hidden states [n, width].

    Greedy decoding answers "yes" or "no" along the direction in which the final hidden state varies most over the
    calibration inputs, then emits </s>; every other output row is zero.
    """
    import torch

    base = load_base()
    yes, no, eos = (base._single_token_id(tokenizer, w) for w in ("yes", "no", tokenizer.eos_token))
    gen = torch.Generator().manual_seed(seed + 1)
    width = model.lm_head.weight.shape[1]
    with torch.no_grad():
        hidden = hidden.float()
        mean = hidden.mean(0)
        _, _, vh = torch.linalg.svd(hidden - mean, full_matrices=False)
        r = vh[0] - (vh[0] @ mean) / (mean @ mean) * mean
        r = r / r.norm()
        # </s> must not win at the answer position: the marker is orthogonal to r and to the mean answer state
        # (unlike the tiny LLaVA's, whose marker is only orthogonal to r).
        m = mean / mean.norm()
        marker = torch.randn(width, generator=gen)
        marker = marker - (marker @ r) * r
        marker = marker - (marker @ m) * m
        marker = marker / marker.norm()
        spread = (hidden - mean) @ r
        scale = 8.0 / spread.abs().median().clamp_min(1e-6)
        head = model.lm_head.weight
        head.zero_()
        head[yes] = r * scale
        head[no] = -r * scale
        head[eos] = marker * 4.0
        embeddings = model.get_input_embeddings().weight
        for token in (yes, no):
            embeddings[token] = marker * 50.0 + 0.1 * torch.randn(width, generator=gen)


def calibration_images(n: int, seed: int, sizes=((64, 96), (96, 64), (80, 80))):
    """n random RGB PIL images of a few sizes (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)
    ]


def recipe(builder_version: int, params: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "builder_version": builder_version,
        "params": {k: v for k, v in params.items() if k != "verify"},
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
        "torch": version("torch").split("+")[0],
    }


def is_complete(out_dir: Path, expected_recipe: dict[str, Any]) -> bool:
    info_path = Path(out_dir) / BUILD_INFO
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return False
    if info.get("recipe") != expected_recipe:
        return False
    return bool(info.get("files")) and all((Path(out_dir) / f).is_file() for f in info["files"])


def atomic_build(out_dir: Path, expected_recipe: dict[str, Any], make: Callable[[Path], dict], force: bool) -> Path:
    """Run ``make(work_dir) -> info`` in a temporary sibling directory, write build_info.json, rename into place."""
    base = load_base()
    out_dir = Path(out_dir).resolve()
    if not force and is_complete(out_dir, expected_recipe):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)
    try:
        extra = make(work)
        files = sorted(str(f.relative_to(work)) for f in work.rglob("*") if f.is_file())
        info = {"recipe": expected_recipe, **extra, "files": files, "sha256": {f: base._sha256(work / f) for f in files}}
        (work / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if not force and is_complete(out_dir, expected_recipe):
            shutil.rmtree(work, ignore_errors=True)  # another process finished the same build meanwhile
            return out_dir
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(backup)
            work.rename(out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir


def params_with(defaults: dict[str, Any], seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: {sorted(defaults)}")
    p = {**defaults, **overrides}
    if p["image_size"] % p["patch_size"]:
        raise ValueError("image_size must be a multiple of patch_size")
    return {"seed": seed, **p}


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT
# ----------------------------------------------------------------------------------------------


def _processor(tokenizer, p: dict[str, Any]):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    base = load_base()
    image_processor = LlavaNextImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": p["image_size"]},
        resample=3,  # PIL BICUBIC
        do_center_crop=True,
        crop_size={"height": p["image_size"], "width": p["image_size"]},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=base.CLIP_MEAN,
        image_std=base.CLIP_STD,
        do_convert_rgb=True,
        do_pad=True,
        image_grid_pinpoints=[list(x) for x in p["image_grid_pinpoints"]],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=base.CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # CLS: the processor counts 576 tokens for the base image, as llava-hf's
    )


def verify(out_dir: Path, verbose: bool = False) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    base = load_base()
    with base._quiet_transformers():
        model = LlavaNextForConditionalGeneration.from_pretrained(out_dir, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(out_dir, local_files_only=True)
    image = calibration_images(1, 123, sizes=((300, 320),))[0]
    prompt = f"{base.VICUNA_SYSTEM_PROMPT} USER: <image>\nIs there a red circle? ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    result = {
        "input_len": int(inputs["input_ids"].shape[1]),
        "n_image_tokens": n_image_tokens,
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "new_token_ids": out[0, inputs["input_ids"].shape[1] :].tolist(),
    }
    if verbose:
        print(f"[verify] {result}")
    if out.shape[1] <= inputs["input_ids"].shape[1]:
        raise RuntimeError("verification failed: generate() returned no new tokens")
    return result


def build_tiny_llava_next(out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False,
                          **overrides) -> Path:
    """Build (or reuse) the tiny LLaVA-NeXT in ``out_dir``; returns its path. Deterministic for a seed."""
    params = params_with(DEFAULTS, seed, overrides)
    expected = recipe(BUILDER_VERSION, params)

    def make(work: Path) -> dict:
        import torch
        from transformers import GenerationConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

        base = load_base()
        random.seed(seed)
        torch.manual_seed(seed)
        tokenizer = base.build_tokenizer(
            params["bpe_vocab_size"], base.build_corpus(params["corpus_sentences"], seed),
            model_max_length=params["max_position_embeddings"],
        )
        side = params["image_size"] // params["patch_size"]
        config = LlavaNextConfig(
            vision_config=vision_config(params),
            text_config=text_config(params, tokenizer),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=[list(x) for x in params["image_grid_pinpoints"]],
            image_seq_length=side * side,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=False,
        )
        config.pad_token_id = tokenizer.pad_token_id
        with base._quiet_transformers():
            torch.manual_seed(seed)
            model = LlavaNextForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _processor(tokenizer, params)
            prompt = f"{base.VICUNA_SYSTEM_PROMPT} USER: <image>\nIs there a red circle in the image? ASSISTANT:"
            hidden = []
            with torch.no_grad():
                for image in calibration_images(8, seed):
                    batch = processor(text=[prompt], images=[image], return_tensors="pt")
                    hidden.append(model.model(**batch).last_hidden_state[:, -1])
            yes_no_head(model, tokenizer, torch.cat(hidden), seed)
            model.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16,
            )
            model.save_pretrained(work)
            processor.save_pretrained(work)
            n_params = sum(t.numel() for t in model.parameters())
            result = verify(work, verbose) if params["verify"] else None
        return {
            "n_parameters": n_params,
            "vocab_size": len(tokenizer),
            "image_token_id": config.image_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "verify": result and {k: result[k] for k in ("input_len", "n_image_tokens", "new_token_ids")},
        }

    t0 = time.perf_counter()
    out = atomic_build(out_dir, expected, make, force)
    if verbose:
        print(f"[build] {out} ready in {time.perf_counter() - t0:.1f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = ap.parse_args(argv)
    build_tiny_llava_next(args.out, seed=args.seed, force=args.force, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
