"""Random pruning baseline: keep a uniformly random subset of each grid's tokens."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from hiprune.methods.base import Method, Selection, Stage, VisionTokens, gather_tokens, register_method


def row_seed(seed: int, sample_id: object) -> int:
    """A 63-bit generator seed derived from (method seed, sample id).

    Hashing the pair (rather than e.g. adding them) keeps distinct pairs from sharing a stream, and is stable
    across processes, unlike Python's salted ``hash`` of strings.
    """
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@register_method
@dataclass
class RandomPrune(Method):
    """Keep ``budget`` tokens per grid, drawn uniformly without replacement, returned in raster order.

    Each row draws from its own CPU generator seeded from (seed, sample id) (the row index when the adapter gives
    no sample ids), so a sample keeps the same tokens whatever batch it is in and on whatever device.
    """

    name: ClassVar[str] = "random"
    stage: ClassVar[Stage] = "vision"

    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise ValueError(f"random seed must be an int, got {self.seed!r}")

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        n = tokens.num_tokens
        if isinstance(budget, bool) or not isinstance(budget, Integral) or not 1 <= budget <= n:
            raise ValueError(f"budget must be an int in [1, {n}] (tokens of this grid), got {budget!r}")
        ids = tokens.sample_ids if tokens.sample_ids is not None else list(range(tokens.batch_size))
        if len(ids) != tokens.batch_size:
            raise ValueError(f"got {len(ids)} sample ids for a batch of {tokens.batch_size} rows")
        picks = []
        for sample_id in ids:
            generator = torch.Generator(device="cpu").manual_seed(row_seed(self.seed, sample_id))
            picks.append(torch.randperm(n, generator=generator)[:budget].sort().values)
        indices = torch.stack(picks).to(tokens.features.device)
        return Selection(indices, gather_tokens(tokens.features, indices))
