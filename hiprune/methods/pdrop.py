"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025): drop visual tokens in stages inside the LLM.

The decoder is split at the stage boundaries ``layers`` = l_1 < l_2 < ...: before 0-based layer l_s runs, every image
keeps the n_s = floor(N * rho_s) of its current visual tokens that the last prompt token attends to most, N being the
image's ORIGINAL visual token count. The score at a boundary is layer l_s's own attention (its input norm, query / key
projections and RoPE applied to the current hidden states, causal softmax, mean over heads, the last token's row),
not the attention layer l_s - 1 computed. Kept tokens stay in sequence order and the positions are renumbered
0..len-1 after every stage (decode steps shifted accordingly).

This file is the schedule and the selection only (scores -> kept indices); ``hiprune.adapters.llm_pruning`` runs
it (``DropStage(..., score="own")``, ``drop_positions() == "compact"``).

Checked against the spec of the official code (github.com/Cooperx521/PyramidDrop, ``modeling_llama_pdrop``):
- rho_s: ``ratios`` given explicitly (the repo's scripts: layers [8, 16, 24], ratios [0.5, 0.25, 0.125], which
  average 270 visual tokens per layer on LLaVA-1.5), or -- the default -- rho_s = lambda^s solved from the budget.
- Budget (spec §0): the comparison tables' N' is the average number of visual tokens over all L decoder layers, the
  layers before l_1 at the full N. The authors never published budget-matched settings; their maintainers advise
  keeping the lambda^s structure with an earlier first stage and solving the average. Layers [2, 8, 16] (default) and
  lambda = the largest value whose average does not exceed N' (found by bisection on the exact floored counts) are
  the HARNESS'S derived choice, not official: LLaVA-1.5-7B (N = 576, L = 32): 192 -> lambda ~ 0.5606, counts
  322 / 180 / 101 (average 191.9); 128 -> ~0.4211, 242 / 102 / 42 (127.9); 64 -> ~0.1927, 110 / 21 / 4 (63.9).
- Positions: ``positions="compact"`` (default, as the official code) or ``"original"`` (kept tokens keep their
  position in the unpruned sequence, as FastV).
Choices made here: every batch row and every image is ranked on its own (the official code runs batch size 1);
probabilities in float32; ties to the lower index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from numbers import Integral, Real
from typing import ClassVar

import torch

from hiprune.methods.base import (
    DROP_POSITIONS,
    DropPositions,
    DropStage,
    Method,
    Stage,
    register_method,
    resolve_budget,
    top_k_sorted,
)

DEFAULT_LAYERS: tuple[int, ...] = (2, 8, 16)  # the harness's budget-matched boundaries (spec §9; derived, not official)
_BISECTION_STEPS = 200


def stage_counts(visual_tokens: int, ratios: Sequence[float]) -> list[int]:
    """n_s = floor(N * rho_s) for every stage (the official ``int(N * ratio)``)."""
    return [math.floor(visual_tokens * float(r)) for r in ratios]


def average_visual_tokens(visual_tokens: int, layers: Sequence[int], counts: Sequence[int], decoder_layers: int):
    """Mean over the ``decoder_layers`` layers of the visual tokens each runs on (N before ``layers[0]``)."""
    total, current, previous = 0, int(visual_tokens), 0
    for layer, count in zip(layers, counts, strict=True):
        total += (layer - previous) * current
        current, previous = int(count), layer
    total += (decoder_layers - previous) * current
    return total / decoder_layers


def solve_lambda(budget: int, visual_tokens: int, layers: Sequence[int], decoder_layers: int) -> float:
    """The largest lambda in (0, 1] whose floored counts floor(N * lambda^s), s = 1.., average at most ``budget``
    visual tokens over the decoder's layers (exact counts; bisection). Raises ValueError if even lambda -> 0 (one
    stage count of 0) cannot reach the budget or if the budget is at least N (nothing to drop)."""
    n, stages = int(visual_tokens), len(layers)

    def average(lam: float) -> float:
        return average_visual_tokens(n, layers, stage_counts(n, [lam**s for s in range(1, stages + 1)]), decoder_layers)

    if budget >= n:
        raise ValueError(f"PyramidDrop: a budget of {budget} of the image's {n} visual tokens drops nothing")
    floor_average = average_visual_tokens(n, layers, [0] * stages, decoder_layers)
    if floor_average > budget:
        raise ValueError(
            f"PyramidDrop: with stage boundaries {list(layers)} the {layers[0]} layers before the first drop alone "
            f"average {floor_average:.2f} > {budget} visual tokens over {decoder_layers} layers: infeasible; use "
            "an earlier first boundary or a larger budget"
        )
    low, high = 0.0, 1.0  # average(low) <= budget < average(high)
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if average(middle) <= budget:
            low = middle
        else:
            high = middle
    return low


def select_pdrop(last_query_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """Kept visual-token indices [B, keep] (int64, sorted ascending): the ``keep`` highest scores of each row of the
    last prompt token's attention [B, N] (ties to the lower index)."""
    return top_k_sorted(last_query_attention, keep, "PyramidDrop last-query attention", "keep")


@register_method
@dataclass
class PyramidDrop(Method):
    """PyramidDrop: multi-stage drops at ``layers``, ranked by each boundary layer's own last-query attention.

    budget: N', the average number of visual tokens per decoder layer (int, or float ratio of the image's tokens);
        rho_s = lambda^s is solved from it (see :func:`solve_lambda`). Leave it unset when ``ratios`` is given.
    layers: stage boundaries l_1 < l_2 < ... (0-based index of the first decoder layer of each stage).
    ratios: fraction of the image's ORIGINAL visual tokens kept from each boundary on (one per layer), strictly
        decreasing in (0, 1]; None (default): solved from the budget.
    positions: "compact" (official: renumbered after every stage) or "original".
    """

    name: ClassVar[str] = "pdrop"
    stage: ClassVar[Stage] = "llm"

    layers: Sequence[int] = DEFAULT_LAYERS
    ratios: Sequence[float] | None = None
    positions: DropPositions = "compact"

    def __post_init__(self) -> None:
        # Hydra hands ListConfig's; keep plain tuples (hashable, and recorded as lists by describe)
        for name in ("layers", "ratios"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)) and isinstance(value, Sequence):
                setattr(self, name, tuple(value))

    def validate(self) -> None:
        if self.ratios is not None and self.budget is not None:
            raise ValueError(
                f"PyramidDrop takes either ratios (fraction kept from each stage on) or a budget (the average per "
                f"decoder layer, from which lambda^s ratios are solved), not both; got budget={self.budget!r}, "
                f"ratios={list(self.ratios)!r}"
            )
        if self.ratios is None:
            super().validate()
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"PyramidDrop layers must be a non-empty list of ints, got {layers!r}")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, Integral) or layer < 1:
                raise ValueError(f"PyramidDrop layers must be ints >= 1, got {list(layers)!r}")
        if any(b <= a for a, b in pairwise(layers)):
            raise ValueError(f"PyramidDrop layers must be strictly increasing, got {list(layers)!r}")
        if self.ratios is not None:
            ratios = self.ratios
            if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or len(ratios) != len(layers):
                raise ValueError(
                    f"PyramidDrop ratios must be a list with one ratio per layer ({len(layers)}), got {ratios!r}"
                )
            for ratio in ratios:
                if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 < float(ratio) <= 1.0:
                    raise ValueError(f"PyramidDrop ratios must lie in (0, 1], got {list(ratios)!r}")
            if any(b >= a for a, b in pairwise(ratios)):
                raise ValueError(f"PyramidDrop ratios must be strictly decreasing, got {list(ratios)!r}")
        if self.positions not in DROP_POSITIONS:
            raise ValueError(f"PyramidDrop positions must be one of {DROP_POSITIONS}, got {self.positions!r}")

    def stage_ratios(self, visual_tokens: int, decoder_layers: int) -> list[float]:
        """rho_s of every stage: ``ratios``, or lambda^s solved from the budget for this image and decoder."""
        if self.ratios is not None:
            return [float(r) for r in self.ratios]
        budget = resolve_budget(self.budget, visual_tokens)
        lam = solve_lambda(budget, visual_tokens, list(self.layers), decoder_layers)
        return [lam**s for s in range(1, len(self.layers) + 1)]

    def drop_schedule(self, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
        """One stage per boundary: n_s = floor(N * rho_s) tokens per image, ranked by the boundary layer's own
        attention."""
        last = self.layers[-1]
        if last >= decoder_layers:
            raise ValueError(
                f"PyramidDrop boundary {last} does not exist in an LLM of {decoder_layers} layers (0-based 1.."
                f"{decoder_layers - 1}); set method.options.layers"
            )
        counts = stage_counts(visual_tokens, self.stage_ratios(visual_tokens, decoder_layers))
        if counts[0] < 1 or any(b >= a for a, b in pairwise(counts)) or counts[-1] < 1:
            raise ValueError(
                f"PyramidDrop keeps {counts} visual tokens at layers {list(self.layers)} of an image with "
                f"{visual_tokens}: every stage must keep at least 1 and fewer than the stage before"
            )
        return [DropStage(layer=int(l), keep=c, score="own") for l, c in zip(self.layers, counts, strict=True)]

    def drop_positions(self) -> DropPositions:
        return self.positions

    def select_from_attention(self, last_query_attention: torch.Tensor, keep: int) -> torch.Tensor:
        """Per-image selection, see :func:`select_pdrop`."""
        return select_pdrop(last_query_attention, keep)

    def describe(self) -> dict:
        settings = super().describe()
        settings["layers"] = list(self.layers)
        settings["ratios"] = None if self.ratios is None else [float(r) for r in self.ratios]
        return settings
