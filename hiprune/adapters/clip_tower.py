"""What the CLIP-tower families (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA) share: a CLS + square patch grid per image,
LLaVA's feature-layer convention, and where the encoder layers live."""

from __future__ import annotations

from typing import Any

from torch import nn

from hiprune.adapters.base import Adapter


class ClipTowerAdapter(Adapter):
    """Base of adapters whose model config has a CLIP ``vision_config``, ``vision_feature_layer`` (int) and
    ``vision_feature_select_strategy`` "default" (CLS dropped, one token per patch)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.inner = model.model
        self.config = model.config
        self.vision_config = self.config.vision_config
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                "only vision_feature_select_strategy='default' (CLS dropped, one token per patch) has a token grid; "
                f"got {self.config.vision_feature_select_strategy!r}"
            )
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError(f"a single vision_feature_layer is required, got {self.config.vision_feature_layer!r}")
        side = self.vision_config.image_size // self.vision_config.patch_size
        self.grid = (side, side)

    def encoder_layers(self, tower: nn.Module) -> nn.ModuleList:
        return getattr(tower, "vision_model", tower).encoder.layers  # transformers >= 5.2x flattened CLIPVisionModel

    def vision_tower(self) -> nn.Module:
        return self.inner.vision_tower

    def num_encoder_layers(self) -> int:
        return len(self.encoder_layers(self.vision_tower()))

    def feature_layer(self) -> int:
        # hidden_states[k] is the output of layer k (hidden_states[0] = embeddings): index -j names layer L + 1 - j
        k = self.config.vision_feature_layer
        return k if k >= 0 else self.num_encoder_layers() + 1 + k

    def attention_module(self, layer: int) -> nn.Module:
        return self.encoder_layers(self.vision_tower())[layer - 1].self_attn

    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe_encoder(self) -> dict[str, Any]:
        return {
            **super().describe_encoder(),
            "grid": list(self.grid),
            "cls": "scored, dropped from the grid (vision_feature_select_strategy=default)",
            "merge": "none (one token per patch)",
        }
