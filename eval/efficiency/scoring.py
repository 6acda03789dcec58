"""Benchmark "scoring overhead": what HiPrune's attention scores cost on top of the vision tower the VLM runs anyway.

    python -m eval.efficiency.scoring                          # CLIP ViT-L/14-336 at real shape, random weights
    python -m eval.efficiency.scoring --shape qwen2.5-vl-3b    # Qwen2.5-VL-3B vision tower, one 448 x 448 image
    python -m eval.efficiency.scoring --device cuda --repeats 30 --json results/bench_scoring.json
    python -m eval.efficiency.scoring --shape tiny --repeats 1 --warmup 0        # smoke runs (seconds)
    python -m eval.efficiency.scoring --shape qwen-tiny --repeats 1 --warmup 0

Three variants run on one random-weight vision tower, in one process, interleaved round by round (the order rotates
every round so no variant always runs first, e.g. on warm caches).

CLIP shapes (``clip-l-336``: LLaVA-1.5's tower; ``tiny``):

  plain      the tower under SDPA, requesting the feature layer's hidden state the way transformers' LLaVA
             ``get_image_features`` does (``output_hidden_states=vision_feature_layer``; hidden_states[-2]).
  ours       the same call under SDPA inside ``hiprune.capture.AttentionScores`` on the object layer (9) and the
             deep layer (23, the one whose output is hidden_states[-2]); then ``select_hiprune`` on the CLS-dropped
             scores.
  reference  the authors' approach: the whole tower in eager attention with ``output_attentions=True`` (all 24
             maps materialised), ``global_attention`` on layers 9 and 23, ``select_hiprune``. It requests the same
             hidden state as the others (the official code asks for all 25; that adds references, not compute), so
             the three calls differ only in how the scores are obtained.

Qwen2.5-VL shapes (``qwen2.5-vl-3b``: the 3B checkpoint's vision tower, configs/arch/qwen2.5-vl-3b-instruct: 32 blocks,
hidden 1280, 16 heads, patch 14, 2 x 2 merge, 112-pixel windows, full attention in blocks 8, 16, 24, 32; ``qwen-tiny``):
one square image of ``--image-size`` pixels, default 448 x 448 = 32 x 32 patches -> 16 x 16 = 256 merged tokens. That is
lmms-eval's ``min_pixels`` (256 * 28 * 28), the smallest image the evaluation feeds the model: larger images only make
the dense reference relatively dearer (its maps grow with the square of the patch count). Budget: round(256 * 0.334)
= 86 merged tokens (the paper's 33.4 %, half to even as ``resolve_budget``); object block 16, deep block 32 (the last,
whose output the merger reads); both are full-attention blocks.

  plain      ``Qwen2_5_VisionTransformerPretrainedModel`` under SDPA, merged features (``pooler_output``): what
             Qwen2.5-VL's ``get_image_features`` runs without pruning.
  ours       the same call with the object and deep blocks' attention rerouted by the adapter's own
             ``hiprune.capture.AttentionScores`` (per-chunk records); per-chunk scores -> per-merged-token raster
             scores by the adapter's ``merged_captures`` (window order undone, mean of each 2 x 2 group);
             ``select_hiprune``.
  reference  the authors' Qwen code: every one of the 32 blocks computes its attention densely over the whole packed
             sequence, H x T x T probabilities with the block's window / image chunks as an additive mask (the
             official eager path), and each block's map is reduced to per-key scores right after the block (the
             official code keeps the 32 reduced vectors, not the maps); blocks 16 and 32 feed ``select_hiprune``.
             transformers' Qwen vision tower cannot return attention maps (``output_attentions=True`` records the
             attention modules' outputs), so every block is routed through a registered attention function that
             builds the mask and calls the modeling file's own ``eager_attention_forward``. Its name contains "flash"
             on purpose: only such implementations receive the whole packed sequence with ``cu_seqlens`` in one
             call; any other is called once per window, which cannot materialise the block's full map.

Reported: per-round ratios ours/plain and reference/plain (median and IQR over the repeats after warm-up), the
absolute times, and the peak memory of each variant. The goal is ours/plain <= 1.05 (median).

Correctness is checked on every call, outside the timed region: ours and reference must keep identical indices
(a RuntimeError otherwise, so the benchmark never times two different computations), and the features of ours
(hidden state for CLIP, merged features for Qwen) are compared bit-for-bit with plain's (capture must not change the
model's output).

Weights: the model class on its config with transformers' own random init, then the query and key projections (for Qwen
the query and key rows of the fused qkv projection) scaled by ``--qk-gain``. With the stock init the attention of a
random tower is almost uniform (max row probability ~1/T), so per-key scores differ by ~1e-7 relative and the top-k
ranking is decided by rounding noise; the gain makes attention peaked (as in a trained tower) so that the index check
compares rankings, not noise. Each shape's default gives attention logits of std ~3 for unit-RMS inputs: 12 for CLIP
(q/k init std ~0.0045), 2.4 for Qwen2.5-VL-3B (std 0.02, hidden 1280; the logit std grows with gain^2). Too large a gain
makes a deep random tower chaotic: at gain 12 (logit std ~74) the Qwen-3B reference, whose attention differs from SDPA's
only by rounding, ends with merged features as far from plain's as they are large (max |diff| 6.0 of 6.9, float32) and
keeps other tokens than ours. The gain changes no shape, kernel or FLOP count; weights never touch denormal range at the
defaults. The CLIP tower is built on the CPU in float32 and moved; the Qwen tower (670 M parameters at 3B shape) is
built on the device in the benchmark's dtype.

Timing and memory probes as eval/efficiency/measure.py takes them. Memory:
  CUDA: in process, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, per variant; reported
        as the peak and as the peak minus what was allocated before the call (weights + input).
  CPU:  one fresh subprocess per variant (glibc malloc with a fixed mmap threshold, so large tensors are returned to
        the OS when freed): build the tower, run the variant once (warm-up), free, ``malloc_trim``, then reset the
        kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5) and run the variant again. Reported: VmHWM after the
        call minus VmRSS before it = the peak resident memory the call added (activations, kept hidden states,
        attention maps, scores, outputs, allocator slack). tracemalloc would not see torch's allocations.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AttentionInterface,
    CLIPVisionConfig,
    CLIPVisionModel,
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from eval.config import REPO_ROOT
from eval.efficiency.measure import (
    DTYPES,
    device_name,
    load_average,
    malloc_trim,
    proc_status_kb,
    quartiles,
    reset_peak_rss,
    time_call,
    timer_name,
)
from hiprune.adapters.qwen2_5_vl import Qwen25VLAdapter
from hiprune.capture import AttentionScores
from hiprune.methods.base import rank_descending, resolve_budget, top_k
from hiprune.methods.hiprune import BUFFER_OFFSETS, anchor_count, max_anchor_and_buffer_count, select_hiprune
from hiprune.scores import all_finite, global_attention

GOAL_RATIO = 1.05
VARIANTS = ("plain", "ours", "reference")
_PROBE_MARKER = "BENCH_SCORING_MEMORY "
# Registered attention function of the Qwen reference (see the module docstring for the "flash" in its name).
DENSE_REFERENCE_ATTENTION = "hiprune_bench_dense_eager_via_flash_call_path"


class IndicesMismatch(RuntimeError):
    """Ours and the reference kept different tokens: the benchmark would compare two different computations."""


# --- shapes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipShape:
    """A CLIP vision tower and the HiPrune settings that go with it."""

    family: ClassVar[str] = "clip"

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    object_layer: int  # 1-based encoder layer of the object score
    vision_feature_layer: int  # hidden_states index LLaVA passes on (-2: output of layer L - 1)
    budget: int
    default_qk_gain: float = 12.0  # attention-logit std ~3 on CLIP's init (see the module docstring)

    @property
    def side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.side, self.side)

    @property
    def num_patches(self) -> int:
        return self.side * self.side

    @property
    def scored_tokens(self) -> int:
        """Tokens HiPrune chooses from per image (the patches; CLS is dropped)."""
        return self.num_patches

    @property
    def tokens(self) -> int:
        """Sequence length per image in the tower: patches + CLS."""
        return self.num_patches + 1

    @property
    def deep_layer(self) -> int:
        """1-based encoder layer whose output is hidden_states[vision_feature_layer] (hidden_states[0] = embeddings)."""
        k = self.vision_feature_layer
        return k if k >= 0 else self.num_layers + 1 + k

    def validate(self) -> None:
        for name, layer in (("object", self.object_layer), ("deep", self.deep_layer)):
            if not 1 <= layer <= self.num_layers:
                raise ValueError(f"{name} layer {layer} is outside the tower's layers 1..{self.num_layers}")
        if not 1 <= self.budget <= self.num_patches:
            raise ValueError(f"budget {self.budget} must be in [1, {self.num_patches}]")

    def with_budget(self, budget: int) -> ClipShape:
        return replace(self, budget=budget)

    def with_image_size(self, image_size: int) -> ClipShape:
        raise ValueError("--image-size applies to the Qwen2.5-VL shapes (dynamic resolution); CLIP's is fixed")

    def describe(self) -> dict:
        fields = asdict(self)
        del fields["default_qk_gain"]  # the gain used is the config's qk_gain
        return {
            "family": self.family,
            **fields,
            "deep_layer": self.deep_layer,
            "grid": list(self.grid),
            "tokens": self.tokens,
            "scored_tokens": self.scored_tokens,
        }

    def build_tower(self, dtype: torch.dtype, device: torch.device, seed: int, qk_gain: float):
        config = CLIPVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            attn_implementation="sdpa",
        )
        torch.manual_seed(seed)
        tower = CLIPVisionModel(config).eval()
        with torch.no_grad():
            for layer in tower.encoder.layers:  # transformers >= 5.2x: no .vision_model level
                layer.self_attn.q_proj.weight.mul_(qk_gain)
                layer.self_attn.k_proj.weight.mul_(qk_gain)
        tower = tower.to(device=device, dtype=dtype)
        if tower.config._attn_implementation != "sdpa":
            raise RuntimeError(f"expected the tower under SDPA, got {tower.config._attn_implementation!r}")
        return tower

    def make_inputs(self, batch_size: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed + 1)
        pixels = torch.randn(batch_size, 3, self.image_size, self.image_size, generator=g)
        return {"pixel_values": pixels.to(device=device, dtype=dtype)}

    def make_variants(self, tower) -> dict[str, Variant]:
        return {cls.name: cls(tower, self) for cls in (Plain, Ours, Reference)}


@dataclass(frozen=True)
class QwenShape:
    """A Qwen2.5-VL vision tower (windowed and full-attention blocks, 2 x 2 merger), one square image size, HiPrune."""

    family: ClassVar[str] = "qwen2_5_vl"

    hidden_size: int
    intermediate_size: int
    num_layers: int  # vision_config.depth
    num_heads: int
    out_hidden_size: int  # merger output = the LLM's hidden size
    patch_size: int
    spatial_merge_size: int
    window_size: int  # pixels
    full_attention_layers: tuple[int, ...]  # 1-based blocks with full attention (fullatt_block_indexes + 1)
    image_size: int  # pixels per side of the square image
    object_layer: int  # 1-based block of the object score; the deep score comes from the last block
    budget_ratio: float  # kept share of the merged tokens, N' = round(n * ratio) half to even
    budget_count: int | None = None  # --budget: an absolute count instead of the ratio
    default_qk_gain: float = 2.4  # attention-logit std ~3 at hidden 1280 on the 0.02 init (module docstring)

    @property
    def patch_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        """The merged-token grid HiPrune selects on."""
        side = self.patch_side // self.spatial_merge_size
        return (side, side)

    @property
    def scored_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        """Sequence length per image in the tower: patches (merged only after the last block)."""
        return self.patch_side * self.patch_side

    @property
    def deep_layer(self) -> int:
        return self.num_layers  # the merger reads the last block's output

    @property
    def budget(self) -> int:
        return resolve_budget(
            self.budget_count if self.budget_count is not None else self.budget_ratio, self.scored_tokens
        )

    def validate(self) -> None:
        unit = self.patch_size * self.spatial_merge_size
        if self.image_size % unit:
            raise ValueError(f"image size {self.image_size} must be a multiple of patch x merge = {unit} pixels")
        for name, layer in (("object", self.object_layer), ("deep", self.deep_layer)):
            if not 1 <= layer <= self.num_layers:
                raise ValueError(f"{name} block {layer} is outside the tower's blocks 1..{self.num_layers}")
        if self.object_layer == self.deep_layer:
            raise ValueError(f"object and deep block are both {self.deep_layer}; HiPrune scores two different blocks")
        if not all(1 <= layer <= self.num_layers for layer in self.full_attention_layers):
            raise ValueError(f"full-attention blocks {self.full_attention_layers} outside 1..{self.num_layers}")
        if not 1 <= self.budget <= self.scored_tokens:
            raise ValueError(f"budget {self.budget} must be in [1, {self.scored_tokens}]")

    def with_budget(self, budget: int) -> QwenShape:
        return replace(self, budget_count=budget)

    def with_image_size(self, image_size: int) -> QwenShape:
        return replace(self, image_size=image_size)

    def describe(self) -> dict:
        fields = asdict(self)
        del fields["default_qk_gain"]  # the gain used is the config's qk_gain
        return {
            "family": self.family,
            **fields,
            "full_attention_layers": list(self.full_attention_layers),
            "deep_layer": self.deep_layer,
            "budget": self.budget,
            "patch_grid": [self.patch_side, self.patch_side],
            "grid": list(self.grid),
            "tokens": self.tokens,
            "scored_tokens": self.scored_tokens,
        }

    def vision_config(self, attn_implementation: str = "sdpa"):
        return Qwen2_5_VLVisionConfig(
            depth=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            out_hidden_size=self.out_hidden_size,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=2,
            in_channels=3,
            window_size=self.window_size,
            fullatt_block_indexes=[layer - 1 for layer in self.full_attention_layers],
            attn_implementation=attn_implementation,
        )

    def build_tower(self, dtype: torch.dtype, device: torch.device, seed: int, qk_gain: float):
        torch.manual_seed(seed)
        with torch.device(device):  # 670 M parameters at 3B shape: initialise in place, no float32 CPU copy
            tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(self.vision_config(), dtype=dtype).eval()
        with torch.no_grad():
            for block in tower.blocks:
                # fused qkv: output rows [0, dim) are the queries, [dim, 2 dim) the keys
                block.attn.qkv.weight[: 2 * self.hidden_size].mul_(qk_gain)
                block.attn.qkv.bias[: 2 * self.hidden_size].mul_(qk_gain)
        if tower.config._attn_implementation != "sdpa":
            raise RuntimeError(f"expected the tower under SDPA, got {tower.config._attn_implementation!r}")
        full = [i + 1 for i in tower.fullatt_block_indexes]
        if full != list(self.full_attention_layers):
            raise RuntimeError(
                f"tower has full attention in blocks {full}, expected {list(self.full_attention_layers)}"
            )
        return tower

    def make_inputs(self, batch_size: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
        """``batch_size`` images of the shape's size, as the Qwen2.5-VL processor packs them: one row per patch of
        3 x 2 (temporal) x 14 x 14 values, all images' patches concatenated, and one (t, h, w) grid row per image."""
        g = torch.Generator().manual_seed(seed + 1)
        patch_values = 3 * 2 * self.patch_size * self.patch_size
        pixels = torch.randn(batch_size * self.tokens, patch_values, generator=g)
        grid_thw = torch.tensor([[1, self.patch_side, self.patch_side]] * batch_size, dtype=torch.long)
        return {"pixel_values": pixels.to(device=device, dtype=dtype), "grid_thw": grid_thw.to(device)}

    def make_variants(self, tower) -> dict[str, Variant]:
        return {cls.name: cls(tower, self) for cls in (QwenPlain, QwenOurs, QwenReference)}


SHAPES: dict[str, ClipShape | QwenShape] = {
    # openai/clip-vit-large-patch14-336 as LLaVA-1.5 uses it: 24 x 24 patches + CLS, object layer 9, feature layer -2.
    "clip-l-336": ClipShape(1024, 4096, 24, 16, 336, 14, object_layer=9, vision_feature_layer=-2, budget=192),
    # Smoke shape: 8 x 8 patches; budget 32 -> round(32 * 0.1 / 5) = 1 anchor.
    "tiny": ClipShape(64, 256, 6, 4, 112, 14, object_layer=3, vision_feature_layer=-2, budget=32),
    # Qwen2.5-VL-3B's vision tower (configs/arch/qwen2.5-vl-3b-instruct/config.json), one 448 x 448 image:
    # 32 x 32 patches -> 16 x 16 = 256 merged tokens, budget round(256 * 0.334) = 86, object block 16, deep block 32.
    "qwen2.5-vl-3b": QwenShape(
        hidden_size=1280,
        intermediate_size=3420,
        num_layers=32,
        num_heads=16,
        out_hidden_size=2048,
        patch_size=14,
        spatial_merge_size=2,
        window_size=112,
        full_attention_layers=(8, 16, 24, 32),
        image_size=448,
        object_layer=16,
        budget_ratio=0.334,
    ),
    # Smoke shape: 280 px -> 20 x 20 patches -> 10 x 10 = 100 merged tokens in 4 x 4-token windows (edge windows are
    # smaller, so undoing the window order is exercised); full attention in blocks 2 and 4 (object, deep); budget
    # round(100 * 0.334) = 33 -> 1 anchor.
    "qwen-tiny": QwenShape(
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        out_hidden_size=32,
        patch_size=14,
        spatial_merge_size=2,
        window_size=112,
        full_attention_layers=(2, 4),
        image_size=280,
        object_layer=2,
        budget_ratio=0.334,
        default_qk_gain=12.0,  # logit std ~3.7 at hidden 64
    ),
}


# --- the three variants ----------------------------------------------------------------------------------------
class Variant:
    """One way to get the VLM's visual features (and, for pruning variants, the kept indices) from the inputs.

    ``setup``/``teardown`` run outside the timed region (they model a load-time choice: the official code loads
    the tower in eager mode once); ``__call__`` is what is timed.
    """

    name: str
    description: str

    def __init__(self, tower, shape):
        self.tower = tower
        self.shape = shape

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ClipVariant(Variant):
    def _forward(self, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[Any, torch.Tensor]:
        k = self.shape.vision_feature_layer
        # transformers' LLaVA get_image_features: output_hidden_states=vision_feature_layer selects that state only.
        out = self.tower(pixel_values=inputs["pixel_values"], output_hidden_states=k, **kwargs)
        return out, out.hidden_states[k][:, 1:]  # vision_feature_select_strategy "default": drop CLS


class Plain(ClipVariant):
    name = "plain"
    description = "SDPA tower, hidden_states[feature layer] only (what LLaVA runs without pruning)"

    def __call__(self, inputs):
        _, features = self._forward(inputs)
        return {"features": features}


class Ours(ClipVariant):
    name = "ours"
    description = "SDPA tower + AttentionScores on the object and deep layers + select_hiprune"

    def __call__(self, inputs):
        layers = self.tower.encoder.layers
        modules = {
            "object": layers[self.shape.object_layer - 1].self_attn,
            "deep": layers[self.shape.deep_layer - 1].self_attn,
        }
        with AttentionScores(modules) as capture:
            _, features = self._forward(inputs)
            scores = capture.collect()
        object_scores, deep_scores = scores["object"][:, 1:], scores["deep"][:, 1:]  # drop the CLS key column
        # as the pipeline runs it: finiteness as a device flag (checked outside the timed region, as the adapter reads
        # it back with the kept indices), a selection that reads nothing back
        finite = all_finite(object_scores, deep_scores)
        indices = select_hiprune(object_scores, deep_scores, self.shape.grid, self.shape.budget, check_finite=False)
        return {"features": features, "indices": indices, "object": object_scores, "deep": deep_scores,
                "finite": finite}


class Reference(ClipVariant):
    name = "reference"
    description = "eager tower with output_attentions=True (all layers) + global_attention + select_hiprune"

    def setup(self):
        self.tower.set_attn_implementation("eager")
        if self.tower.encoder.layers[0].self_attn.config._attn_implementation != "eager":
            raise RuntimeError("could not switch the tower's layers to eager attention")

    def teardown(self):
        self.tower.set_attn_implementation("sdpa")

    def __call__(self, inputs):
        out, features = self._forward(inputs, output_attentions=True)
        if len(out.attentions) != self.shape.num_layers:
            raise RuntimeError(f"expected {self.shape.num_layers} attention maps, got {len(out.attentions)}")
        object_scores = global_attention(out.attentions[self.shape.object_layer - 1], skip_cls=True)
        deep_scores = global_attention(out.attentions[self.shape.deep_layer - 1], skip_cls=True)
        indices = select_hiprune(object_scores, deep_scores, self.shape.grid, self.shape.budget)
        return {"features": features, "indices": indices, "object": object_scores, "deep": deep_scores}


class QwenVariant(Variant):
    def __init__(self, tower, shape: QwenShape):
        super().__init__(tower, shape)
        # The adapter reads only ``.model.visual`` and ``.config.vision_config`` of a Qwen2_5_VLForConditionalGeneration
        # for its block lookup and score merging; this tower-only stand-in runs that code without a language model.
        stand_in = SimpleNamespace(
            model=SimpleNamespace(visual=tower), config=SimpleNamespace(vision_config=tower.config)
        )
        self.adapter = Qwen25VLAdapter(stand_in)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # Qwen2_5_VLModel.get_image_features: the merged features, raster order, all images concatenated.
        return self.tower(hidden_states=inputs["pixel_values"], grid_thw=inputs["grid_thw"]).pooler_output

    def _select(self, object_chunks, deep_chunks, grid_thw) -> dict[str, torch.Tensor]:
        object_scores = torch.stack(self.adapter.merged_captures(object_chunks, grid_thw))  # [images, merged tokens]
        deep_scores = torch.stack(self.adapter.merged_captures(deep_chunks, grid_thw))
        indices = select_hiprune(object_scores, deep_scores, self.shape.grid, self.shape.budget)
        return {"indices": indices, "object": object_scores, "deep": deep_scores}


class QwenPlain(QwenVariant):
    name = "plain"
    description = "SDPA vision tower, merged features (what Qwen2.5-VL runs without pruning)"

    def __call__(self, inputs):
        return {"features": self._forward(inputs)}


class QwenOurs(QwenVariant):
    name = "ours"
    description = "SDPA vision tower + AttentionScores on the object and deep blocks + select_hiprune"

    def __call__(self, inputs):
        modules = {
            "object": self.adapter.attention_module(self.shape.object_layer),
            "deep": self.adapter.attention_module(self.shape.deep_layer),
        }
        with AttentionScores(modules) as capture:
            features = self._forward(inputs)
            selected = self._select(capture.chunks.get("object"), capture.chunks.get("deep"), inputs["grid_thw"])
        return {"features": features, **selected}


def _dense_masked_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The official Qwen eager attention of one block: all chunks of the packed sequence in one H x T x T map.

    Called once per block with the whole packed sequence (the module's flash call path, see the module docstring);
    the block's image / window chunks become an additive finfo.min mask as in the authors' code, the output comes
    from transformers' own ``eager_attention_forward``, and the map is reduced to per-key scores at once.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        raise RuntimeError(
            "the dense reference attention was called without cu_seqlens: transformers' Qwen vision attention no "
            "longer sends the whole packed sequence to implementations named *flash*; the reference cannot build "
            "each block's full map this way"
        )
    length = query.shape[2]
    chunk_lengths = cu_seqlens.diff().long()
    chunk_of_token = torch.repeat_interleave(torch.arange(len(chunk_lengths), device=query.device), chunk_lengths)
    if chunk_of_token.numel() != length:
        raise RuntimeError(f"cu_seqlens cover {chunk_of_token.numel()} tokens, the block has {length}")
    same_chunk = chunk_of_token[:, None] == chunk_of_token[None, :]
    mask = torch.zeros(length, length, dtype=query.dtype, device=query.device)
    mask.masked_fill_(~same_chunk, torch.finfo(query.dtype).min)
    output, probabilities = eager_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)
    # global_attention averages over all T queries; a key is only attended by its own chunk's queries (the others'
    # probabilities are exactly 0), so rescale to the mean over that chunk, which is what the capture records.
    per_key = global_attention(probabilities, skip_cls=False) * (
        length / chunk_lengths.repeat_interleave(chunk_lengths)
    )
    module._bench_block_scores.append(per_key)
    return output, probabilities


AttentionInterface.register(DENSE_REFERENCE_ATTENTION, _dense_masked_eager_attention)


class QwenReference(QwenVariant):
    name = "reference"
    description = (
        "every block: dense masked eager H x T x T map, reduced per block (official Qwen code) + select_hiprune"
    )

    def setup(self):
        self.block_scores: list[torch.Tensor] = []
        self._saved_configs = []
        for block in self.tower.blocks:
            private = copy.copy(block.attn.config)  # only these modules switch; the shared config stays on SDPA
            private._attn_implementation_internal = DENSE_REFERENCE_ATTENTION
            self._saved_configs.append((block.attn, block.attn.config))
            block.attn.config = private
            block.attn._bench_block_scores = self.block_scores

    def teardown(self):
        for module, config in self._saved_configs:
            module.config = config
            del module._bench_block_scores
        self._saved_configs.clear()

    def __call__(self, inputs):
        self.block_scores.clear()
        features = self._forward(inputs)
        scores = list(self.block_scores)
        self.block_scores.clear()
        if len(scores) != self.shape.num_layers:
            raise RuntimeError(f"expected one attention map per block ({self.shape.num_layers}), got {len(scores)}")
        selected = self._select(
            [scores[self.shape.object_layer - 1]], [scores[self.shape.deep_layer - 1]], inputs["grid_thw"]
        )
        return {"features": features, **selected}


# --- timing ----------------------------------------------------------------------------------------------------
def timed_call(variant: Variant, inputs: dict[str, torch.Tensor], device: torch.device) -> tuple[float, dict]:
    """Seconds for one call of the variant (eval.efficiency.measure.time_call: GC paused), and its outputs."""
    variant.setup()
    try:
        with torch.inference_mode():
            return time_call(lambda: variant(inputs), device)
    finally:
        variant.teardown()


class Checker:
    """Compares the outputs of one round; raises IndicesMismatch when ours and reference keep different tokens."""

    def __init__(self) -> None:
        self.calls = 0
        self.features_identical = True
        self.max_score_diff = {"object": 0.0, "deep": 0.0}
        self.kept = None

    def check(self, outs: dict[str, dict]) -> None:
        ours, ref, plain = outs["ours"], outs["reference"], outs["plain"]
        for name in ("object", "deep"):
            diff = float((ours[name].float() - ref[name].float()).abs().max())
            self.max_score_diff[name] = max(self.max_score_diff[name], diff)
        if "finite" in ours and not bool(ours["finite"]):
            raise RuntimeError("ours: non-finite attention scores")
        if not torch.equal(ours["indices"], ref["indices"]):
            raise IndicesMismatch(_mismatch_report(ours, ref))
        self.features_identical &= torch.equal(ours["features"], plain["features"])
        self.kept = ours["indices"]
        self.calls += 1

    def summary(self) -> dict:
        return {
            "indices_identical": True,  # a mismatch raises
            "checked_rounds": self.calls,
            "kept_per_image": None if self.kept is None else int(self.kept.shape[1]),
            "max_abs_score_diff_ours_vs_reference": self.max_score_diff,
            "features_bitwise_identical_plain_vs_ours": bool(self.features_identical),
        }


def _mismatch_report(ours: dict, ref: dict) -> str:
    lines = ["ours and reference kept different token indices; the benchmark would compare different computations."]
    for row in range(ours["indices"].shape[0]):
        a, b = set(ours["indices"][row].tolist()), set(ref["indices"][row].tolist())
        if a != b:
            lines.append(f"  image {row}: only ours {sorted(a - b)[:10]}, only reference {sorted(b - a)[:10]}")
    for name in ("object", "deep"):
        diff = (ours[name].float() - ref[name].float()).abs()
        scale = ref[name].float().abs().max()
        lines.append(f"  {name} scores: max |diff| {float(diff.max()):.3e} (max score {float(scale):.3e})")
    lines.append(
        "  Near-tied scores at the budget boundary flip under low precision; try --dtype float32. --qk-gain: too small "
        "leaves near-ties; too large makes a deep random tower chaotic, so rounding differences between the "
        "reference's eager attention and SDPA grow into different hidden states."
    )
    return "\n".join(lines)


def _quartiles(values: list[float]) -> dict:
    return {**quartiles(values), "values": values}


def run_timing(variants: dict[str, Variant], inputs, device, repeats: int, warmup: int, checker: Checker) -> dict:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(warmup + repeats):
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]  # rotate: every variant runs first in turn
        outs = {}
        for name in order:
            seconds, outs[name] = timed_call(variants[name], inputs, device)
            if round_ >= warmup:
                times[name].append(seconds)
        checker.check(outs)  # outside the timed region; also during warm-up
        del outs
    return times


# --- the selection alone, before vs after issue 18 ----------------------------------------------------------------
def select_hiprune_before_issue18(object_scores, deep_scores, grid, budget, alpha=0.1):
    """HiPrune's selection as the harness ran it before issue 18 (official defaults: clamped cross buffers, deep
    registers), kept here only to time the change in one run: a finiteness read-back, three full sorts, masks built
    with about 40 kernels. The kept indices are the same as ``select_hiprune``'s (checked on every call)."""
    rows, cols = grid
    if not bool(torch.isfinite(object_scores).all() & torch.isfinite(deep_scores).all()):
        raise ValueError("non-finite HiPrune scores")
    batch, n = object_scores.shape
    device = object_scores.device
    object_scores, deep_scores = object_scores.float(), deep_scores.float()
    k_a = anchor_count(budget, alpha)
    anchors = top_k(object_scores, k_a)
    anchor_mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    anchor_mask.scatter_(1, anchors, True)
    offsets = BUFFER_OFFSETS["cross"]
    d_row = torch.tensor([dr for dr, _ in offsets], dtype=torch.long, device=device)
    d_col = torch.tensor([dc for _, dc in offsets], dtype=torch.long, device=device)
    neighbours = (anchors.unsqueeze(-1) + d_row * cols + d_col).clamp(0, n - 1).flatten(1)
    chosen = anchor_mask.clone()
    chosen.scatter_(1, neighbours, True)
    buffer_mask = chosen & ~anchor_mask
    chosen_count = chosen.sum(dim=1)
    if max_anchor_and_buffer_count(budget, alpha, "cross") > budget and bool((chosen_count > budget).any()):
        raise ValueError("HiPrune anchors + buffers exceed the budget")
    n_registers = budget - chosen_count
    ranked = rank_descending(deep_scores.masked_fill(chosen, -math.inf))
    take = torch.arange(n, device=device).unsqueeze(0) < n_registers.unsqueeze(1)
    register_mask = torch.zeros_like(chosen)
    register_mask.scatter_(1, ranked, take)
    keep = chosen | register_mask
    positions = torch.arange(n, device=device).expand(batch, n).masked_fill(~keep, n)
    indices = positions.sort(dim=1).values[:, :budget]
    roles = {"anchor": anchor_mask.gather(1, indices), "buffer": buffer_mask.gather(1, indices),
             "register": register_mask.gather(1, indices)}
    return indices, roles


def select_hiprune_pipeline(object_scores, deep_scores, grid, budget):
    """The selection as HiPrune.select runs it in the pipeline since issue 18: the scores' finiteness as a device
    flag (read back later with the kept indices), and a selection that reads nothing back."""
    finite = all_finite(object_scores, deep_scores)
    indices = select_hiprune(object_scores, deep_scores, grid, budget, check_finite=False)
    return indices, finite


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators a call dispatches (on a GPU each non-view one is at least one kernel launch) and
    its device-to-host read-backs (.item(), bool(), int(), nonzero)."""

    # bool() / .item() dispatch as _local_scalar_dense, or as is_nonzero under inference_mode
    READ_BACKS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero")
    VIEWS = ("aten.view", "aten.slice", "aten.unsqueeze", "aten.expand", "aten.select", "aten.lift_fresh",
             "aten.detach", "aten.alias", "aten.t.", "aten.transpose", "aten.squeeze")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        kernels = [op for op in self.ops if not op.startswith(self.VIEWS)]
        read_backs = [op for op in self.ops if op.startswith(self.READ_BACKS)]
        return {"aten_ops": len(self.ops), "non_view_ops": len(kernels), "read_backs": len(read_backs),
                "sorts": sum(op.startswith("aten.sort") for op in self.ops)}


def count_ops(fn) -> dict:
    with torch.inference_mode(), OpCounter() as counter:
        fn()
    return counter.summary()


def selection_before_after(object_scores, deep_scores, grid, budget, device, repeats: int) -> dict:
    """Time the selection alone on one round's captured scores, before (:func:`select_hiprune_before_issue18`) and
    after (:func:`select_hiprune_pipeline`), interleaved call by call; the kept indices must be identical."""
    calls = {
        "before": lambda: select_hiprune_before_issue18(object_scores, deep_scores, grid, budget)[0],
        "after": lambda: select_hiprune_pipeline(object_scores, deep_scores, grid, budget)[0],
    }
    with torch.inference_mode():
        if not torch.equal(calls["before"](), calls["after"]()):
            raise IndicesMismatch("the selection before and after issue 18 kept different tokens")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 3):  # 3 warm-up calls each
        for name in (("before", "after") if round_ % 2 else ("after", "before")):
            with torch.inference_mode():
                seconds, _ = time_call(calls[name], device)
            if round_ >= 3:
                times[name].append(seconds)
    ratio = [a / b for a, b in zip(times["after"], times["before"])]
    return {
        "description": "select_hiprune alone on the captured scores of one call, before vs after issue 18, "
                       "interleaved; ops counted with a TorchDispatchMode (read-backs: _local_scalar_dense, nonzero)",
        "before": {"time_s": quartiles(times["before"]), **count_ops(calls["before"])},
        "after": {"time_s": quartiles(times["after"]), **count_ops(calls["after"])},
        "after/before": quartiles(ratio),
        "indices_identical": True,  # checked above; a mismatch raises
    }


# --- memory ----------------------------------------------------------------------------------------------------
def probe_cpu_memory(variant: Variant, inputs: dict[str, torch.Tensor]) -> dict:
    """In this (fresh) process: peak RSS the variant's call adds, after one warm-up call. Linux only."""
    device = torch.device("cpu")
    _, out = timed_call(variant, inputs, device)  # warm-up: lazy inits, thread pools, kernel caches
    del out
    gc.collect()
    malloc_trim()
    before_kb = proc_status_kb("VmRSS")
    if not reset_peak_rss():  # VmHWM (peak RSS) back to the current RSS
        raise RuntimeError("cannot reset the peak RSS counter (/proc/self/clear_refs): Linux only")
    _, out = timed_call(variant, inputs, device)
    peak_kb = proc_status_kb("VmHWM")
    del out
    return {
        "baseline_rss_bytes": before_kb * 1024,
        "peak_rss_bytes": peak_kb * 1024,
        "peak_extra_bytes": (peak_kb - before_kb) * 1024,
    }


def measure_cpu_memory(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    # A fixed threshold (which also disables glibc's dynamic one) keeps every large tensor in its own mmap, handed
    # back to the OS on free, so RSS follows live memory instead of glibc's free lists.
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for name in VARIANTS:
        cmd = [
            sys.executable,
            "-m",
            "eval.efficiency.scoring",
            "--_memory-probe",
            name,
            "--device",
            "cpu",
            "--dtype",
            args.dtype,
            "--shape",
            args.shape,
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
            "--qk-gain",
            str(args.qk_gain),
        ]
        if args.budget is not None:
            cmd += ["--budget", str(args.budget)]
        if args.image_size is not None:
            cmd += ["--image-size", str(args.image_size)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PROBE_MARKER)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory probe for {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len(_PROBE_MARKER) :])
    return {
        "method": "CPU: peak RSS growth (VmHWM after reset minus VmRSS before) over one call, fresh subprocess per "
        "variant, after one warm-up call and malloc_trim, MALLOC_MMAP_THRESHOLD_=131072",
        "variants": results,
    }


def measure_cuda_memory(variants: dict[str, Variant], inputs: dict[str, torch.Tensor], device: torch.device) -> dict:
    results = {}
    for name in VARIANTS:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _, out = timed_call(variants[name], inputs, device)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        results[name] = {
            "baseline_allocated_bytes": before,
            "peak_allocated_bytes": peak,
            "peak_extra_bytes": peak - before,
        }
    return {
        "method": "CUDA: torch.cuda.max_memory_allocated over one call after reset_peak_memory_stats; "
        "peak_extra = peak minus memory_allocated before the call (weights + input)",
        "variants": results,
    }


# --- driver ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.efficiency.scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 7 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="clip-l-336")
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="tokens kept per image (default: the shape's, 192 for CLIP-L, round(n * 0.334) for Qwen2.5-VL)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="Qwen2.5-VL shapes only: pixels per side of the square image, a multiple of 28 (default: the shape's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--qk-gain",
        type=float,
        default=None,
        help="scale of the random query/key projections (peaked attention, see the module docstring; default: the "
        "shape's, 12 for CLIP, 2.4 for Qwen2.5-VL-3B)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--selection-repeats", type=int, default=200,
                   help="CLIP shapes: timed calls of the selection alone, before vs after issue 18 (0: skip)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (temp file + rename)")
    p.add_argument("--_memory-probe", dest="memory_probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    on_cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if on_cpu else "float16")
    args.qk_gain = args.qk_gain if args.qk_gain is not None else SHAPES[args.shape].default_qk_gain
    args.repeats = args.repeats if args.repeats is not None else (7 if on_cpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 5)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    return args


def resolve_shape(args: argparse.Namespace) -> ClipShape | QwenShape:
    shape = SHAPES[args.shape]
    if args.image_size is not None:
        shape = shape.with_image_size(args.image_size)
    if args.budget is not None:
        shape = shape.with_budget(args.budget)
    shape.validate()
    return shape


def _environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other processes competing for the cores show up as noise (wide IQR); the load average flags it.
        "load_average_at_start": load_average(),
        "device_name": device_name(device),
    }
    return env


def _write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def print_report(results: dict, out=None) -> None:
    cfg = results["config"]
    out = out if out is not None else sys.stdout

    def w(line: str = "") -> None:
        print(line, file=out)

    w(
        f"scoring overhead: {cfg['shape']} ({cfg['num_layers']} layers, {cfg['tokens']} tokens per image), "
        f"batch {cfg['batch_size']}, {cfg['dtype']} on {cfg['device']} ({results['environment']['device_name']}, "
        f"{results['environment']['torch_threads']} threads), {cfg['repeats']} rounds after {cfg['warmup']} warm-up"
    )
    w(
        f"object layer {cfg['object_layer']}, deep layer {cfg['deep_layer']}, budget {cfg['budget']} of "
        f"{cfg['scored_tokens']} tokens ({cfg['grid'][0]} x {cfg['grid'][1]} grid)"
    )
    env = results["environment"]
    if env.get("load_average_at_start") and env.get("load_average_at_end"):
        w(
            f"load average (1 min) at start {env['load_average_at_start'][0]:.2f}, at end "
            f"{env['load_average_at_end'][0]:.2f} on {env['cpu_count']} CPUs (others competing for cores = noise)"
        )
    w()
    w(f"{'variant':<10} {'median':>10} {'q1':>10} {'q3':>10}   description")
    for name in VARIANTS:
        v = results["variants"][name]
        t = v["time_s"]
        w(f"{name:<10} {t['median'] * 1e3:8.1f}ms {t['q1'] * 1e3:8.1f}ms {t['q3'] * 1e3:8.1f}ms   {v['description']}")
    w()
    for key, r in results["ratios"].items():
        w(f"{key:<16} median {r['median']:.4f}   IQR [{r['q1']:.4f}, {r['q3']:.4f}]")
    goal = results["goal"]
    w(f"goal: {goal['metric']} <= {goal['threshold']}: {'MET' if goal['met'] else 'NOT MET'}")
    mem = results.get("memory")
    if mem:
        w()
        w(f"peak memory ({mem['method']}):")
        for name in VARIANTS:
            m = mem["variants"][name]
            peak = m.get("peak_allocated_bytes", m.get("peak_rss_bytes"))
            w(f"  {name:<10} extra {_mib(m['peak_extra_bytes'])}   peak {_mib(peak)}")
    sel = results.get("selection")
    if sel:
        w()
        w("selection alone (before -> after issue 18): median "
          f"{sel['before']['time_s']['median'] * 1e6:.0f} -> {sel['after']['time_s']['median'] * 1e6:.0f} us, "
          f"after/before {sel['after/before']['median']:.3f}; ATen ops {sel['before']['non_view_ops']} -> "
          f"{sel['after']['non_view_ops']} (non-view), sorts {sel['before']['sorts']} -> {sel['after']['sorts']}, "
          f"device read-backs {sel['before']['read_backs']} -> {sel['after']['read_backs']}; indices identical")
    c = results["correctness"]
    w()
    w(
        f"correctness: kept indices of ours and reference identical in all {c['checked_rounds']} rounds; "
        f"max |score diff| object {c['max_abs_score_diff_ours_vs_reference']['object']:.2e}, "
        f"deep {c['max_abs_score_diff_ours_vs_reference']['deep']:.2e}; features of ours bitwise equal to plain: "
        f"{c['features_bitwise_identical_plain_vs_ours']}"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = resolve_shape(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tower = shape.build_tower(dtype, device, args.seed, args.qk_gain)
    inputs = shape.make_inputs(args.batch_size, dtype, device, args.seed)
    variants = shape.make_variants(tower)

    if args.memory_probe is not None:  # child process of measure_cpu_memory
        result = probe_cpu_memory(variants[args.memory_probe], inputs)
        print(_PROBE_MARKER + json.dumps(result), flush=True)
        return result

    environment = _environment(device)
    checker = Checker()
    times = run_timing(variants, inputs, device, args.repeats, args.warmup, checker)
    selection = None
    if shape.family == "clip" and args.selection_repeats:
        with torch.inference_mode():
            scored = variants["ours"](inputs)
        selection = selection_before_after(scored["object"], scored["deep"], shape.grid, shape.budget, device,
                                           args.selection_repeats)
        del scored
    ratios = {
        f"{name}/plain": _quartiles([t / p for t, p in zip(times[name], times["plain"])])
        for name in ("ours", "reference")
    }
    results: dict[str, Any] = {
        "benchmark": "scoring_overhead",
        "config": {
            "shape": args.shape,
            **shape.describe(),
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": args.device,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "qk_gain": args.qk_gain,
            "timer": timer_name(device),
            "interleaving": "one call per variant per round, order rotated every round; ratios are per round",
        },
        "environment": environment,
        "variants": {
            name: {"description": variants[name].description, "time_s": _quartiles(times[name])} for name in VARIANTS
        },
        "ratios": ratios,
        "goal": {
            "metric": "ours/plain median",
            "threshold": GOAL_RATIO,
            "met": ratios["ours/plain"]["median"] <= GOAL_RATIO,
        },
        "correctness": checker.summary(),
        "selection": selection,
        "memory": None,
    }
    if not args.no_memory:
        if device.type == "cuda":
            results["memory"] = measure_cuda_memory(variants, inputs, device)
        else:
            del tower, variants, inputs
            gc.collect()
            results["memory"] = measure_cpu_memory(args)
    results["environment"]["load_average_at_end"] = load_average()
    print_report(results)
    if args.json is not None:
        _write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
