"""HiPrune++ (arXiv 2508.00553, prompt-aware): HiPrune, then the visual tokens most similar to the prompt.

After HiPrune's selection, every not-yet-chosen visual token is compared (cosine) with the prompt embedding; the
top t join the kept set. Chosen tokens are excluded with -inf, never by subtracting 1 from a cosine (a cosine of a
chosen token minus 1 can still beat an unchosen token's cosine of -1).

The paper leaves two choices open; both are options:
- count: "prose" t = round(beta * N') (the paper's text, default: it defines the method) or
  "pseudocode" t = round(beta * N' / 5) (the algorithm box, which divides like the anchor count).
- mode: "within_budget" (default) HiPrune picks N' - t (anchors from N' - t as well) and the total stays N', which
  matches the paper's FLOPs table (HiPrune++ costs the same LLM FLOPs as HiPrune there); "additive" HiPrune picks N'
  and the LLM receives N' + t tokens.
Which embeddings are compared is the adapter's business (VisionTokens.prompt_embeds / token_embeds): for CLIP
towers the paired CLIP text tower against CLIP-projected patch features, for Qwen2.5-VL mean LLM input embeddings
against merged visual tokens. On CLIP towers the method says which of them (the paper's "mean text embedding" leaves
the rest open):
- patch_layer: "last" (default) the tower's last layer; "feature" the layer that feeds the LLM (the penultimate,
  vision_feature_layer -2, on the CLIP-tower families here), through post_layernorm and visual_projection as CDPruner,
  the practice the paper cites, computes its image embeddings.
- text_pooling: None (default) the prompt encoder's own pooling (the model config's prompt_pooling, "mean": the mean
  of the projected token embeddings); "eos" the text tower's projected EOS embedding (CLIPTextModelWithProjection's
  text_embeds, CDPruner's); "mean" forces the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from hiprune.methods.base import FEATURE_LAYER, Selection, VisionTokens, gather_tokens, register_method, top_k
from hiprune.methods.hiprune import HiPrune

COUNTS = ("prose", "pseudocode")
MODES = ("within_budget", "additive")
PATCH_LAYERS = ("last", "feature")
TEXT_POOLINGS = (None, "mean", "eos")


def text_token_count(budget: int, beta: float, count: str = "prose") -> int:
    """t: round(beta * N') or round(beta * N' / 5), Python's round (half to even)."""
    if count not in COUNTS:
        raise ValueError(f"unknown HiPrune++ count {count!r}; expected one of {COUNTS}")
    return round(budget * beta) if count == "prose" else round(budget * beta / 5)


def select_by_prompt(
    token_embeds: torch.Tensor, prompt_embeds: torch.Tensor, chosen: torch.Tensor, count: int
) -> torch.Tensor:
    """Top-``count`` cosine similarities to the prompt among tokens not in ``chosen``.

    token_embeds [B, N, E], prompt_embeds [B, E], chosen [B, N] bool -> [B, count] indices (ties: lower index).
    """
    if token_embeds.shape[0] != prompt_embeds.shape[0] or token_embeds.shape[-1] != prompt_embeds.shape[-1]:
        raise ValueError(
            f"token embeddings {tuple(token_embeds.shape)} and prompt embeddings {tuple(prompt_embeds.shape)} differ"
        )
    free = (~chosen).sum(dim=1)
    if bool((free < count).any()):
        raise ValueError(f"HiPrune++ wants {count} prompt tokens but only {int(free.min())} tokens are left")
    similarity = torch.nn.functional.cosine_similarity(token_embeds.float(), prompt_embeds.float().unsqueeze(1), dim=-1)
    if not torch.isfinite(similarity).all():
        raise ValueError("HiPrune++ prompt similarities contain NaN or inf")
    similarity = similarity.masked_fill(chosen, -math.inf)
    return top_k(similarity, count)


@register_method
@dataclass
class HiPrunePP(HiPrune):
    """HiPrune++: HiPrune plus t prompt-relevant tokens (defaults: beta 0.1, prose count, within budget)."""

    name: ClassVar[str] = "hiprune_pp"
    needs_prompt: ClassVar[bool] = True

    beta: float = 0.1
    count: str = "prose"
    mode: str = "within_budget"
    patch_layer: str = "last"
    text_pooling: str | None = None

    @property
    def prompt_patch_layer(self) -> str | None:  # read by CLIP-tower adapters (Method.prompt_patch_layer)
        return FEATURE_LAYER if self.patch_layer == "feature" else None

    @property
    def prompt_pooling(self) -> str | None:  # read by CLIP-tower adapters (Method.prompt_pooling)
        return self.text_pooling

    def validate(self) -> None:
        if self.patch_layer not in PATCH_LAYERS:
            raise ValueError(f"unknown HiPrune++ patch_layer {self.patch_layer!r}; expected one of {PATCH_LAYERS}")
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"unknown HiPrune++ text_pooling {self.text_pooling!r}; expected one of {TEXT_POOLINGS}")
        if self.mode not in MODES:
            raise ValueError(f"unknown HiPrune++ mode {self.mode!r}; expected one of {MODES}")
        if self.count not in COUNTS:
            raise ValueError(f"unknown HiPrune++ count {self.count!r}; expected one of {COUNTS}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"HiPrune++ beta must be a number in [0, 1], got {self.beta!r}")
        if isinstance(self.budget, int) and self.mode == "within_budget":
            t = text_token_count(self.budget, self.beta, self.count)
            if self.budget - t < 1:
                raise ValueError(f"HiPrune++ leaves no HiPrune tokens: budget {self.budget} minus {t} prompt tokens")
            self._hiprune(self.budget - t).validate()
        else:
            super().validate()

    def _hiprune(self, budget: int) -> HiPrune:
        """The HiPrune part, with every HiPrune option of this method (so none can be silently dropped)."""
        options = {f.name: getattr(self, f.name) for f in fields(HiPrune) if f.init}
        return HiPrune(**{**options, "budget": budget})

    def kept_count(self, budget: int) -> int:
        if self.mode == "additive":
            return budget + text_token_count(budget, self.beta, self.count)
        return budget

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        if tokens.prompt_embeds is None or tokens.token_embeds is None:
            raise ValueError("HiPrune++ needs prompt_embeds and token_embeds in VisionTokens (the adapter fills them)")
        t = text_token_count(budget, self.beta, self.count)
        base = budget - t if self.mode == "within_budget" else budget
        if base + t > tokens.num_tokens:
            raise ValueError(f"HiPrune++ wants {base + t} tokens but the grid has {tokens.num_tokens}")
        first = self._hiprune(base).select(tokens, base)
        chosen = torch.zeros(tokens.batch_size, tokens.num_tokens, dtype=torch.bool, device=first.indices.device)
        chosen.scatter_(1, first.indices, True)
        added = select_by_prompt(tokens.token_embeds, tokens.prompt_embeds, chosen.to(tokens.token_embeds.device), t)
        added = added.to(first.indices.device)
        indices, order = torch.cat([first.indices, added], dim=1).sort(dim=1)
        roles = {name: torch.cat([mask, torch.zeros_like(added, dtype=torch.bool)], 1).gather(1, order)
                 for name, mask in first.roles.items()}
        roles["text"] = torch.cat([torch.zeros_like(first.indices, dtype=torch.bool),
                                   torch.ones_like(added, dtype=torch.bool)], 1).gather(1, order)
        return Selection(indices, gather_tokens(tokens.features, indices), roles)
