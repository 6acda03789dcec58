"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): drop visual tokens inside the LLM.

Decoder layers 0..K-1 see the full sequence. After layer K-1, every image keeps the R of its tokens that the *last*
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
Choices made here, where the official code has no answer or none that can be reproduced exactly:
- The official code handles batch size 1 and one image at fixed offsets (``SYS_LENGTH``). Here every batch row and
  every image is scored on its own: R tokens are kept *per image* (the project's budget is per image).
- Probabilities come from float32 softmax over the layer's own (rotated) queries and keys; the official eager path
  averages fp16 probabilities. Ties go to the lower index (stable sort); ``topk``'s tie order is unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from hiprune.methods.base import DropStage, Method, Stage, register_method, resolve_budget, top_k
from hiprune.scores import check_finite


def select_fastv(last_query_attention: torch.Tensor, budget: int) -> torch.Tensor:
    """Kept visual-token indices [B, budget] (int64, sorted ascending, distinct per row).

    last_query_attention: [B, N] attention the last prompt token pays each of one image's N visual tokens (heads
        averaged); rows are independent. Compared in float32.
    budget: tokens kept per row, an int in [1, N].

    The ``budget`` highest scores of each row are kept; equal scores go to the lower index.
    Raises ValueError on a malformed input, a non-finite score or a budget outside [1, N].
    """
    if not isinstance(last_query_attention, torch.Tensor) or last_query_attention.dim() != 2:
        shape = tuple(last_query_attention.shape) if isinstance(last_query_attention, torch.Tensor) else None
        raise ValueError(f"last-query attention must be a [B, N] tensor, got shape {shape}")
    if not last_query_attention.is_floating_point():
        raise ValueError(f"last-query attention must be floating point, got {last_query_attention.dtype}")
    n = last_query_attention.shape[1]
    if isinstance(budget, bool) or not isinstance(budget, Integral) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an int in [1, {n}] (visual tokens of this image), got {budget!r}")
    scores = check_finite(last_query_attention.float(), "FastV last-query attention")
    return top_k(scores, int(budget)).sort(dim=1).values


@register_method
@dataclass
class FastV(Method):
    """FastV: keep ``budget`` visual tokens per image from decoder layer ``layer`` (K) on.

    layer: K, the number of decoder layers that run on the full sequence (0-based index of the first pruned layer;
        the official ``fast_v_agg_layer``, default 2). The scores come from layer K-1's attention.
    budget: visual tokens kept per image after layer K-1 (int), or a ratio of the image's tokens (float in (0, 1]).
    """

    name: ClassVar[str] = "fastv"
    stage: ClassVar[Stage] = "llm"

    layer: int = 2

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layer, bool) or not isinstance(self.layer, Integral) or self.layer < 1:
            raise ValueError(
                f"FastV layer (K) must be an int >= 1: layers 0..K-1 run in full and layer K-1's attention ranks "
                f"the visual tokens; got {self.layer!r}"
            )

    def drop_schedule(self, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
        """One stage: ``budget`` tokens per image (resolved against ``visual_tokens``) from layer K on."""
        return [DropStage(layer=self.layer, keep=resolve_budget(self.budget, visual_tokens))]

    def select_from_attention(self, last_query_attention: torch.Tensor, budget: int) -> torch.Tensor:
        """Per-image selection, see :func:`select_fastv`."""
        return select_fastv(last_query_attention, budget)
