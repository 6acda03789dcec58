"""InternVL3 (``transformers.InternVLForConditionalGeneration``, the ``-hf`` checkpoints): prune every 448-px tile.

Geometry. An image is cut into 1..12 dynamic 448 x 448 tiles (the best-fitting aspect ratio) plus a thumbnail of the
whole image when there is more than one tile; every tile is its own InternViT row (CLS + 32 x 32 patches of 14 px).
After the feature layer the CLS token is dropped (``vision_feature_select_strategy="default"``) and a pixel shuffle
concatenates every 2 x 2 patch block into one token before the projector: each tile passes a 16 x 16 grid of 256
tokens to the LLM, token (r, c) standing for patches rows 2r..2r+1 x cols 2c..2c+1. The LLM (Qwen2 / Qwen2.5) sees
``<img>`` + the tokens of all tiles of the image in tile order + ``</img>``, with contiguous 1D positions.

Pruning: every tile is one 16 x 16 grid, pruned on its own, its kept tokens in raster order, tiles in their order
(thumbnail last); the processor emits the kept count between ``<img>`` and ``</img>``. Scores, keys and hidden
states of a token are the mean over its 2 x 2 patches (as on Qwen2.5-VL); a CLS request reads the CLS row of the
tile. Budget: the tile count varies per image and the encoder call does not know which image a tile belongs to, so
the budget is a ratio of every tile (``budget=0.25``: round(256 x 0.25) per tile, the same share of every image), as
LLaVA-NeXT's official per-crop rule; an int budget is refused (its int(N' / tiles) split needs the image's tile
count). Refused before loading: merging inside the encoder (the pixel shuffle needs the full 32 x 32 patch grid),
VisionZip (CLS tokens in front are not laid out), prompt-aware methods (HiPrune++, TRIM: a tile's prompt is unknown
to the encoder call).

LLM-side methods (FastV, PyramidDrop, SparseVLM: ``hiprune.adapters.llm_pruning``): nothing is pruned before the LLM;
an image is one visual of the drop schedule, all its tiles (thumbnail included) between ``<img>`` and ``</img>``
(those two tokens are text, never dropped), with contiguous 1D positions (renumbered or kept as the method says). As
on Qwen2.5-VL the budget is per image, a ratio of its tokens (256 x tiles) or a count, and the schedule is resolved
for each image's count; it is checked before loading on a one-tile image (256 tokens, the fewest an image has). A
batch whose images differ in tile count runs in groups of equal counts (the evaluation does so).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration

from hiprune.adapters.base import (
    Adapter,
    GridInput,
    PruningError,
    PruningSession,
    patch_attribute,
    register_adapter,
    stable_ids,
)
from hiprune.adapters.llm_pruning import check_llm_method, install_decoder_drop
from hiprune.methods.base import Method, resolve_budget

# HiPrune's object layer by relative depth: CLIP-L's 9 of 24 layers; InternViT-300M has 24 (layer 9), the feature
# layer is its last (the deep layer, as on CLIP-L). Not probed on real weights.
RELATIVE_OBJECT_DEPTH = 9 / 24


@register_adapter
class InternVLAdapter(Adapter):
    family = "internvl"
    model_types = (InternVLForConditionalGeneration,)
    stages = ("none", "vision", "llm")  # llm: hiprune.adapters.llm_pruning, an image = all its tiles
    needs_prompt_encoder = False
    has_cls = True
    stage_limits = {"encoder": "its pixel shuffle reads the full 32 x 32 patch grid of every tile, which merging inside "
                               "the encoder would break; use a method that prunes before the LLM"}

    def __init__(self, model: InternVLForConditionalGeneration):
        super().__init__(model)
        self.inner = model.model
        self.config = model.config
        self.vision_config = self.config.vision_config
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError("the InternVL adapter needs vision_feature_select_strategy='default' (CLS dropped)")
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError(f"a single vision_feature_layer is required, got {self.config.vision_feature_layer!r}")
        size, patch = self.vision_config.image_size, self.vision_config.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        self.side = int(size) // int(patch)  # 32 patches per tile side
        self.shuffle = round(1 / float(self.config.downsample_ratio))  # 2: a 2 x 2 block -> 1 token
        if self.side % self.shuffle:
            raise ValueError(f"a {self.side} x {self.side} patch grid cannot be pixel-shuffled by {self.shuffle}")
        self.grid = (self.side // self.shuffle, self.side // self.shuffle)

    # --- encoder description -------------------------------------------------------------------------------
    def encoder_layers(self) -> nn.ModuleList:
        return self.inner.vision_tower.encoder.layer

    def num_encoder_layers(self) -> int:
        return len(self.encoder_layers())

    def feature_layer(self) -> int:
        k = self.config.vision_feature_layer
        return k if k >= 0 else self.num_encoder_layers() + 1 + k

    def layer_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.encoder_layers()[layer - 1]

    def attention_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.layer_module(layer).attention

    def default_object_layer(self) -> int:
        return round(RELATIVE_OBJECT_DEPTH * self.num_encoder_layers())

    def tokens_per_tile(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe_encoder(self) -> dict[str, Any]:
        return {
            **super().describe_encoder(),
            "grid": list(self.grid),
            "grids_per_image": "1..12 dynamic 448-px tiles + a thumbnail (more than one tile), each its own grid",
            "cls": "scored, dropped before the pixel shuffle (vision_feature_select_strategy=default)",
            "merge": f"pixel shuffle: {self.shuffle}x{self.shuffle} patches -> 1 token; score = mean of the "
                     f"{self.shuffle**2} patch scores",
            "default_object_layer": self.default_object_layer(),
        }

    def tokens_per_image(self, method: Method) -> None:
        """None: the count depends on the image's tile count (see :meth:`kept_per_tile`)."""
        self.kept_per_tile(method)  # validates the budget
        return None

    def kept_per_tile(self, method: Method) -> int:
        n = self.tokens_per_tile()
        if method.stage != "vision":
            return n
        keep = method.kept_count(self.tile_budget(method))
        if keep > n:
            raise ValueError(f"method {method.name!r} keeps {keep} tokens of a tile with only {n}")
        return keep

    def tile_budget(self, method: Method) -> int:
        if not isinstance(method.budget, float):
            raise ValueError(
                f"budget {method.budget!r}: on InternVL the budget is a ratio of every tile (e.g. budget=0.25: "
                f"round({self.tokens_per_tile()} x 0.25) tokens per tile); an int budget would need the image's tile "
                "count, which the encoder call does not know"
            )
        return resolve_budget(method.budget, self.tokens_per_tile())

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        if method.needs_prompt:
            raise ValueError(
                f"method {method.name!r} compares visual tokens with the prompt; the {self.family} adapter cannot: "
                "the encoder call does not know which image (prompt) a tile belongs to"
            )
        super().check_supported(method, prompt_encoder)
        if method.stage == "vision":
            self.kept_per_tile(method)
        if method.stage == "llm":  # a one-tile image: the fewest tokens an image has
            check_llm_method(method, self.config.text_config, self.family, self.tokens_per_tile())

    # --- captures ------------------------------------------------------------------------------------------
    def merged_captures(self, captured: dict[str, torch.Tensor], tiles: int) -> dict[str, torch.Tensor]:
        """[tiles, 1 + side^2(, d)] captures (CLS first) -> [tiles, 256(, d)]: CLS dropped, the mean over every
        2 x 2 patch block in the pixel shuffle's order (token (r, c) <- patch rows 2r, 2r+1 x cols 2c, 2c+1)."""
        out = {}
        s, k = self.side, self.shuffle
        for name, value in captured.items():
            if tuple(value.shape[:2]) != (tiles, 1 + s * s):
                raise PruningError(f"capture {name!r} has shape {tuple(value.shape)}, expected ({tiles}, {1 + s * s})")
            patches = value[:, 1:].reshape(tiles, s // k, k, s // k, k, *value.shape[2:])
            out[name] = patches.mean(dim=(2, 4)).reshape(tiles, (s // k) ** 2, *value.shape[2:])
        return out

    # --- installation --------------------------------------------------------------------------------------
    def install(self, stack: ExitStack, session: PruningSession, processor: Any | None) -> None:
        self.install_model(stack, session)
        if processor is None:
            return
        if not all(hasattr(processor, a) for a in ("replace_image_token", "start_image_token", "end_image_token")):
            raise TypeError(f"cannot set the image token count of {type(processor).__name__}")
        keep = self.kept_per_tile(session.method)

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            tiles = int(image_inputs["num_patches"][image_idx])
            return f"{processor.start_image_token}{processor.image_token * (keep * tiles)}{processor.end_image_token}"

        patch_attribute(stack, processor, "replace_image_token", replace_image_token)

    def placeholder_counts(self, method: Method) -> dict:
        keep = self.kept_per_tile(method)
        return {"image": lambda inputs, index: keep * int(inputs["num_patches"][index])}

    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        method = session.method
        keep = self.kept_per_tile(method)
        budget = self.tile_budget(method) if method.stage == "vision" else None
        original = self.inner.get_image_features

        def get_image_features(pixel_values: torch.Tensor, *args, **kwargs):
            with self.capture(method) as capture:
                out = original(pixel_values, *args, **kwargs)
                captured = capture.collect()
            features = out.pooler_output  # [tiles, 256, D]
            tiles = features.shape[0]
            if features.shape[1] != self.tokens_per_tile():
                raise PruningError(f"expected {self.tokens_per_tile()} tokens per tile, got {features.shape[1]}")
            if method.stage != "vision":
                self.record_unpruned(session, [self.tokens_per_tile()] * tiles)
                return out
            merged = self.merged_captures(captured, tiles)
            ids = stable_ids(pixel_values)
            grids = [GridInput(self.grid, features[t], {name: value[t] for name, value in merged.items()}, budget,
                               keep, ids[t], visual=t) for t in range(tiles)]
            kept = self.select_grids(session, grids, tiles)
            out.pooler_output = torch.stack([grid.features for grid in kept])
            return out

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        if method.stage == "llm":  # every image (all its tiles) is one visual of the drop schedule
            install_decoder_drop(stack, session, self.inner, self.inner.language_model, [self.config.image_token_id])


__all__ = ["InternVLAdapter"]
