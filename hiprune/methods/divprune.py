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

LLaVA-NeXT: every crop on its own with N'/crops (``scope="grid"``, the default: the comparison tables' protocol, the
adapter's default layout). ``scope="image"``: one selection across all grids of an image (the official DivPrune code
selects globally over the whole stock image sequence; on the protocol's 5 crops x 576 this is the faithful transfer,
k = N' over 2880 tokens): the image's grids are pooled (base first, then the sub-crops), DivPrune picks the image's
budget from the pool, and each grid passes on its own picks (``split_visual``: a grid may pass on few or none).
Unlike the official code, the pool holds no ``image_newline`` tokens (the 'spatial' layout has none). On visuals
whose grids all cover the whole visual (video frames) and on one-grid images the scope changes nothing.
Video-LLaVA: per frame. Qwen2.5-VL: k = round(rho * n) of the merged tokens (the pipeline's ratio budget).
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


SCOPES = ("grid", "image")


@register_method
@dataclass
class DivPrune(Method):
    """DivPrune with the official rule on the tokens the LLM would receive; ``scope`` "grid" (every grid on its own,
    the tables' protocol) or "image" (one selection across an image's grids, LLaVA-NeXT crops)."""

    name: ClassVar[str] = "divprune"
    stage: ClassVar[Stage] = "vision"

    scope: str = "grid"

    def validate(self) -> None:
        super().validate()
        if self.scope not in SCOPES:
            raise ValueError(f"unknown DivPrune scope {self.scope!r}; expected one of {SCOPES}")

    @property
    def _picks(self) -> dict[int, torch.Tensor]:
        """scope="image": each grid's picks from the last split_visual, by sample id, until select hands them out
        (not an option: kept out of the dataclass fields)."""
        return self.__dict__.setdefault("_pending_picks", {})

    def decides_split(self) -> bool:
        return self.scope == "image"

    def selection_flops(self, num_tokens: int, budget: int, widths: dict[str, int]) -> int:
        return 2 * num_tokens * num_tokens * widths["features"]  # the N x N cosine similarities

    def split_visual(self, grids: list[VisionTokens], budget: int, tiles: list[tuple[int, int] | None]) -> list[int] | None:
        if self.scope != "image" or all(tile is None for tile in tiles):
            return None  # per grid; frames of a video each cover the whole visual
        ids = [grid.sample_ids[0] if grid.sample_ids else None for grid in grids]
        if None in ids or len(set(ids)) != len(ids):
            raise ValueError(f"DivPrune scope=image needs one distinct sample id per grid, got {ids}")
        pooled = torch.cat([grid.features[0] for grid in grids])[None]
        picks = select_divprune(pooled, budget)[0]
        split, start = [], 0
        for grid, sample_id in zip(grids, ids):
            end = start + grid.num_tokens
            mine = picks[(picks >= start) & (picks < end)] - start
            if mine.numel():  # a grid without picks gets no select call
                self._picks[sample_id] = mine
            split.append(int(mine.numel()))
            start = end
        return split

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        ids = tokens.sample_ids or []
        picked = [i in self._picks for i in ids]
        if any(picked) and not all(picked):
            raise ValueError("DivPrune scope=image: a select call mixes grids picked across their image with others")
        if ids and all(picked):
            indices = torch.stack([self._picks[i] for i in ids])  # identical images share ids and picks
            for i in set(ids):
                del self._picks[i]
            if indices.shape[1] != budget:
                raise ValueError(f"DivPrune scope=image picked {indices.shape[1]} tokens of a grid given {budget}")
        else:
            indices = select_divprune(tokens.features, budget)
        indices = indices.to(tokens.features.device)
        return Selection(indices, gather_tokens(tokens.features, indices))
