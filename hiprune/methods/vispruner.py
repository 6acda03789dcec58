"""VisPruner (arXiv 2412.01818 v2, ICCV'25; Theia-4869/VisPruner): important tokens by [CLS] attention plus diverse
tokens that survive rounds of near-duplicate removal.

Per grid of N patches, a budget T and ``important_ratio`` r:
  1. c = the CLS attention of the feature layer (mean over heads); x = the feature layer's patch hidden states
     (pre-projector), L2-normalised;
  2. T_imp = floor(T * r), T_div = T - T_imp; rank the patches by c (descending): the first T_imp are important,
     the rest R (in that order) are candidates;
  3. while T_div > 0: m = min(8, |R| - T_div), stop when m <= 0; split R alternately into A = R[0::2] and
     B = R[1::2]; s(a) = max_b x_a . x_b; order A by s descending and drop its first min(m, |A|); the new R is the
     rest of A in that order, then B unchanged (the order steers the next split, so it is reproduced exactly);
  4. keep the important tokens and R, in raster order, with their projected features.

Ties go to the lower token index, in the CLS ranking and in the s ordering (the official ``argsort`` leaves them
unspecified). The official tensor code assumes an even |R| and m <= |R| / 2 (true for every real configuration);
outside it, step 3 drops min(m, |A|) and loops until |R| = T_div, so exactly T tokens are kept, and equals the
official code wherever that is well defined.

r: the official scripts require it (argparse default 0.5; README: 0.5 for 128 tokens, 0.75 for 64); the r behind
the comparison tables is undocumented: default 0.5. LLaVA-NeXT: per crop with T = N'/crops (the tables' protocol,
the adapter's default layout). Video-LLaVA: per frame. Qwen2.5-VL has no CLS token: ``attention="global"`` (the
maintainers' description of their port: the attention each token receives, mean over all queries and heads, merged
2x2 like the features); the Qwen2.5-VL model configs choose it (``cls_free_scores: global``), and the default
``"cls"`` is refused there before anything loads.
"""

from __future__ import annotations

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
    rank_descending,
    register_method,
)
from hiprune.methods.divprune import check_features
from hiprune.methods.fastervlm import check_scores

ATTENTION = {"cls": "cls", "global": "all"}  # option -> the queries of the attention request
ROUND_LIMIT = 8  # near-duplicates dropped per round (official)


def important_count(budget: int, important_ratio: float) -> int:
    """T_imp = floor(T * r)."""
    return int(budget * important_ratio)


def select_vispruner(
    cls_attention: torch.Tensor, features: torch.Tensor, budget: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """cls_attention [B, N], features [B, N, D] (pre-projector) -> [B, budget] kept indices (int64, sorted, distinct).

    Every row on its own. Raises ValueError on malformed shapes, a budget outside [1, N], a ratio outside [0, 1],
    non-finite input or an all-zero feature vector.
    """
    check_scores(cls_attention, budget, "VisPruner CLS attention")
    check_features(features, "VisPruner features")
    if features.shape[:2] != cls_attention.shape:
        raise ValueError(
            f"VisPruner features {tuple(features.shape)} do not match the attention scores {tuple(cls_attention.shape)}"
        )
    _check_ratio(important_ratio)
    budget = int(budget)
    n_important = important_count(budget, important_ratio)
    n_diverse = budget - n_important
    ranked = rank_descending(cls_attention.float())  # [B, N], ties to the lower index
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    rows = []
    for b in range(cls_attention.shape[0]):
        candidates = ranked[b, n_important:]
        if n_diverse > 0:
            candidates = _diverse(candidates, unit[b], n_diverse)
        else:
            candidates = candidates[:0]
        rows.append(torch.cat([ranked[b, :n_important], candidates]).sort().values)
    return torch.stack(rows)


def removal_flops(num_tokens: int, budget: int, important_ratio: float, width: int) -> int:
    """FLOPs of the duplicate-removal rounds of one grid: 2 |A| |B| width per round (the rounds' sizes depend only on
    N, T and r)."""
    remaining = num_tokens - important_count(budget, important_ratio)
    diverse = budget - important_count(budget, important_ratio)
    flops = 0
    while diverse > 0:
        m = min(ROUND_LIMIT, remaining - diverse)
        if m <= 0:
            break
        a, b = (remaining + 1) // 2, remaining // 2
        flops += 2 * a * b * width
        remaining -= min(m, a)
    return flops


def _diverse(candidates: torch.Tensor, unit: torch.Tensor, n_diverse: int) -> torch.Tensor:
    """The official duplicate-removal rounds on the candidate order ``candidates`` [|R|] -> [n_diverse]."""
    while True:
        m = min(ROUND_LIMIT, candidates.shape[0] - n_diverse)
        if m <= 0:
            return candidates
        a, b = candidates[0::2], candidates[1::2]
        similarity = (unit[a] @ unit[b].T).max(dim=1).values  # [|A|]
        # s descending, ties to the lower token index: sort by index first, then a stable sort by -s
        by_index = a.argsort()
        order = by_index[torch.sort(-similarity[by_index], stable=True).indices]
        candidates = torch.cat([a[order][min(m, a.shape[0]):], b])


def _check_ratio(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (Integral, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"VisPruner important_ratio must be a number in [0, 1], got {value!r}")


@register_method
@dataclass
class VisPruner(Method):
    """VisPruner with the official rule; ``important_ratio`` r (default 0.5), ``attention`` "cls" or "global"."""

    name: ClassVar[str] = "vispruner"
    stage: ClassVar[Stage] = "vision"

    important_ratio: float = 0.5
    attention: str = "cls"  # "global": Qwen2.5-VL port (mean attention each token receives), no CLS needed

    def validate(self) -> None:
        super().validate()
        _check_ratio(self.important_ratio)
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown VisPruner attention {self.attention!r}; expected one of {sorted(ATTENTION)}")

    def requests(self) -> dict[str, Request]:
        return {
            "importance": Request("attention", FEATURE_LAYER, queries=ATTENTION[self.attention]),
            "hidden": Request("hidden", FEATURE_LAYER),
        }

    def selection_flops(self, num_tokens: int, budget: int, widths: dict[str, int]) -> int:
        return removal_flops(num_tokens, budget, self.important_ratio, widths["hidden"])

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        if "importance" not in tokens.scores or "hidden" not in tokens.states:
            raise ValueError("VisPruner needs VisionTokens.scores['importance'] and VisionTokens.states['hidden']")
        indices = select_vispruner(tokens.scores["importance"], tokens.states["hidden"], budget, self.important_ratio)
        indices = indices.to(tokens.features.device)
        return Selection(indices, gather_tokens(tokens.features, indices))
