"""HiRED (arXiv 2408.10945, AAAI'25; hasanar1f/HiRED): a fixed budget split across LLaVA-NeXT crops by the base
image's early-layer [CLS] attention, then the top tokens of every crop by late-layer [CLS] attention.

For an image of n_c grids (the base image, then n_c - 1 sub-crops of a gr x gc tiling), N patches per grid, its
budget B (the official B = floor(n_c * N * beta) with beta = N' / (n_c * N), i.e. B = N') and alpha:
  1. B0 = min(floor(alpha * B), N) tokens for the base image, Bs = min(B - B0, (n_c - 1) * N) for the sub-crops;
  2. S = the floor(N * (1 - alpha)) base patches with the largest early CLS attention (encoder layer 1, the official
     layer 0); count them per cell: ``partition="strip"`` (official) reshapes the base's raster order row-major to
     (gr, gc, N / (gr * gc)), i.e. cell i = consecutive raster chunk i (a 2 x 2 tiling: four 6-row strips, not
     quadrants); ``"spatial"`` (the paper's reading) uses the base grid's gr x gc rectangles;
  3. sub-crop i gets floor(Bs * n_i / sum n), capped at N;
  4. every grid keeps its budget's top tokens by the feature layer's CLS attention (the official layer 22), in raster
     order (:func:`hiprune.methods.fastervlm.select_fastervlm`; ties to the lower index).

Deviation (forced): the official flooring in step 3 loses up to n_c - 2 tokens depending on the image's content,
but the processor emits an image's placeholder tokens before the encoder runs, so the harness needs a count known in
advance. The method therefore hands the floored remainder out by largest remainder (ties to the lower cell, capped at
N): every image passes exactly B tokens on. The official floored split is :func:`hired_crop_budgets` with
``fill_remainder=False`` (tested against the specification's example). The official packer also applies LLaVA's
unpadding to the kept masks; the harness runs the comparison tables' protocol (the 'spatial' layout, no unpadding);
the adapter refuses the native layout for this method.

On a single grid (LLaVA-1.5, a Video-LLaVA image) the split does not apply and the rule is FasterVLM's (the
official single-image path: top floor(N * beta) = N' by late CLS attention); Video-LLaVA frames are not tiles of a
base image: each frame keeps its share of the family's split by the same rule. Qwen2.5-VL has no CLS token: refused
before anything loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from hiprune.methods.base import (
    FEATURE_LAYER,
    Method,
    Request,
    Selection,
    Stage,
    VisionTokens,
    gather_tokens,
    register_method,
    top_k,
)
from hiprune.methods.fastervlm import check_scores, select_fastervlm

PARTITIONS = ("strip", "spatial")


def hired_crop_budgets(
    early_base: torch.Tensor,
    grid: tuple[int, int],
    tiling: tuple[int, int],
    budget: int,
    alpha: float = 0.5,
    partition: str = "strip",
    fill_remainder: bool = True,
) -> list[int]:
    """[B0, b_1, ..., b_{gr*gc}]: the budget of the base image and of every sub-crop (raster order over the tiling).

    early_base: [N] early-layer CLS attention of the base image's patches; grid: (rows, cols) of every crop's patch
    grid; tiling: (gr, gc) sub-crops; budget: the image's B. ``fill_remainder=False`` is the official floored split
    (may sum to less than B); True hands the remainder out by largest remainder so that the budgets sum to B.
    Raises ValueError on malformed input, and when the rule cannot give B tokens (alpha too small for the tiling).
    """
    _check_alpha(alpha)
    if partition not in PARTITIONS:
        raise ValueError(f"unknown HiRED partition {partition!r}; expected one of {PARTITIONS}")
    rows, cols = grid
    n = rows * cols
    if early_base.dim() != 1 or early_base.shape[0] != n:
        raise ValueError(f"early CLS attention of the base image must be [N={n}], got {tuple(early_base.shape)}")
    gr, gc = tiling
    cells = gr * gc
    if cells < 1:
        raise ValueError(f"the tiling {tiling} has no sub-crop")
    capacity = (1 + cells) * n
    if isinstance(budget, bool) or not isinstance(budget, Integral) or not 1 <= budget <= capacity:
        raise ValueError(f"budget must be an int in [1, {capacity}] (tokens of the image's {1 + cells} grids), "
                         f"got {budget!r}")
    check_scores(early_base[None], 1, "HiRED early CLS attention")
    base = min(math.floor(alpha * budget), n)
    sub = min(budget - base, cells * n)

    chosen = top_k(early_base[None].float(), math.floor(n * (1 - alpha)))[0]  # S, ties to the lower index
    if partition == "strip":
        if n % cells:
            raise ValueError(f"the strip partition needs N = {n} divisible by the {cells} sub-crops")
        cell = chosen // (n // cells)
    else:
        cell = (chosen // cols) * gr // rows * gc + (chosen % cols) * gc // cols
    counts = torch.bincount(cell, minlength=cells).tolist()
    total = sum(counts)
    if total == 0 and sub > 0:
        raise ValueError(f"HiRED alpha={alpha} leaves no base patch to split the budget by (N = {n})")
    shares = [min(sub * c // total, n) if sub else 0 for c in counts]
    if fill_remainder:
        # largest remainder of sub * n_i / total first (exact integers), ties to the lower cell; capped at N
        order = sorted(range(cells), key=lambda i: (-(sub * counts[i] % total), i))
        left = sub - sum(shares)
        while left > 0:
            for i in order:
                if left and shares[i] < n:
                    shares[i] += 1
                    left -= 1
        if base + sum(shares) != budget:
            raise ValueError(
                f"HiRED with alpha={alpha} gives the base {base} and the {cells} sub-crops at most {sub} of the "
                f"image's {budget} tokens; use a larger alpha"
            )
    return [base, *shares]


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (Integral, float)) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"HiRED alpha must be a number in [0, 1), got {alpha!r}")


@register_method
@dataclass
class HiRED(Method):
    """HiRED with the official rule (alpha 0.5, early layer 1 = the official layer 0, strip partition), the
    remainder of the floored split handed out so that every image passes exactly its budget on."""

    name: ClassVar[str] = "hired"
    stage: ClassVar[Stage] = "vision"

    alpha: float = 0.5
    early_layer: int = 1  # 1-based encoder layer of the split's CLS attention (official: layer 0, 0-based)
    partition: str = "strip"  # official: raster strips; spatial: the base grid's rectangles (the paper's reading)

    def validate(self) -> None:
        super().validate()
        _check_alpha(self.alpha)
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown HiRED partition {self.partition!r}; expected one of {PARTITIONS}")
        if isinstance(self.early_layer, bool) or not isinstance(self.early_layer, Integral) or self.early_layer < 1:
            raise ValueError(f"HiRED early_layer is a 1-based encoder layer (int >= 1), got {self.early_layer!r}")

    def requests(self) -> dict[str, Request]:
        return {
            "early": Request("attention", self.early_layer, queries="cls"),
            "late": Request("attention", FEATURE_LAYER, queries="cls"),
        }

    def split_visual(
        self, grids: list[VisionTokens], budget: int, tiles: list[tuple[int, int] | None]
    ) -> list[int] | None:
        if tiles[0] is not None or any(tile is None for tile in tiles[1:]):
            return None  # not a base image with tiled crops (video frames): the family's split
        gr, gc = 1 + max(i for i, _ in tiles[1:]), 1 + max(j for _, j in tiles[1:])
        if tiles[1:] != [(i, j) for i in range(gr) for j in range(gc)]:
            raise ValueError(f"HiRED needs the sub-crops of a full tiling in raster order, got tiles {tiles[1:]}")
        if any(g.grid != grids[0].grid for g in grids):
            raise ValueError("HiRED needs every crop on the same patch grid")
        return hired_crop_budgets(grids[0].scores["early"][0], grids[0].grid, (gr, gc), budget, self.alpha,
                                  self.partition, fill_remainder=True)

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        if "late" not in tokens.scores:
            raise ValueError(
                f"HiRED needs the CLS attention 'late' in VisionTokens.scores, got {sorted(tokens.scores)}"
            )
        indices = select_fastervlm(tokens.scores["late"], budget).to(tokens.features.device)
        return Selection(indices, gather_tokens(tokens.features, indices))
