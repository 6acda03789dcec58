"""FasterVLM (arXiv 2412.01818 v1; Theia-4869/FasterVLM): keep the patches the [CLS] token attends to most.

Per grid of N patches and a budget N':
  1. c(p) = the attention the CLS query pays patch p in the feature layer (the layer whose output feeds the LLM,
     LLaVA's layer 22 of 0..23), mean over heads (the official sum over heads ranks the same);
  2. keep the N' patches with the largest c, emitted in raster order, with their projected features.

Ties go to the lower index (the official ``torch.topk`` leaves their order unspecified). LLaVA-NeXT: every crop on
its own with N'/crops (the comparison tables' 'spatial' protocol, the adapter's default layout). Video-LLaVA: every
frame on its own. Encoders without a CLS token (Qwen2.5-VL) have no such score: the pipeline refuses the method
before anything is patched (use ``vispruner attention=global`` or ``hiprune`` there).
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
    register_method,
    top_k,
)
from hiprune.scores import check_finite


def check_scores(scores: torch.Tensor, budget: int, what: str) -> int:
    """Validate [B, N] finite scores and an int budget in [1, N]; returns N."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{what} must be a [B, N] tensor, got {shape}")
    n = scores.shape[1]
    if isinstance(budget, bool) or not isinstance(budget, Integral) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an int in [1, {n}] (tokens of this grid), got {budget!r}")
    if scores.is_complex() or not scores.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {scores.dtype}")
    check_finite(scores, what)
    return n


def select_fastervlm(cls_attention: torch.Tensor, budget: int) -> torch.Tensor:
    """[B, N] CLS attention of the feature layer -> [B, budget] kept indices (int64, sorted ascending, distinct).

    Every row independently: the ``budget`` highest scores, ties to the lower index. Raises ValueError on a
    malformed shape, a budget outside [1, N] or non-finite scores.
    """
    check_scores(cls_attention, budget, "FasterVLM CLS attention")
    # float32 so that half-precision scores rank the same on every device
    return top_k(cls_attention.float(), int(budget)).sort(dim=1).values


@register_method
@dataclass
class FasterVLM(Method):
    """FasterVLM with the official rule: the feature layer's CLS attention, top N' per grid."""

    name: ClassVar[str] = "fastervlm"
    stage: ClassVar[Stage] = "vision"

    def requests(self) -> dict[str, Request]:
        return {"cls": Request("attention", FEATURE_LAYER, queries="cls")}

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        if "cls" not in tokens.scores:
            raise ValueError(
                f"FasterVLM needs the CLS attention 'cls' in VisionTokens.scores, got {sorted(tokens.scores)}"
            )
        indices = select_fastervlm(tokens.scores["cls"], budget).to(tokens.features.device)
        return Selection(indices, gather_tokens(tokens.features, indices))
