"""VisionZip (arXiv 2412.04467, CVPR'25; dvlab-research/VisionZip): the selection rule, as tensor logic.

Per grid of N patches, ``dominant`` patch tokens and ``contextual`` tokens:
  1. dominant: the ``dominant`` patches with the largest CLS attention of the feature layer (heads summed or averaged:
     same ranking), in raster order; ties to the lower index. (The official ``d`` also counts the CLS token, which
     VisionZip passes on in front: ``dominant`` here = d - 1.)
  2. the remaining M = N - dominant patches R, in raster order; step s = max(1, floor(M / contextual)); the targets
     are R[0], R[s], R[2s], ..., the first ``contextual`` of them; every other member of R is an "other";
  3. metric: the feature layer's keys (head-averaged), L2-normalised; every other joins the target of highest cosine
     similarity (the first one on ties, as ``argmax``);
  4. the contextual token of target t: x(t) + mean of x over the others that joined t (just x(t) if none), x = the
     feature layer's hidden states (official code; ``merge="mean_group"``: the mean over the whole group, the paper's
     prose), in target order.

The method (``method=visionzip``) passes every grid's CLS token on in front (``Method.keeps_cls``: the family puts
the feature layer's CLS state, projected, first; it counts toward the budget), then the dominant patches (raster
order), then the contextual tokens (target order), whose merged pre-projector states go through the family's
projector (``VisionTokens.project``). Splits: d + C = 162 + 30 / 108 + 20 / 54 + 10 for 192 / 128 / 64, C = 5/32 of
the budget elsewhere (:func:`official_split`). Each merged token stands at its target's index
(``Selection.indices``) and ``Selection.sources`` says which patches went into it.

Families: LLaVA-1.5; Video-LLaVA (images: CLS in front; video frames carry their CLS anyway, per frame). Not yet:
LLaVA-NeXT (the official layout puts the sub-crops' CLS and contextual tokens after all dominant tokens; refused
before loading) and the official Qwen2.5-VL port (:func:`qwen_split`; global attention, LLM-input embeddings, no CLS;
refused before loading).
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
from hiprune.methods.divprune import check_features
from hiprune.methods.fastervlm import check_scores

MERGES = ("add_mean", "mean_group")


@dataclass
class VisionZipGroups:
    """What VisionZip does with one batch of grids.

    dominant: [B, d] dominant patch indices, sorted. targets: [B, C] contextual target indices, in target order.
    contextual: [B, C, D] the contextual tokens. sources: [B, N] the output slot of every patch: dominant j -> j,
    a member of target c's group -> d + c.
    """

    dominant: torch.Tensor
    targets: torch.Tensor
    contextual: torch.Tensor
    sources: torch.Tensor


def visionzip_groups(
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    hidden: torch.Tensor,
    dominant: int,
    contextual: int,
    merge: str = "add_mean",
) -> VisionZipGroups:
    """VisionZip on B grids: cls_attention [B, N], keys [B, N, Dk], hidden [B, N, D]; every row on its own.

    Raises ValueError on malformed shapes, non-finite input, counts that do not fit (dominant >= 0, contextual >= 1,
    dominant + contextual <= N) or an unknown ``merge``.
    """
    n = check_scores(cls_attention, 1, "VisionZip CLS attention")
    check_features(keys, "VisionZip keys")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"VisionZip hidden states must be a floating-point [B, N, D] tensor, got {shape}")
    if keys.shape[:2] != cls_attention.shape or hidden.shape[:2] != cls_attention.shape:
        raise ValueError(
            f"VisionZip keys {tuple(keys.shape)} and hidden states {tuple(hidden.shape)} must match the attention "
            f"scores {tuple(cls_attention.shape)}"
        )
    if not bool(torch.isfinite(hidden).all()):
        raise ValueError("VisionZip hidden states contain non-finite values (NaN or inf)")
    for name, value, low in (("dominant", dominant, 0), ("contextual", contextual, 1)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
            raise ValueError(f"VisionZip {name} must be an int >= {low}, got {value!r}")
    if dominant + contextual > n:
        raise ValueError(f"VisionZip {dominant} dominant + {contextual} contextual tokens exceed the grid's {n}")
    if merge not in MERGES:
        raise ValueError(f"unknown VisionZip merge {merge!r}; expected one of {MERGES}")

    batch = cls_attention.shape[0]
    device = hidden.device
    kept = top_k(cls_attention.float(), dominant).sort(dim=1).values if dominant else \
        torch.zeros(batch, 0, dtype=torch.long, device=cls_attention.device)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    remaining = n - dominant
    step = max(1, remaining // contextual)
    targets, tokens, sources = [], [], []
    for b in range(batch):
        is_dominant = torch.zeros(n, dtype=torch.bool, device=cls_attention.device)
        is_dominant[kept[b]] = True
        rest = (~is_dominant).nonzero().flatten()  # raster order
        target = rest[::step][:contextual]
        others = rest[~torch.isin(rest, target)]
        joined = (unit[b][others] @ unit[b][target].T).argmax(dim=1)  # first maximum on ties
        slot = torch.full((n,), -1, dtype=torch.long, device=cls_attention.device)
        slot[kept[b]] = torch.arange(dominant, device=slot.device)
        slot[target] = dominant + torch.arange(contextual, device=slot.device)
        slot[others] = dominant + joined
        x = hidden[b].float()
        summed = torch.zeros(contextual, x.shape[1], device=device)
        summed.index_add_(0, joined.to(device), x[others.to(device)])
        count = torch.bincount(joined, minlength=contextual).to(device).unsqueeze(1).float()
        if merge == "add_mean":
            merged = x[target.to(device)] + torch.where(count > 0, summed / count.clamp(min=1), 0.0)
        else:
            merged = (x[target.to(device)] + summed) / (count + 1)
        targets.append(target)
        tokens.append(merged.to(hidden.dtype))
        sources.append(slot)
    return VisionZipGroups(kept, torch.stack(targets), torch.stack(tokens), torch.stack(sources))


def select_visionzip(
    cls_attention: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, dominant] sorted, contextual_tokens [B, contextual, D]): the official rule
    (:func:`visionzip_groups`, ``merge="add_mean"``); ``dominant`` counts patch tokens only."""
    groups = visionzip_groups(cls_attention, keys, hidden, dominant, contextual)
    return groups.dominant, groups.contextual


def official_split(budget: int) -> tuple[int, int]:
    """(d, C) of the official scripts for LLaVA budgets, d counting the CLS token: 192 -> 162 + 30, 128 -> 108 + 20,
    64 -> 54 + 10, i.e. C = 5/32 of the budget; elsewhere the same ratio, C = round(5 * budget / 32) >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, Integral) or budget < 2:
        raise ValueError(f"VisionZip needs a budget of at least 2 tokens (CLS + 1 contextual), got {budget!r}")
    contextual = max(1, round(5 * budget / 32))
    return budget - contextual, contextual


def qwen_split(ratio: float, merged: int) -> tuple[int, int]:
    """(dominant, contextual) of the official Qwen2.5-VL port: floor((ratio - 0.05) * n), max(floor(0.05 * n), 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, float) or not 0.05 <= ratio <= 1.0:
        raise ValueError(f"VisionZip's Qwen2.5-VL port needs a ratio budget in [0.05, 1], got {ratio!r}")
    return int((ratio - 0.05) * merged), max(int(0.05 * merged), 1)


@register_method
@dataclass
class VisionZip(Method):
    """VisionZip with the official rule and splits; ``merge`` "add_mean" (official code) or "mean_group" (prose)."""

    name: ClassVar[str] = "visionzip"
    stage: ClassVar[Stage] = "vision"
    keeps_cls: ClassVar[bool] = True

    merge: str = "add_mean"

    def validate(self) -> None:
        super().validate()
        if self.merge not in MERGES:
            raise ValueError(f"unknown VisionZip merge {self.merge!r}; expected one of {MERGES}")
        if isinstance(self.budget, int) and self.budget < 2:
            raise ValueError(f"VisionZip needs a budget of at least 2 tokens (CLS + 1 contextual), got {self.budget}")

    def requests(self) -> dict[str, Request]:
        return {
            "cls": Request("attention", FEATURE_LAYER, queries="cls"),
            "keys": Request("keys", FEATURE_LAYER),
            "hidden": Request("hidden", FEATURE_LAYER),
        }

    def kept_count(self, budget: int) -> int:
        return budget - 1  # the grid's CLS token, put in front by the family, is the budget's last token

    def projected_tokens(self, budget: int) -> int:
        return official_split(budget)[1] + 1  # the contextual tokens' merged states and the CLS token

    def selection_flops(self, num_tokens: int, budget: int, widths: dict[str, int]) -> int:
        with_cls, contextual = official_split(budget)
        others = num_tokens - (with_cls - 1) - contextual
        # every other against every target; the C contextual tokens then cost the family's projector (not here)
        return 2 * others * contextual * widths["keys"]

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        missing = [k for k in ("cls",) if k not in tokens.scores]
        missing += [k for k in ("keys", "hidden") if k not in tokens.states]
        if missing:
            raise ValueError(f"VisionZip needs {missing} in VisionTokens.scores / states")
        if tokens.project is None:
            raise ValueError("VisionZip merges the feature layer's hidden states and needs VisionTokens.project")
        with_cls, contextual = official_split(budget)
        groups = visionzip_groups(tokens.scores["cls"], tokens.states["keys"], tokens.states["hidden"],
                                  with_cls - 1, contextual, self.merge)
        features = tokens.features
        merged = tokens.project(groups.contextual).to(features.dtype)
        indices = torch.cat([groups.dominant, groups.targets], dim=1).to(features.device)
        dominant = torch.arange(indices.shape[1], device=features.device) < groups.dominant.shape[1]
        dominant = dominant.expand(indices.shape[0], -1)
        return Selection(
            indices,
            torch.cat([gather_tokens(features, groups.dominant.to(features.device)), merged], dim=1),
            roles={"dominant": dominant, "contextual": ~dominant},
            sources=groups.sources.to(features.device),
        )
