"""The interface every token-reduction method implements.

A method sees tensors only: the visual tokens of one grid per batch row, the attention scores it asked for, and
(for prompt-aware methods) a prompt embedding. It returns which tokens to keep. It knows nothing about any model:
adapters (``hiprune.adapters``) turn a model's internals into a :class:`VisionTokens` and put the result back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

Stage = Literal["none", "vision", "llm"]

# Names a method may use in ``score_layers`` for layers whose index depends on the model.
FEATURE_LAYER = "feature"  # the encoder layer whose output feeds the LLM (LLaVA: vision_feature_layer)


@dataclass
class VisionTokens:
    """Visual tokens of B grids (images or crops) of identical shape, as a method sees them.

    features: [B, N, D] tokens that would be passed on (LLaVA: projected features of the feature layer).
    grid: (rows, cols) with rows * cols == N, raster order.
    scores: name -> [B, N] per-token scores the method requested through ``score_layers`` (CLS column removed).
    prompt_embeds: [B, E] prompt embedding for prompt-aware methods, else None.
    token_embeds: [B, N, E] visual tokens in the prompt embedding's space, for prompt-aware methods, else None.
    sample_ids: one id per row (used to seed random methods per sample, so results do not depend on batching).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_embeds: torch.Tensor | None = None
    token_embeds: torch.Tensor | None = None
    sample_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(f"features must be [B, N, D], got shape {tuple(self.features.shape)}")
        rows, cols = self.grid
        if rows * cols != self.features.shape[1]:
            raise ValueError(f"grid {self.grid} does not match {self.features.shape[1]} tokens")

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


@dataclass
class Selection:
    """What a vision-side method returns for a batch of grids.

    indices: [B, K] sorted kept token indices into the grid (raster order preserved).
    features: [B, K, D] tokens passed on; usually features[indices], but merging methods may change them.
    roles: optional name -> [B, K] bool masks telling why a token was kept (e.g. anchor / buffer / register),
        used by visualisation and tests.
    """

    indices: torch.Tensor
    features: torch.Tensor
    roles: dict[str, torch.Tensor] = field(default_factory=dict)


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] -> indices of every row's scores from highest to lowest; equal scores by index (a stable sort of the
    negated scores), so selections are deterministic, unlike ``torch.topk`` whose tie order is unspecified."""
    return torch.sort(-scores, dim=1, stable=True).indices


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, best first; ties go to the lower index."""
    return rank_descending(scores)[:, :k]


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """features [B, N, D], indices [B, K] -> [B, K, D]."""
    return torch.gather(features, 1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


@dataclass
class Method:
    """Base of all methods. Subclasses are small dataclasses, one per file, registered in ``hiprune.methods``.

    ``budget`` is the number of visual tokens kept per image (int >= 1) or, for models whose token count varies
    per image, a ratio in (0, 1]. Adapters resolve it into a count per grid before calling :meth:`select`.
    """

    name: ClassVar[str] = "base"
    stage: ClassVar[Stage] = "none"
    # Prompt-aware methods set this; adapters then fill VisionTokens.prompt_embeds / token_embeds.
    needs_prompt: ClassVar[bool] = False

    budget: int | float | None = None

    def validate(self) -> None:
        """Reject impossible settings before any model loads. Subclasses extend it."""
        b = self.budget
        if b is None:
            if self.stage != "none":
                raise ValueError(f"method {self.name!r} needs a budget")
            return
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget must be an int (tokens) or a float ratio in (0, 1], got {b!r}")
        if isinstance(b, float) and not 0.0 < b <= 1.0:
            raise ValueError(f"a float budget is a ratio of the available tokens and must lie in (0, 1], got {b}")
        if isinstance(b, int) and b < 1:
            raise ValueError(f"budget must be >= 1 token, got {b}")

    def score_layers(self) -> dict[str, int | str]:
        """Attention scores this method needs: name -> encoder layer (1-based int, or FEATURE_LAYER).

        The adapter computes the "global attention" score (mean over heads and queries, CLS key dropped) of
        exactly these layers, and no others, and passes them in ``VisionTokens.scores`` under the same names.
        """
        return {}

    def kept_count(self, budget: int) -> int:
        """Tokens per grid the LLM receives for a resolved budget (methods that add tokens on top override it)."""
        return budget

    def score_queries(self) -> str:
        """Which attention queries the requested scores average: "all" (global attention, the default) or "cls"
        (the CLS token's row; only encoders with a CLS token can provide it)."""
        return "all"

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        """Choose ``kept_count(budget)`` tokens of each grid. Vision-side methods override this."""
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) does not select vision tokens")

    def drop_schedule(self, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
        """LLM-side methods: where visual tokens are dropped inside the decoder and how many each image keeps.

        visual_tokens: visual tokens of one image at the LLM's input; decoder_layers: layers of the LLM. Returns the
        stages in order (see :class:`DropStage`); ``hiprune.adapters.llm_pruning`` validates and runs them.
        """
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) has no decoder drop schedule")

    def select_from_attention(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """LLM-side methods, once per stage of :meth:`drop_schedule`: scores [B, N] (the attention the last prompt
        token pays each of one image's N current visual tokens, heads averaged) -> [B, keep] kept indices into
        those N tokens."""
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) does not select from attention")

    def describe(self) -> dict:
        """Flat dict of the method's settings, recorded with every result."""
        from dataclasses import asdict

        return {"name": self.name, **asdict(self)}


def resolve_budget(budget: int | float, num_tokens: int) -> int:
    """Turn a budget (int count, or float ratio in (0, 1]) into a token count for a grid of ``num_tokens``.

    Ratios round half to even (Python ``round``), as the official Qwen2.5-VL code does: N' = round(n * ratio).
    """
    if isinstance(budget, float):
        count = max(1, round(num_tokens * budget))
    else:
        count = int(budget)
    if count > num_tokens:
        raise ValueError(f"budget {budget} asks for {count} tokens but the image has only {num_tokens}")
    if count < 1:
        raise ValueError(f"budget {budget} keeps no token of {num_tokens}")
    return count


@dataclass(frozen=True)
class DropStage:
    """One stage of an LLM-side method's drop schedule (:meth:`Method.drop_schedule`).

    layer: 0-based index of the first decoder layer that runs on the shortened sequence; the visual tokens are
        ranked by layer ``layer - 1``'s last-query attention (as FastV's K).
    keep: visual tokens per image kept from that layer on (until the next stage drops more).
    """

    layer: int
    keep: int
