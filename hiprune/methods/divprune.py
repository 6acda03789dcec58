"""DivPrune (arXiv 2503.02175, CVPR'25; vbdi/divprune): a max-min diverse subset of the visual tokens.

Per grid of N tokens with features E (the tokens the LLM would receive: LLaVA's projector outputs, Qwen2.5-VL's
merged tokens) and a budget k:
  1. d(i, j) = 1 - cos(E_i, E_j);
  2. first pick: the token whose nearest neighbour is farthest, argmax_i min_{j != i} d(i, j) (the official code takes
     the second-smallest entry of column i, the smallest being the self-distance);
  3. every next pick: argmax_i min_{s in picked} d(s, i);
  4. emit the picks in raster order, with their features.

argmax takes the first maximal index, as ``torch.argmax`` does in the official code. One deviation, where the
official code is not well defined: it lets an already-picked token score its self-distance (about 0) and can pick
it again when every other token also scores 0 (exact duplicates), returning fewer distinct tokens than k. Here picked
tokens are excluded, which equals the official choice whenever the official picks are distinct. Distances are
computed in float32 (the official code uses the model's dtype). Text-agnostic; no encoder capture is needed.

LLaVA-NeXT: every crop on its own with N'/crops (the comparison tables' protocol, the adapter's default layout). The
official DivPrune code selects globally over the whole stock image sequence (base + unpadded sub-grid + newlines);
that needs a selection across the grids of one image, which the pipeline does not offer yet. Video-LLaVA: per frame.
Qwen2.5-VL: k = round(rho * n) of the merged tokens (the pipeline's ratio budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from hiprune.methods.base import Method, Selection, Stage, VisionTokens, gather_tokens, register_method
from hiprune.scores import check_finite


def check_features(features: torch.Tensor, what: str) -> None:
    """[B, N, D] finite floating-point features with no zero row (a zero vector has no cosine)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{what} must be a [B, N, D] tensor, got {shape}")
    if features.is_complex() or not features.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {features.dtype}")
    if features.shape[1] < 1 or features.shape[2] < 1:
        raise ValueError(f"{what} has no tokens or no dimensions: shape {tuple(features.shape)}")
    check_finite(features, what)
    if bool((features.float().norm(dim=-1) == 0).any()):
        raise ValueError(f"{what} contains an all-zero token, whose cosine similarity is undefined")


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] 1 - cosine similarity, float32."""
    unit = features.float() / features.float().norm(dim=-1, keepdim=True)
    return 1.0 - unit @ unit.T


def select_divprune(features: torch.Tensor, budget: int) -> torch.Tensor:
    """[B, N, D] features -> [B, budget] kept indices (int64, sorted ascending, distinct), every row on its own.

    Raises ValueError on a malformed shape, a budget outside [1, N], non-finite features or an all-zero token.
    """
    check_features(features, "DivPrune features")
    n = features.shape[1]
    if isinstance(budget, bool) or not isinstance(budget, Integral) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an int in [1, {n}] (tokens of this grid), got {budget!r}")
    # One row at a time: the same arithmetic whatever the batch, so a row's picks never depend on its neighbours.
    return torch.stack([_divprune_row(row, int(budget)) for row in features]).sort(dim=1).values


def _divprune_row(features: torch.Tensor, budget: int) -> torch.Tensor:
    n = features.shape[0]
    distances = cosine_distances(features)  # [N, N]
    picks = torch.empty(budget, dtype=torch.long, device=features.device)
    if n == 1:
        picks[0] = 0
        return picks
    # The nearest-neighbour distance of token i: the second-smallest entry of column i (the smallest: itself).
    scores = distances.kthvalue(2, dim=0).values
    nearest_picked = torch.full((n,), math.inf, device=features.device)
    for step in range(budget):
        pick = torch.argmax(scores)  # first maximal index
        picks[step] = pick
        nearest_picked = torch.minimum(nearest_picked, distances[pick])
        scores = nearest_picked.clone()
        scores[picks[: step + 1]] = -math.inf  # a picked token is never picked again
    return picks


@register_method
@dataclass
class DivPrune(Method):
    """DivPrune with the official rule on the tokens the LLM would receive; no options."""

    name: ClassVar[str] = "divprune"
    stage: ClassVar[Stage] = "vision"

    def selection_flops(self, num_tokens: int, budget: int, widths: dict[str, int]) -> int:
        return 2 * num_tokens * num_tokens * widths["features"]  # the N x N cosine similarities

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        indices = select_divprune(tokens.features, budget).to(tokens.features.device)
        return Selection(indices, gather_tokens(tokens.features, indices))
