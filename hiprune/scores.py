"""Per-token scores computed from attention maps.

Adapters reduce each requested layer's attention probabilities to one score per patch token with
:func:`global_attention` and hand only those [B, N] scores to the methods, never the full maps.
"""

from __future__ import annotations

import torch


def global_attention(attn: torch.Tensor, skip_cls: bool) -> torch.Tensor:
    """The "global attention" score of one layer: how much attention each key token receives on average.

    attn: [B, H, T, T] attention probabilities (queries on dim 2, keys on dim 3).
    Returns [B, N] float32: mean over heads, then mean over queries (every query row, the CLS query included),
    then, when ``skip_cls``, the CLS key column (index 0) is dropped, so N = T - 1; otherwise N = T.

    The mean is accumulated in float32 whatever the input dtype, so half-precision maps give the same ranking
    as float32 ones up to input rounding.
    """
    if attn.dim() != 4:
        raise ValueError(f"attention must be [B, H, T, T], got a {attn.dim()}-D tensor of shape {tuple(attn.shape)}")
    batch, heads, queries, keys = attn.shape
    if queries != keys:
        raise ValueError(f"attention must be square in its last two dims (self-attention), got {tuple(attn.shape)}")
    if heads < 1 or keys < 1:
        raise ValueError(f"attention has no heads or no tokens: shape {tuple(attn.shape)}")
    if skip_cls and keys < 2:
        raise ValueError(f"skip_cls needs a CLS token plus at least one patch token, got T={keys}")
    per_key = attn.mean(dim=1, dtype=torch.float32).mean(dim=1)  # heads, then queries -> [B, T]
    return per_key[:, 1:] if skip_cls else per_key


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: True iff every value is finite. Nothing is read back (no host
    synchronisation); x * 0 is 0 for a finite x and NaN for NaN or inf, so a sum of them is 0 iff all are finite."""
    total = None
    for t in tensors:
        zero = t.mul(0).sum(dtype=torch.float32)
        total = zero if total is None else total.add_(zero)
    return total.eq(0)


def check_finite(scores: torch.Tensor, what: str) -> torch.Tensor:
    """Raise a ValueError naming ``what`` if ``scores`` holds NaN or inf; return ``scores`` unchanged otherwise.

    A NaN score would silently decide which tokens survive (sorting puts NaN first), so callers fail loudly.
    """
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{what} contains {bad} non-finite value(s) (NaN or inf) out of {scores.numel()}; "
            "check the attention maps / dtype of the layer it came from"
        )
    return scores
