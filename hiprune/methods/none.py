"""No pruning: the unmodified model, the reference every relative score is computed against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiprune.methods.base import Method, Selection, Stage, VisionTokens, register_method


@register_method
@dataclass
class NoPrune(Method):
    """Keep every visual token. Adapters may skip calling :meth:`select` altogether for this method."""

    name: ClassVar[str] = "none"
    stage: ClassVar[Stage] = "none"

    def validate(self) -> None:
        # A budget would suggest pruning happens; reject it rather than ignore it.
        if self.budget is not None:
            raise ValueError(f"method 'none' keeps all tokens and takes no budget, got {self.budget!r}")
        super().validate()

    def select(self, tokens: VisionTokens, budget: int | None = None) -> Selection:
        """All tokens, unchanged. ``budget`` may be None or the grid's token count; anything else is an error."""
        n = tokens.num_tokens
        if budget is not None and budget != n:
            raise ValueError(f"method 'none' keeps all {n} tokens; it cannot honour a budget of {budget}")
        indices = torch.arange(n, device=tokens.features.device).expand(tokens.batch_size, n).clone()
        return Selection(indices, tokens.features)
