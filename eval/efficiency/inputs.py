"""Synthetic benchmark inputs for the families whose visual token count depends on the image (eval.efficiency.bench).

Each family is described by data (:data:`FAMILIES`), not by a branch in the benchmark: its real HF image processor
(built offline from the class defaults and the checkpoint's settings: the architecture config and the model config,
or a local model's own ``processor_config.json``), the processor outputs that travel with ``pixel_values``, the
markers around an image's placeholders and the adapter options the evaluation uses. The image is random RGB pixels of
``image_size`` (height, width); no tokenizer is needed: a sequence is ``before`` random text ids (BOS first), the
start marker, N' image tokens, the end marker and ``after`` random text ids, with N' from the adapter's
``placeholder_counts(method)`` on the processor outputs (what the family's processor emits under the method).

Families (adapter family -> processor):

  qwen3_vl         Qwen2VLImageProcessor with Qwen3-VL's settings (patch 16, temporal patch 2, 2x2 merge, SigLIP
                   normalisation 0.5 / 0.5), the model config's min_pixels / max_pixels (lmms-eval's qwen-vl-utils
                   resize limits); <|vision_start|> ... <|vision_end|>; mm_token_type_ids (1 on image tokens), as the
                   processor returns them for M-RoPE.
  qwen2_5_vl       the same with Qwen2.5-VL's settings (patch 14, CLIP normalisation); positions and window_scores as
                   the model config's.
  llava_next       LlavaNextImageProcessor (CLIP normalisation, 336 px crops, padding, the architecture's pinpoints);
                   the layout as for OneVision.
  llava_onevision  LlavaOnevisionImageProcessor (SigLIP normalisation, 384 px crops, padding, the architecture's
                   image_grid_pinpoints); the layout as lmms-eval's run resolves it (``layout=auto``: native for
                   method none, official 'spatial' for pruning methods).
  internvl         GotOcr2ImageProcessor with InternVL's settings (crop_to_patches: 1..max_patches dynamic 448-px tiles
                   + a thumbnail, ImageNet normalisation); <img> ... </img> (ids 151665 / 151666 next to the
                   <IMG_CONTEXT> image token 151667 in the InternVL3 -hf tokenizers: image_token_id - 2 and - 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import (
    AutoImageProcessor,
    GotOcr2ImageProcessor,
    LlavaNextImageProcessor,
    LlavaOnevisionImageProcessor,
    Qwen2VLImageProcessor,
)

from eval.config import ConfigError, repo_path
from hiprune.adapters import llava_next, llava_onevision

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _qwen_processor(mean: list[float], std: list[float]):
    def build(config, model_cfg: DictConfig):
        vc = config.vision_config
        return Qwen2VLImageProcessor(
            patch_size=int(vc.patch_size), temporal_patch_size=int(vc.temporal_patch_size),
            merge_size=int(vc.spatial_merge_size), image_mean=mean, image_std=std,
            min_pixels=int(model_cfg.min_pixels), max_pixels=int(model_cfg.max_pixels))
    return build


def _llava_next_processor(config, model_cfg: DictConfig):
    side = _side(config.vision_config.image_size)
    return LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=CLIP_MEAN,
        image_std=CLIP_STD, do_pad=True, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints])


def _llava_onevision_processor(config, model_cfg: DictConfig):
    side = _side(config.vision_config.image_size)
    return LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, do_pad=True,
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints])


def _internvl_processor(config, model_cfg: DictConfig):
    side = _side(config.vision_config.image_size)
    return GotOcr2ImageProcessor(
        size={"height": side, "width": side}, crop_to_patches=True, min_patches=int(model_cfg.min_patches),
        max_patches=int(model_cfg.max_patches), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


@dataclass(frozen=True)
class FamilyInputs:
    """How the benchmark feeds one family (see the module docstring)."""

    processor: Callable[[Any, DictConfig], Any]  # (HF config, model config) -> the family's image processor
    image_keys: tuple[str, ...]  # processor outputs besides pixel_values that get_image_features and the model take
    # adapter -> method -> (processor outputs, image index) -> kept tokens of each of that image's grids (records)
    grids: Callable[[Any, Any], Callable[[dict, int], list[int]]]
    markers: Callable[[Any], tuple[int, int] | None] = lambda config: None  # ids around an image's placeholders
    token_types: bool = False  # mm_token_type_ids (1 on image tokens) as the processor returns them
    vision_kwargs: Callable[[Any], dict] = lambda config: {}  # extra get_image_features keyword arguments
    adapter_options: Callable[[DictConfig, Any], dict] = lambda model_cfg, method: {}
    # (installed adapter, processor outputs) -> None: what the family's processor would tell the adapter while it
    # makes the prompt (InternVL: each image's tile count), for inputs made without it
    prepare: Callable[[Any, dict], None] = lambda adapter, processed: None
    prefill: str = ("input_ids + the precomputed image features (HF's mm_encoder_outputs), scattered into the token "
                    "embeddings inside the timed call")


QWEN = {
    "image_keys": ("image_grid_thw",),
    "grids": lambda adapter, method: lambda inputs, i: [adapter.tokens_for_grid(method, inputs["image_grid_thw"][i])],
    "markers": lambda config: (config.vision_start_token_id, config.vision_end_token_id),
    "token_types": True,
}
ANYRES = {  # LLaVA-NeXT and LLaVA-OneVision: base + anyres crops, the layout as lmms-eval's layout=auto
    "image_keys": ("image_sizes",),
    "grids": lambda adapter, method: lambda inputs, i: adapter.image_layout(inputs["image_sizes"][i], method).kept,
    "vision_kwargs": lambda config: {"vision_feature_layer": config.vision_feature_layer,
                                     "vision_feature_select_strategy": config.vision_feature_select_strategy},
}
FAMILIES: dict[str, FamilyInputs] = {
    "qwen3_vl": FamilyInputs(
        processor=_qwen_processor(SIGLIP_MEAN, SIGLIP_STD), **QWEN,
        adapter_options=lambda model_cfg, method: {"positions": str(model_cfg.positions)},
        prefill=("input_ids + mm_token_type_ids + image_grid_thw + the precomputed image features and DeepStack "
                 "features (HF's mm_encoder_outputs): the M-RoPE positions (the kept tokens' original ones) and the "
                 "scatter are computed inside the timed call"),
    ),
    "qwen2_5_vl": FamilyInputs(
        processor=_qwen_processor(CLIP_MEAN, CLIP_STD), **QWEN,
        adapter_options=lambda model_cfg, method: {"positions": str(model_cfg.positions),
                                                   "window_scores": str(model_cfg.window_scores)},
        prefill=("input_ids + mm_token_type_ids + image_grid_thw + the precomputed image features (HF's "
                 "mm_encoder_outputs): the M-RoPE positions (the kept tokens' original ones) and the scatter are "
                 "computed inside the timed call"),
    ),
    "llava_next": FamilyInputs(
        processor=_llava_next_processor, **ANYRES,
        adapter_options=lambda model_cfg, method: {"layout": llava_next.resolve_layout(str(model_cfg.layout), method)},
    ),
    "llava_onevision": FamilyInputs(  # layout=auto: native also for LLM-side methods (HF's own sequence)
        processor=_llava_onevision_processor, **ANYRES,
        adapter_options=lambda model_cfg, method: {
            "layout": llava_onevision.resolve_layout(str(model_cfg.layout), method)},
    ),
    "internvl": FamilyInputs(
        processor=_internvl_processor,
        image_keys=(),
        grids=lambda adapter, method: lambda inputs, i: adapter.tile_keeps(method, int(inputs["num_patches"][i])),
        markers=lambda config: (config.image_token_id - 2, config.image_token_id - 1),
        vision_kwargs=lambda config: {"vision_feature_layer": config.vision_feature_layer,
                                      "vision_feature_select_strategy": config.vision_feature_select_strategy},
        prepare=lambda adapter, processed: adapter.expect_tiles(processed["num_patches"]),
    ),
}


def family_inputs(family: str) -> FamilyInputs | None:
    """The family's description, or None for the families bench feeds itself (LLaVA-1.5: one square image)."""
    return FAMILIES.get(family)


def image_processor(family: str, config, model_cfg: DictConfig):
    """A local model's own image processor (its processor_config.json), else the family's, built offline."""
    if model_cfg.get("local"):
        return AutoImageProcessor.from_pretrained(str(repo_path(model_cfg.pretrained)))
    return FAMILIES[family].processor(config, model_cfg)


def random_image(size: tuple[int, int], seed: int) -> np.ndarray:
    """[H, W, 3] uint8 random RGB pixels."""
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ConfigError(f"image_size must be two positive sizes (height, width), got {list(size)}")
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def special_id(config, name: str) -> int | None:
    """A special token id of the LLM's config (Qwen3-VL's text config has none: the model config's, else None)."""
    value = getattr(config.text_config, name, None)
    return value if value is not None else getattr(config, name, None)


def text_ids(config, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random ids below the lowest special id of the model (image / marker / BOS / EOS tokens)."""
    special = [getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id")]
    special += [special_id(config, k) for k in ("bos_token_id", "eos_token_id")]
    high = min([s for s in special if isinstance(s, int)] + [config.text_config.vocab_size])
    return torch.randint(high, (n,), generator=g)


def make_inputs(config, family: str, processor, counts: Callable[[dict, int], int], image_size, batch: int,
                before: int, after: int, seed: int) -> tuple[dict[str, torch.Tensor], int, Any]:
    """(model inputs on CPU: input_ids, attention_mask, pixel_values and the family's image keys; N' placeholder
    tokens per sequence; the processor outputs) for ``batch`` copies of one random image."""
    spec = FAMILIES[family]
    image = random_image(image_size, seed)
    processed = processor([image] * batch, return_tensors="pt")
    keep = int(counts(processed, 0))
    if any(int(counts(processed, i)) != keep for i in range(batch)):
        raise RuntimeError("copies of one image got different placeholder counts")
    g = torch.Generator().manual_seed(seed)
    markers = spec.markers(config)
    bos = special_id(config, "bos_token_id")
    rows = []
    for _ in range(batch):
        head = text_ids(config, before, g)
        if before and bos is not None:
            head[0] = bos
        image_ids = torch.full((keep,), config.image_token_id)
        if markers:
            image_ids = torch.cat([torch.tensor([markers[0]]), image_ids, torch.tensor([markers[1]])])
        rows.append(torch.cat([head, image_ids, text_ids(config, after, g)]))
    input_ids = torch.stack(rows)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": processed["pixel_values"]}
    for key in spec.image_keys:
        inputs[key] = processed[key]
    if spec.token_types:
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    return inputs, keep, processed


__all__ = ["FAMILIES", "FamilyInputs", "family_inputs", "image_processor", "make_inputs", "random_image",
           "special_id"]
