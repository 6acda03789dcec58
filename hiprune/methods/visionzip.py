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

Families: LLaVA-1.5; Video-LLaVA (images: CLS in front; video frames carry their CLS anyway, per frame); LLaVA-NeXT
in the official layout of the VisionZip code (the same d + C in every crop: 108 + 20 / 54 + 10 / 27 + 5 for 640 /
320 / 160): the base crop's [CLS, dominant, contextual], then the sub-crops' dominant patches in raster order over
the stitched grid, then the sub-crops' CLS tokens, then their contextual tokens (crop order); the adapter reads
:meth:`VisionZip.trailing_count` for the contextual tokens.

``variant="global"``: the official Qwen2.5-VL port, for encoders without a CLS token (the Qwen2.5-VL models'
configs choose it): scores = the global attention of the feature layer (the attention each token receives, over
all queries and heads, merged 2 x 2 like the tokens), keys of that layer (after the rotary embedding); no CLS token;
d = floor((rho - 0.05) n) dominant, C = max(floor(0.05 n), 1) contextual of a ratio budget rho (:func:`qwen_split`,
:meth:`VisionZip.resolve_grid_budget`: the grid passes d + C on, not round(rho n)); the contextual token of a target
is built from the tokens passed on (the LLM input embeddings, post-merger) and replaces the target's embedding; the
kept tokens stay in raster order (the sequence is filtered), so every one keeps its M-RoPE position.
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
VARIANTS = ("cls", "global")


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
    """VisionZip with the official rule and splits; ``merge`` "add_mean" (official code) or "mean_group" (prose);
    ``variant`` "cls" (CLIP towers: CLS attention, the CLS token passed on) or "global" (the official Qwen2.5-VL port)."""

    name: ClassVar[str] = "visionzip"
    stage: ClassVar[Stage] = "vision"

    merge: str = "add_mean"
    variant: str = "cls"

    @property
    def keeps_cls(self) -> bool:  # the CLS token goes in front on CLIP towers; the port has none
        return self.variant == "cls"

    @property
    def own_grid_budgets(self) -> bool:  # the port passes d + C on, not round(rho * n)
        return self.variant == "global"

    def validate(self) -> None:
        super().validate()
        if self.merge not in MERGES:
            raise ValueError(f"unknown VisionZip merge {self.merge!r}; expected one of {MERGES}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown VisionZip variant {self.variant!r}; expected one of {VARIANTS}")
        if self.variant == "global":
            qwen_split(self.budget, 1)  # a ratio budget in [0.05, 1]
        elif isinstance(self.budget, int) and self.budget < 2:
            raise ValueError(f"VisionZip needs a budget of at least 2 tokens (CLS + 1 contextual), got {self.budget}")

    def requests(self) -> dict[str, Request]:
        if self.variant == "global":
            return {
                "attention": Request("attention", FEATURE_LAYER, queries="all"),
                "keys": Request("keys", FEATURE_LAYER),
            }
        return {
            "cls": Request("attention", FEATURE_LAYER, queries="cls"),
            "keys": Request("keys", FEATURE_LAYER),
            "hidden": Request("hidden", FEATURE_LAYER),
        }

    def split(self, budget: int, num_tokens: int) -> tuple[int, int]:
        """(dominant patch tokens, contextual tokens) of a grid of ``num_tokens`` at the resolved ``budget``."""
        if self.variant == "global":
            return qwen_split(self.budget, num_tokens)
        with_cls, contextual = official_split(budget)
        return with_cls - 1, contextual

    def resolve_grid_budget(self, num_tokens: int) -> int:
        if self.variant != "global":
            return super().resolve_grid_budget(num_tokens)
        return sum(qwen_split(self.budget, num_tokens))

    def kept_count(self, budget: int) -> int:
        # the grid's CLS token, put in front by the family, is the budget's last token; the port has none
        return budget - 1 if self.keeps_cls else budget

    def trailing_count(self, budget: int) -> int:
        return official_split(budget)[1] if self.variant == "cls" else 0

    def projected_tokens(self, budget: int) -> int:
        if self.variant == "global":
            return 0  # merges the tokens passed on, after the merger
        return official_split(budget)[1] + 1  # the contextual tokens' merged states and the CLS token

    def selection_flops(self, num_tokens: int, budget: int, widths: dict[str, int]) -> int:
        dominant, contextual = self.split(budget, num_tokens)
        others = num_tokens - dominant - contextual
        # every other against every target; the C contextual tokens then cost the family's projector (not here)
        return 2 * others * contextual * widths["keys"]

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        scores = "attention" if self.variant == "global" else "cls"
        states = ("keys",) if self.variant == "global" else ("keys", "hidden")
        missing = [k for k in (scores,) if k not in tokens.scores] + [k for k in states if k not in tokens.states]
        if missing:
            raise ValueError(f"VisionZip needs {missing} in VisionTokens.scores / states")
        dominant, contextual = self.split(budget, tokens.num_tokens)
        if self.variant == "global" and dominant + contextual != budget:
            raise ValueError(
                f"VisionZip variant=global keeps d + C = {dominant} + {contextual} of a grid of {tokens.num_tokens} "
                f"tokens at ratio {self.budget}, but was given a budget of {budget} (resolve_grid_budget)"
            )
        if self.variant == "global":
            return self._select_global(tokens, dominant, contextual)
        if tokens.project is None:
            raise ValueError("VisionZip merges the feature layer's hidden states and needs VisionTokens.project")
        groups = visionzip_groups(tokens.scores["cls"], tokens.states["keys"], tokens.states["hidden"],
                                  dominant, contextual, self.merge)
        features = tokens.features
        merged = tokens.project(groups.contextual).to(features.dtype)
        indices = torch.cat([groups.dominant, groups.targets], dim=1).to(features.device)
        is_dominant = torch.arange(indices.shape[1], device=features.device) < groups.dominant.shape[1]
        is_dominant = is_dominant.expand(indices.shape[0], -1)
        return Selection(
            indices,
            torch.cat([gather_tokens(features, groups.dominant.to(features.device)), merged], dim=1),
            roles={"dominant": is_dominant, "contextual": ~is_dominant},
            sources=groups.sources.to(features.device),
        )

    def _select_global(self, tokens: VisionTokens, dominant: int, contextual: int) -> Selection:
        """The port: merge the tokens passed on; dominant and contextual tokens together in raster order (the
        contextual token stands at its target), as the official code filters the sequence."""
        features = tokens.features
        groups = visionzip_groups(tokens.scores["attention"], tokens.states["keys"], features, dominant, contextual,
                                  self.merge)
        stacked = torch.cat([groups.dominant, groups.targets], dim=1).to(features.device)
        values = torch.cat([gather_tokens(features, stacked[:, :dominant]), groups.contextual.to(features.device)], 1)
        order = stacked.argsort(dim=1)
        slot = order.argsort(dim=1)  # slot of the k-th stacked token in raster order
        sources = groups.sources.to(features.device)
        sources = torch.where(sources >= 0, slot.gather(1, sources.clamp(min=0)), sources)
        is_dominant = order < dominant
        return Selection(
            stacked.gather(1, order),
            gather_tokens(values, order),
            roles={"dominant": is_dominant, "contextual": ~is_dominant},
            sources=sources,
        )
