"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR'23, arXiv 2210.09461) inside the vision encoder.

Between the attention and the MLP of every encoder layer up to the feature layer, ``r`` token pairs merge by
bipartite soft matching on the layer's keys (the official rule, github.com/facebookresearch/ToMe, read, not copied):

1. metric: the keys, mean over heads, L2-normalised;
2. the current tokens split alternately: A = positions 0, 2, 4, ... (CLS at 0), B = 1, 3, 5, ...;
3. every a in A finds its most similar b* in B (cosine; the first maximum on ties), with score s(a); CLS never
   merges; r' = min(r, mergeable A tokens): |A| - 1 = floor((t - 1) / 2) with a CLS token, |A| = ceil(t / 2) on an
   encoder without one (SigLIP);
4. the r' a-tokens with the highest s merge into their b* (ties: the lower A position): the pipeline takes the
   size-weighted mean and adds the sizes (``hiprune.adapters.base.EncoderMerging``);
5. output order: the unmerged A tokens by A position (CLS first), then every B token -- not raster order;
6. proportional attention (the official default for off-the-shelf models): + log(size) on every key's logit,
   applied by the pipeline as an additive mask so SDPA stays.

Budget: N' patch tokens leave the feature layer. ``schedule="exact"`` (default) spreads R = N - N' merges over the
layers up to the feature layer: floor(R / layers) each, one more in the first R mod layers (LLaVA-1.5, 192 tokens:
16 layers of 17 and 7 of 16). ``schedule="constant"`` merges ``r`` in every layer (ToMe's own setting, e.g. r = 16
leaves 208 patches on CLIP-L): the budget must then be what that leaves, and a mismatch names it. The ToMe rows of
the paper's Table 2 come from the SparseVLM paper, whose schedule is undocumented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from hiprune.methods.base import EncoderTokens, Method, Stage, rank_descending, register_method

SCHEDULES = ("exact", "constant")


def exact_schedule(num_patches: int, budget: int, layers: int) -> list[int]:
    """R = num_patches - budget merges over ``layers`` layers: floor(R / layers) each, +1 in the first R mod layers."""
    total = num_patches - budget
    return [total // layers + (1 if i < total % layers else 0) for i in range(layers)]


def tome_slots(keys: torch.Tensor, merges: int, protected: int = 1) -> torch.Tensor:
    """Bipartite soft matching: [B, T, d] keys -> [B, T] output slot of every token (T - merges slots).

    ``protected`` leading tokens (at most 1, the CLS token, which sits at A position 0) never merge. Raises
    ValueError when ``merges`` exceeds what the split allows or a key is not finite.
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [B, T, d], got shape {tuple(keys.shape)}")
    if protected not in (0, 1):
        raise ValueError(f"ToMe protects at most one leading token (CLS), got {protected}")
    batch, length, _ = keys.shape
    mergeable = (length + 1) // 2 - protected
    if isinstance(merges, bool) or not isinstance(merges, Integral) or not 0 <= merges <= mergeable:
        raise ValueError(f"ToMe can merge 0..{mergeable} of {length} tokens in one layer, got {merges!r}")
    if not torch.isfinite(keys).all():
        raise ValueError("ToMe keys contain NaN or inf")
    device = keys.device
    metric = torch.nn.functional.normalize(keys.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]  # A: even positions (CLS first), B: odd positions
    similarity = a @ b.transpose(1, 2)  # [B, |A|, |B|]
    if protected:
        similarity[:, 0] = -math.inf
    best, target = similarity.max(dim=-1)  # first maximum on ties
    order = rank_descending(best)  # A tokens by s, highest first; ties: the lower A position
    merged, unmerged = order[:, :merges], order[:, merges:].sort(dim=1).values
    n_a, n_b = a.shape[1], b.shape[1]
    n_unmerged = n_a - merges
    a_slots = torch.empty(batch, n_a, dtype=torch.long, device=device)
    a_slots.scatter_(1, unmerged, torch.arange(n_unmerged, device=device).expand(batch, -1))
    b_slots = n_unmerged + torch.arange(n_b, device=device).expand(batch, -1)
    a_slots.scatter_(1, merged, b_slots.gather(1, target.gather(1, merged)))
    slots = torch.empty(batch, length, dtype=torch.long, device=device)
    slots[:, ::2], slots[:, 1::2] = a_slots, b_slots
    return slots


@register_method
@dataclass
class ToMe(Method):
    """ToMe inside the vision encoder: N' patch tokens leave the feature layer (see the module docstring).

    schedule: "exact" (default: R = N - N' merges spread over the layers) or "constant" (``r`` per layer).
    r: merges per layer for ``schedule="constant"``.
    proportional_attention: add log(size) to every key's attention logit (official default for off-the-shelf ViTs).
    """

    name: ClassVar[str] = "tome"
    stage: ClassVar[Stage] = "encoder"

    schedule: str = "exact"
    r: int | None = None
    proportional_attention: bool = True

    def validate(self) -> None:
        super().validate()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown ToMe schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.schedule == "constant":
            if isinstance(self.r, bool) or not isinstance(self.r, Integral) or self.r < 1:
                raise ValueError(f"ToMe schedule='constant' needs r, merges per layer (an int >= 1), got {self.r!r}")
        elif self.r is not None:
            raise ValueError("ToMe r (merges per layer) applies to schedule='constant' only")
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"ToMe proportional_attention must be true or false, got {self.proportional_attention!r}")

    def uses_proportional_attention(self) -> bool:
        return self.proportional_attention

    def merge_schedule(self, num_patches: int, budget: int, layers: int, protected: int = 1) -> list[int]:
        if self.schedule == "exact":
            schedule = exact_schedule(num_patches, budget, layers)
        else:
            schedule = [self.r] * layers
        tokens = num_patches + protected  # a CLS token stays in front (A position 0) and never merges
        for layer, merges in enumerate(schedule, start=1):
            merges = min(merges, (tokens + 1) // 2 - protected)  # r' = min(r, mergeable A tokens)
            schedule[layer - 1] = merges
            tokens -= merges
        left = tokens - protected
        if left != budget:
            raise ValueError(
                f"ToMe {self.schedule} schedule leaves {left} of {num_patches} patch tokens after {layers} layers, "
                f"not the budget {budget}" + (f": use budget={left} with r={self.r}" if self.schedule == "constant"
                                              else ": the budget is too small for bipartite merging")
            )
        return schedule

    def merge(self, tokens: EncoderTokens, merges: int) -> torch.Tensor:
        return tome_slots(tokens.keys, merges, tokens.protected)
