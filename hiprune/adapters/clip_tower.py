"""What the CLIP-tower families (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA) share: a CLS + square patch grid per encoder
row (an image, an anyres crop or a video frame), LLaVA's feature-layer convention, and where the encoder layers are."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from hiprune.adapters.base import Adapter, EncoderMerging, PruningError, PruningSession, patch_attribute
from hiprune.capture import Capture, Tap
from hiprune.methods.base import FEATURE_LAYER


class ClipTowerAdapter(Adapter):
    """Base of adapters whose model config has a CLIP ``vision_config``, ``vision_feature_layer`` (int) and
    ``vision_feature_select_strategy`` "default" (CLS dropped, one token per patch)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.inner = model.model
        self.config = model.config
        self.vision_config = self.config.vision_config
        # CLS towers drop their CLS token ("default"); towers without one (SigLIP) pass every token on ("full")
        strategy = "default" if self.has_cls else "full"
        if self.config.vision_feature_select_strategy != strategy:
            raise ValueError(
                f"only vision_feature_select_strategy={strategy!r} (one token per patch) has a token grid on the "
                f"{self.family} encoder; got {self.config.vision_feature_select_strategy!r}"
            )
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError(f"a single vision_feature_layer is required, got {self.config.vision_feature_layer!r}")
        side = self.vision_config.image_size // self.vision_config.patch_size
        self.grid = (side, side)

    def encoder_layers(self, tower: nn.Module) -> nn.ModuleList:
        return self.vision_model(tower).encoder.layers

    def vision_model(self, tower: nn.Module) -> nn.Module:
        return getattr(tower, "vision_model", tower)  # transformers >= 5.2x flattened CLIPVisionModel

    def vision_tower(self, tower: str = "image") -> nn.Module:
        return self.inner.vision_tower

    def num_encoder_layers(self) -> int:
        return len(self.encoder_layers(self.vision_tower()))

    def feature_layer(self) -> int:
        # hidden_states[k] is the output of layer k (hidden_states[0] = embeddings): index -j names layer L + 1 - j
        k = self.config.vision_feature_layer
        return k if k >= 0 else self.num_encoder_layers() + 1 + k

    def layer_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.encoder_layers(self.vision_tower(tower))[layer - 1]

    def attention_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.layer_module(layer, tower).self_attn

    def projector(self, tower: str = "image"):
        return self.inner.multi_modal_projector

    def cls_tokens(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """[rows, D] every encoder row's CLS token as the LLM would receive it: the feature layer's CLS state
        (``hidden_states`` of the tower, [0] = embeddings), projected like the patches (methods with ``keeps_cls``)."""
        return self.inner.multi_modal_projector(hidden_states[self.feature_layer()][:, 0])

    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe_encoder(self) -> dict[str, Any]:
        return {
            **super().describe_encoder(),
            "grid": list(self.grid),
            "cls": "scored, dropped from the grid (vision_feature_select_strategy=default)" if self.has_cls else "none",
            "merge": "none (one token per patch)",
        }

    # --- grids ---------------------------------------------------------------------------------------------
    def patch_captures(self, captured: dict[str, torch.Tensor], rows: int, unit: str = "") -> dict[str, torch.Tensor]:
        """Captures of ``rows`` encoder rows ([rows, 1 + N] or [rows, 1 + N, d], CLS first; [rows, N(, d)] on towers
        without CLS) -> their patch part [rows, N(, d)]; a capture of another shape is a PruningError."""
        n = self.num_patches()
        front = 1 if self.has_cls else 0
        out = {}
        for name, value in captured.items():
            if tuple(value.shape[:2]) != (rows, n + front):
                raise PruningError(
                    f"{unit + ' ' if unit else ''}score {name!r} has shape {tuple(value.shape)}, "
                    f"expected ({rows}, {n + front})"
                )
            out[name] = value[:, front:]
        return out

    def patch_embeds(self, session: PruningSession, out: Any, tower: str = "image"):
        """[rows, N, E] patch tokens in the prompt encoder's space (prompt-aware methods), from the tower output
        ``out``: its last layer, or the feature layer for methods whose ``prompt_patch_layer`` is FEATURE_LAYER."""
        post_layernorm = self.vision_model(self.vision_tower(tower)).post_layernorm
        if session.method.prompt_patch_layer == FEATURE_LAYER:
            states = out.hidden_states[self.feature_layer()]
        else:
            states = out.last_hidden_state
        return session.prompt_encoder.encode_patches(states, post_layernorm)

    # --- encoder-stage methods (merging between CLIP layers) ----------------------------------------------
    def install_merging(self, stack: ExitStack, session: PruningSession, tower: str = "image") -> EncoderMerging:
        """Run an encoder-stage method inside ``tower``: every layer up to the feature layer merges between its
        attention and its MLP (CLIP's pre-norm layer: x + attn(ln1(x)), merge, then + mlp(ln2(.))), and every
        such layer attends with proportional attention (+ log size per key, as an additive mask: SDPA stays)."""
        layers = self.encoder_layers(self.vision_tower(tower))[: self.feature_layer()]
        merging = EncoderMerging(session.method, self.num_patches(), len(layers), protected=int(self.has_cls))
        for index, layer in enumerate(layers, start=1):
            patch_attribute(stack, layer, "forward", _merging_forward(layer, index, merging))
        return merging


def _merging_forward(layer: nn.Module, index: int, merging: EncoderMerging):
    implementation = layer.self_attn.config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"merging inside the vision encoder needs eager or SDPA attention, not {implementation!r}")

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        bias = merging.attention_bias(hidden_states.dtype)
        if bias is not None:
            attention_mask = bias if attention_mask is None else attention_mask + bias
        residual = hidden_states
        with Capture({layer.self_attn: [Tap("keys", "keys")]}) as capture:
            attended, _ = layer.self_attn(
                hidden_states=layer.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs
            )
            keys = capture.collect()["keys"]
        hidden_states = merging.step(index, residual + attended, keys)
        return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))

    return forward
