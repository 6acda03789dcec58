"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): drop visual tokens inside the LLM.

Decoder layers 0..K-1 see the full sequence. After layer K-1, every image keeps the k of its tokens that the *last*
token of the prompt attends to most in layer K-1 (attention probabilities averaged over heads); layers K..L-1 and
the KV cache they fill hold only the text tokens and the kept visual tokens, which keep their original positions
(RoPE of the unpruned layout). Decode steps never prune again.

This file is the selection only (scores -> kept indices); ``hiprune.adapters.llm_pruning`` does the plumbing.

Checked against the official code (github.com/pkunlp-icler/FastV, ``modeling_llama.py``, the "inplace" branch used
for its latency runs, and ``lmms-eval/fastv_kvcache.py``):
- K is ``fast_v_agg_layer``: pruning happens when the layer loop reaches index K (0-based), from the attention of
  layer K-1, so K layers run on the full sequence; K must be >= 1. The evaluation scripts use K = 2.
- Score: ``mean(attention, dim=heads)[-1]`` -- the last query row, averaged over heads, restricted to the image
  tokens; R = ``fast_v_attention_rank`` is an absolute count ("rank equals (1-R%) * 576" in its scripts), chosen with
  ``topk`` and re-sorted so kept tokens stay in sequence order; position ids of the kept tokens are their original
  indices.
Budget (``budget_mode``): the comparison tables' "N' tokens" for an in-LLM method is the average number of visual
tokens over all L decoder layers, counting the K layers before the drop at the full N (spec §0, §8: the convention of
SparseVLM's schedule comments and PDrop's maintainers; Table 9 has no FastV row exactly where it is infeasible).
- ``avg_layers`` (default): k = (L * N' - K * N) / (L - K), rounded half up (exact integer arithmetic), so that
  (K * N + (L - K) * k) / L is N' up to rounding. LLaVA-1.5 (N = 576, L = 32, K = 2): 192 / 128 / 64 -> 166 / 98 /
  30; LLaVA-NeXT (N = 2880): 640 -> 491, 320 -> 149, 160 infeasible (k < 1): refused with the reason before any
  model loads (the adapters resolve the schedule on the model's config).
- ``keep_after``: k = N' (the official ``fast_v_attention_rank`` read as the budget; the harness's behaviour before
  issue 16).
Choices made here, where the official code has no answer or none that can be reproduced exactly:
- The official code handles batch size 1 and one image at fixed offsets (``SYS_LENGTH``). Here every batch row and
  every image is scored on its own: R tokens are kept *per image* (the project's budget is per image).
- Probabilities come from float32 softmax over the layer's own (rotated) queries and keys; the official eager path
  averages fp16 probabilities. Ties go to the lower index (stable sort); ``topk``'s tie order is unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar, Literal

import torch

from hiprune.methods.base import DropStage, Method, Stage, register_method, resolve_budget, top_k_sorted


def select_fastv(last_query_attention: torch.Tensor, budget: int) -> torch.Tensor:
    """Kept visual-token indices [B, budget] (int64, sorted ascending, distinct per row).

    last_query_attention: [B, N] attention the last prompt token pays each of one image's N visual tokens (heads
        averaged); rows are independent. Compared in float32.
    budget: tokens kept per row, an int in [1, N].

    The ``budget`` highest scores of each row are kept; equal scores go to the lower index.
    Raises ValueError on a malformed input, a non-finite score or a budget outside [1, N].
    """
    return top_k_sorted(last_query_attention, budget, "FastV last-query attention")


BudgetMode = Literal["avg_layers", "keep_after"]
BUDGET_MODES: tuple[str, ...] = ("avg_layers", "keep_after")


def average_layers_keep(budget: int, visual_tokens: int, full_layers: int, decoder_layers: int) -> int:
    """Visual tokens to keep after the first ``full_layers`` (K) of ``decoder_layers`` (L) layers so that the average
    over all L layers is ``budget`` (N'): k = (L * N' - K * N) / (L - K) rounded half up, N = ``visual_tokens``.

    Raises ValueError (with the numbers) when k < 1: the K full layers alone already exceed the budget's average.
    """
    n, k_full, total = int(visual_tokens), int(full_layers), int(decoder_layers)
    if not 1 <= k_full < total:
        raise ValueError(f"the drop layer must lie in 1..{total - 1} for a {total}-layer LLM, got {k_full}")
    numerator, denominator = total * int(budget) - k_full * n, total - k_full
    keep = (2 * numerator + denominator) // (2 * denominator)  # round half up, exactly
    if keep < 1:
        raise ValueError(
            f"budget_mode=avg_layers: an average of {budget} visual tokens over {total} decoder layers, with layers "
            f"0..{k_full - 1} at all {n}, needs k = ({total}*{budget} - {k_full}*{n}) / {denominator} = "
            f"{numerator / denominator:.2f} tokens after layer {k_full - 1} (below 1): infeasible; use a larger budget, "
            "an earlier drop layer, or budget_mode=keep_after"
        )
    return keep


@register_method
@dataclass
class FastV(Method):
    """FastV: drop visual tokens once, from decoder layer ``layer`` (K) on.

    layer: K, the number of decoder layers that run on the full sequence (0-based index of the first pruned layer;
        the official ``fast_v_agg_layer``, default 2). The scores come from layer K-1's attention.
    budget: N', visual tokens per image (int), or a ratio of the image's tokens (float in (0, 1]).
    budget_mode: "avg_layers" (default): N' is the average over all decoder layers and k is solved from it (see
        :func:`average_layers_keep`); "keep_after": k = N' tokens are kept from layer K on.
    """

    name: ClassVar[str] = "fastv"
    stage: ClassVar[Stage] = "llm"

    layer: int = 2
    budget_mode: BudgetMode = "avg_layers"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layer, bool) or not isinstance(self.layer, Integral) or self.layer < 1:
            raise ValueError(
                f"FastV layer (K) must be an int >= 1: layers 0..K-1 run in full and layer K-1's attention ranks "
                f"the visual tokens; got {self.layer!r}"
            )
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"FastV budget_mode must be one of {BUDGET_MODES}, got {self.budget_mode!r}")

    def drop_schedule(self, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
        """One stage from layer K on: k tokens per image, from the budget resolved against ``visual_tokens``."""
        budget = resolve_budget(self.budget, visual_tokens)
        if self.budget_mode == "keep_after":
            return [DropStage(layer=self.layer, keep=budget)]
        return [
            DropStage(layer=self.layer, keep=average_layers_keep(budget, visual_tokens, self.layer, decoder_layers))
        ]

    def select_from_attention(self, last_query_attention: torch.Tensor, budget: int) -> torch.Tensor:
        """Per-image selection, see :func:`select_fastv`."""
        return select_fastv(last_query_attention, budget)
