"""LLaVA-OneVision (``transformers.LlavaOnevisionForConditionalGeneration``): anyres-max crops pruned one by one.

Geometry. A SigLIP tower (384 px, patch 14: a 27 x 27 grid of 729 tokens per crop, **no CLS token**, every token
passed on: ``vision_feature_select_strategy="full"``, feature layer = the tower's last layer), a 2-layer MLP
projector and a Qwen2 LLM. An image is a base image (the whole image resized to 384 x 384) plus the crops of the
best-fitting anyres grid of up to 6 x 6 sub-images (``image_grid_pinpoints``).

Layouts: everything else is LLaVA-NeXT's (``hiprune.adapters.llava_next``: the same crop cutting, per-crop budgets,
records), with two differences:

official (every pruning method; the default) -- LLaVA's ``mm_patch_merge_type='spatial'``, as the official HiPrune
    code forces on LLaVA-NeXT: the base image and every crop are pruned on their own 27 x 27 grid with int(N' / crops)
    tokens each (a ratio: round(729 * ratio) per crop); no unpadding, no newline tokens, no anyres_max downsampling.
    Order: base kept tokens, then the kept tokens of all sub-images in raster order over the stitched grid.
native (method none, and stages that leave the tokens to the LLM) -- HF's own layout, untouched: the stitched grid is
    unpadded, bilinearly downsampled when it holds more than 1.1^2 x 9 crops' worth of tokens (``anyres_max_9``) and
    given one ``image_newline`` per row. Pruning methods are refused here: the interpolation mixes tokens, so a kept
    token of a crop has no place in it. Records: the base grid, then the (downsampled) stitched grid as one grid.

LLM-side methods (FastV, PyramidDrop, SparseVLM: ``hiprune.adapters.llm_pruning``) run the native layout only:
nothing is pruned before the LLM, so the LLM gets HF's own sequence (the one the checkpoint was trained on), and an
image is one visual of the drop schedule: all its ``<image>`` tokens, base grid, unpadded (downsampled) crop grid and
its newline tokens, as on LLaVA-NeXT where an image is all its crops as laid out (its native layout also counts the
newlines as visual tokens the methods may drop). The budget is per image, a ratio of its tokens or a count (checked
before loading on the image filling the largest anyres grid, and again on every image). The evaluation's
``layout=auto`` (:func:`resolve_layout`) runs native for them; ``layout=official`` with one is refused (the 'spatial'
layout exists to prune crops before the LLM; unpruned it would feed the LLM up to 37 x 729 tokens it never saw).
Videos are refused by LLM-side methods.

Budgets are per crop (as LLaVA-NeXT's official mode): the crop count varies from 2 (base + 1) to 37 (base + 6 x 6),
so an int budget gives int(N' / crops) per crop (the adapter validates it on the largest grid: N' >= 37), and a
ratio keeps that share of every crop. HiPrune++ compares every crop with the mean LLM input embedding of its image's
prompt (no paired CLIP text tower: TRIM is refused). Methods that read the CLS token's attention are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from hiprune.adapters.base import LlmPromptEmbeddings, PruningSession, register_adapter
from hiprune.adapters.llava_next import LAYOUT_CHOICES, REDUCING, CropGrid, ImageLayout, LlavaNextAdapter
from hiprune.methods.base import Method

# HiPrune's object layer by relative depth: CLIP-L's 9 of 24 layers (the paper's probe), scaled to SigLIP's 26 and
# rounded; the deep (register) layer is the feature layer, as on CLIP-L. Not probed on real weights (eval.report.probe).
DEFAULT_OBJECT_LAYER = 10


def resolve_layout(layout: str, method: Method) -> str:
    """The layout a run uses: ``auto`` is ``native`` (HF's own sequence) for methods that leave the tokens to the LLM
    (``none``, LLM-side methods) and ``official`` (the 'spatial' pruning layout) for methods that prune before it."""
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"unknown LLaVA-OneVision layout {layout!r}; choose one of {LAYOUT_CHOICES}")
    if layout == "auto":
        return "native" if method.stage in ("none", "llm") else "official"
    return layout


@register_adapter
class LlavaOnevisionAdapter(LlmPromptEmbeddings, LlavaNextAdapter):
    family = "llava_onevision"
    model_types = (LlavaOnevisionForConditionalGeneration,)
    stages = ("none", "vision", "encoder", "llm")  # llm: native layout only, an image = all its <image> tokens
    has_cls = False
    # HiPrune++ compares prompts in the LLM's input-embedding space (the projected crop tokens live there)
    needs_prompt_encoder = False

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, layout: str = "official"):
        super().__init__(model, layout)
        self.max_crops = int(str(self.config.vision_aspect_ratio).removeprefix("anyres_max_"))
        self.tokenizer = None  # the processor's, for prompt-aware methods (set by install)

    def describe_encoder(self) -> dict[str, Any]:
        merge = {"official": "spatial: base + crops, no unpadding, no newline tokens",
                 "native": f"spatial_unpad + anyres_max_{self.max_crops} downsampling + image_newline (HF)"}
        return {**super().describe_encoder(), "merge": merge[self.layout],
                "default_object_layer": DEFAULT_OBJECT_LAYER}

    def image_layout(self, image_size: Any, method: Method) -> ImageLayout:
        layout = super().image_layout(image_size, method)
        if self.layout != "native":
            return layout
        _, _, rows, cols = layout.unpadded
        ratio = math.sqrt(rows * cols / (self.max_crops * self.side**2))
        if ratio <= 1.1:
            return layout
        # HF's anyres_max: the unpadded grid is resized to (int(rows // ratio), int(cols // ratio)), then newlines
        rows, cols = int(rows // ratio), int(cols // ratio)
        grids = (layout.grids[0], CropGrid(1, rows, cols, budget=rows * cols, keep=rows * cols))
        return ImageLayout("native", layout.crop_grid, self.side, grids, (0, 0, rows, cols), rows)

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        if method.stage == "llm" and self.layout != "native":
            raise ValueError(
                f"method {method.name!r} prunes inside the LLM, which gets HF's own LLaVA-OneVision sequence "
                "(layout=native); the 'spatial' layout (layout=official) is for methods that prune crops before the LLM"
            )
        if self.layout == "native" and method.stage in REDUCING:
            raise ValueError(
                f"method {method.name!r} reduces the crops' tokens, but the native LLaVA-OneVision layout downsamples "
                "the stitched crop grid by interpolation (anyres_max), where kept tokens have no place: pruning runs "
                "the 'spatial' layout (layout=official)"
            )
        super().check_supported(method, prompt_encoder)
        if prompt_encoder is not None:
            raise ValueError(
                f"the {self.family} adapter compares prompts with the LLM's own input embeddings; it takes no prompt "
                "encoder"
            )

    def decoder_drop_options(self) -> dict[str, Any]:
        return {"visual_inputs": ("pixel_values", "pixel_values_videos"),
                "refused_token_ids": {self.config.video_token_id: "videos are not pruned inside the LLM on "
                                      f"{self.family} (images only)"}}

    def patch_embeds(self, session: PruningSession, out: Any, tower: str = "image") -> torch.Tensor:
        """[crops, N, E] the crops' projected tokens (they live in the LLM's input-embedding space, as the prompts)."""
        return torch.cat(list(out.pooler_output))


__all__ = ["DEFAULT_OBJECT_LAYER", "LlavaOnevisionAdapter", "resolve_layout"]
