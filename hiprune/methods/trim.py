"""TRIM (arXiv 2409.10994, COLING'25; FreedomIntelligence/TRIM): keep the patches CLIP relates to the question,
plus one token averaging the rest.

Per grid of N patches and the question:
  1. t = the question through CLIP's text tower and ``text_projection`` (the pooled end-of-text embedding, not
     normalised); v_p = the feature layer's patch states through CLIP's ``post_layernorm`` and ``visual_projection``
     (not normalised) -- the pipeline's prompt encoder, as for HiPrune++, on the feature layer and with "eos" pooling;
  2. q = softmax over the patches of -(v_p . t): the sign flip is deliberate (the maintainers' reply, TRIM issue #3);
  3. count: ``adaptive`` (official ``TRIM:-1``): the patches with q above Q3 + 1.5 (Q3 - Q1) (quartiles with linear
     interpolation) -- :func:`adaptive_count`; or fixed;
  4. keep the top-k by q in raster order (ties to the lower index), then one token: the mean of the N - k unselected
     feature-layer states, through the projector. Output k + 1 tokens.

The adaptive count varies with the image, but the processor emits an image's tokens before the encoder runs, so the
method runs the fixed count (as the comparison tables must have): by default k = N' - 1 plus the aggregate (total
N', ``total="budget"``); ``total="budget_plus_one"``: k = N' plus the aggregate (the official ``TRIM:rho`` with rho
written 0.333 / 0.222 / 0.111 gives 191 / 127 / 63 + 1). The merged aggregate stands at the lowest unselected index
(``Selection.indices``) and every unselected patch has its slot in ``Selection.sources``; k < N is required (an
aggregate of nothing is the official zero vector, which the harness refuses to pass on).

LLaVA-NeXT: no official support; every crop on its own with the image's question (N'/crops each); in the official
'spatial' layout a sub-crop's aggregate takes the stitched-grid place of its lowest unselected patch (the base
crop's comes last in the base block). Video-LLaVA: per frame. Qwen2.5-VL has no CLIP text tower: refused before
anything loads.
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

TOTALS = ("budget", "budget_plus_one")


def trim_scores(token_embeds: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """token_embeds [B, N, E], prompt_embeds [B, E] -> q [B, N] = softmax over N of -(v . t), float32."""
    if not isinstance(token_embeds, torch.Tensor) or token_embeds.dim() != 3:
        raise ValueError(f"TRIM token embeddings must be [B, N, E], got {getattr(token_embeds, 'shape', token_embeds)}")
    expected = (token_embeds.shape[0], token_embeds.shape[2])
    if not isinstance(prompt_embeds, torch.Tensor) or tuple(prompt_embeds.shape) != expected:
        raise ValueError(
            f"TRIM prompt embeddings {tuple(getattr(prompt_embeds, 'shape', ()))} must be [B, E] for token "
            f"embeddings {tuple(token_embeds.shape)}"
        )
    check_finite(token_embeds, "TRIM token embeddings")
    check_finite(prompt_embeds, "TRIM prompt embeddings")
    similarity = torch.einsum("bne,be->bn", token_embeds.float(), prompt_embeds.float())
    return torch.softmax(-similarity, dim=1)


def adaptive_count(q: torch.Tensor) -> torch.Tensor:
    """[B, N] scores -> [B] the official adaptive count: #{p : q_p > Q3 + 1.5 (Q3 - Q1)} (linear quartiles)."""
    check_finite(q, "TRIM scores")
    quartiles = torch.quantile(q.float(), torch.tensor([0.25, 0.75], device=q.device), dim=1)  # [2, B]
    upper = quartiles[1] + 1.5 * (quartiles[1] - quartiles[0])
    return (q.float() > upper.unsqueeze(1)).sum(dim=1)


def select_trim(q: torch.Tensor, count: int) -> torch.Tensor:
    """[B, N] scores -> [B, count] the top-``count`` patches by q, sorted (ties to the lower index)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(f"TRIM scores must be [B, N], got {getattr(q, 'shape', q)}")
    check_finite(q, "TRIM scores")
    n = q.shape[1]
    if isinstance(count, bool) or not isinstance(count, Integral) or not 0 <= count < n:
        raise ValueError(f"TRIM keeps an int count in [0, {n - 1}] of {n} patches (one must be left for the "
                         f"aggregate), got {count!r}")
    return top_k(q.float(), int(count)).sort(dim=1).values


def trim_aggregate(hidden: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, N, D], kept [B, k] -> (the mean of the unselected states [B, 1, D], the lowest unselected index
    [B, 1]); at least one patch must be unselected."""
    batch, n = hidden.shape[:2]
    unselected = torch.ones(batch, n, dtype=torch.bool, device=hidden.device)
    unselected.scatter_(1, kept.to(hidden.device), False)
    weights = unselected.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
    first = torch.where(unselected, torch.arange(n, device=hidden.device), n).min(dim=1, keepdim=True).values
    return mean, first


@register_method
@dataclass
class TRIM(Method):
    """TRIM with the fixed count: k = N' - 1 patches by reversed CLIP similarity + one aggregate token (total N')."""

    name: ClassVar[str] = "trim"
    stage: ClassVar[Stage] = "vision"
    needs_prompt: ClassVar[bool] = True
    needs_clip_text: ClassVar[bool] = True
    prompt_patch_layer: ClassVar[str | None] = FEATURE_LAYER
    prompt_pooling: ClassVar[str | None] = "eos"

    total: str = "budget"

    def validate(self) -> None:
        super().validate()
        if self.total not in TOTALS:
            raise ValueError(f"unknown TRIM total {self.total!r}; expected one of {TOTALS}")

    def requests(self) -> dict[str, Request]:
        return {"hidden": Request("hidden", FEATURE_LAYER)}

    def kept_count(self, budget: int) -> int:
        return budget + 1 if self.total == "budget_plus_one" else budget

    def projected_tokens(self, budget: int) -> int:
        return 1  # the aggregate of the unselected feature-layer states

    def selection_flops(self, num_tokens: int, budget: int, widths: dict[str, int]) -> int:
        # the N similarities v . t (the prompt encoder's own work, and the aggregate through the family's projector,
        # are counted elsewhere)
        return 2 * num_tokens * widths["prompt"]

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        if tokens.prompt_embeds is None or tokens.token_embeds is None:
            raise ValueError("TRIM needs prompt_embeds and token_embeds in VisionTokens (the adapter fills them)")
        if "hidden" not in tokens.states or tokens.project is None:
            raise ValueError("TRIM averages the feature layer's hidden states: it needs states['hidden'] and project")
        hidden = tokens.states["hidden"]
        check_finite(hidden, "TRIM hidden states")
        count = self.kept_count(budget) - 1
        q = trim_scores(tokens.token_embeds, tokens.prompt_embeds)
        kept = select_trim(q, count).to(tokens.features.device)
        mean, first = trim_aggregate(hidden, kept)
        features = tokens.features
        aggregate = tokens.project(mean).to(features.dtype)
        n = tokens.num_tokens
        sources = torch.full((kept.shape[0], n), count, dtype=torch.long, device=features.device)
        sources.scatter_(1, kept, torch.arange(count, device=features.device).expand_as(kept))
        is_aggregate = torch.arange(count + 1, device=features.device) == count
        return Selection(
            torch.cat([kept, first.to(features.device)], dim=1),
            torch.cat([gather_tokens(features, kept), aggregate], dim=1),
            roles={"kept": ~is_aggregate.expand(len(kept), -1), "aggregate": is_aggregate.expand(len(kept), -1)},
            sources=sources,
        )
