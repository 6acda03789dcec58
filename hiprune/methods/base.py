"""The interface every token-reduction method implements.

A method sees tensors only: the visual tokens of one grid per batch row, what it requested from the encoder
(:class:`Request`: attention scores, keys or hidden states of named layers) and, for prompt-aware methods, a prompt
embedding. It returns which tokens to pass on. It knows nothing about any model: the pipeline in
``hiprune.adapters.base`` fulfils the requests, turns a model's internals into a :class:`VisionTokens` per grid and
puts the result back, through one adapter per model family.

Stages (``Method.stage``, declared by the class):
- "none": the unmodified model.
- "vision": select or merge tokens of each grid after the vision encoder, before the LLM (:meth:`Method.select`).
- "encoder": merge tokens between the vision encoder's layers (:meth:`Method.merge_schedule`, :meth:`Method.merge`).
- "llm": drop visual tokens at one or more decoder layers (:meth:`Method.drop_schedule`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from numbers import Integral
from typing import ClassVar, Literal

import torch

from hiprune.scores import check_finite

Stage = Literal["none", "vision", "encoder", "llm"]
RequestKind = Literal["attention", "keys", "hidden"]
Queries = Literal["all", "cls", "last"]

# Names a method may use in ``score_layers`` for layers whose index depends on the model.
FEATURE_LAYER = "feature"  # the encoder layer whose output feeds the LLM (LLaVA: vision_feature_layer)


@dataclass(frozen=True)
class Request:
    """Something a method needs from one vision-encoder layer, fulfilled by the pipeline for every grid.

    kind: "attention" -- a score per token: the attention it receives, mean over heads, then over the ``queries``
            rows ("all": global attention; "cls": the CLS token's row; only encoders with a CLS token have one);
          "keys" -- the layer's attention keys, mean over heads ([N, head_dim] per grid);
          "hidden" -- the layer's output hidden states ([N, hidden] per grid).
    layer: 1-based encoder layer, or FEATURE_LAYER (the layer whose output feeds the LLM).
    Grid tensors never include a CLS token. On encoders that merge patches before the LLM (Qwen2.5-VL's 2x2
    merger) every value is the mean over the patches of one merged token.
    """

    kind: RequestKind
    layer: int | str
    queries: Queries = "all"


@dataclass
class VisionTokens:
    """Visual tokens of B grids (images or crops) of identical shape, as a method sees them.

    features: [B, N, D] tokens that would be passed on (LLaVA: projected features of the feature layer).
    grid: (rows, cols) with rows * cols == N, raster order.
    scores: name -> [B, N] attention scores the method requested (``Request(kind="attention")``), CLS removed.
    states: name -> [B, N, d] keys or hidden states the method requested (``Request(kind="keys" | "hidden")``).
    prompt_embeds: [B, E] prompt embedding for prompt-aware methods, else None.
    token_embeds: [B, N, E] visual tokens in the prompt embedding's space, for prompt-aware methods, else None.
    sample_ids: one id per row (used to seed random methods per sample, so results do not depend on batching).
    project: maps the feature layer's hidden states [B, K, d] (``Request("hidden", FEATURE_LAYER)``) into the space of
        ``features`` [B, K, D] (LLaVA: the multi-modal projector), for methods that merge pre-projector states; None
        where ``features`` are not a projection of them (Qwen2.5-VL's merged tokens).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_embeds: torch.Tensor | None = None
    token_embeds: torch.Tensor | None = None
    sample_ids: list[int] | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

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

    indices: [B, K] for every token passed on, the grid token it stands at: the kept token itself, or for a merged
        token its representative (e.g. the merge target). Sorted unless the method defines another order. Families
        derive positions from it (M-RoPE, LLaVA-NeXT's stitched grid), so merged tokens get one in every family.
    features: [B, K, D] tokens passed on; features[indices] for a pure selection, changed by merging methods.
    roles: optional name -> [B, K] bool masks telling why a token was kept (e.g. anchor / buffer / register),
        used by visualisation and tests.
    sources: optional [B, N] long: for every grid token, the slot (0..K-1) of the token it went into, -1 if it was
        dropped. None for a pure selection (then token indices[b, k] alone went into slot k): see :meth:`merge_map`.
    """

    indices: torch.Tensor
    features: torch.Tensor
    roles: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: torch.Tensor | None = None

    def merge_map(self, num_tokens: int) -> torch.Tensor:
        """[B, N] slot of every grid token in the output (-1: dropped); derived from ``indices`` when not merged."""
        if self.sources is not None:
            return self.sources
        slots = torch.full((self.indices.shape[0], num_tokens), -1, dtype=torch.long, device=self.indices.device)
        order = torch.arange(self.indices.shape[1], device=self.indices.device).expand_as(self.indices)
        return slots.scatter_(1, self.indices, order)


@dataclass
class EncoderTokens:
    """The tokens of one vision-encoder layer between its attention and its MLP, as an ``encoder``-stage method sees
    them (every row of the batch is one grid: an image, a crop or a frame; all rows have the same length).

    hidden: [B, T, D] the layer's hidden states after the attention residual.
    keys: [B, T, d] the layer's attention keys, mean over heads.
    sizes: [B, T] how many original patches each token stands for (1 before any merge).
    protected: leading tokens that must pass unmerged and stay in front (1 for a CLS token, else 0).
    layer: 1-based encoder layer.
    """

    hidden: torch.Tensor
    keys: torch.Tensor
    sizes: torch.Tensor
    protected: int
    layer: int


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] -> indices of every row's scores from highest to lowest; equal scores by index (a stable sort of the
    negated scores), so selections are deterministic, unlike ``torch.topk`` whose tie order is unspecified."""
    return torch.sort(-scores, dim=1, stable=True).indices


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, best first; ties go to the lower index."""
    return rank_descending(scores)[:, :k]


def top_k_sorted(scores: torch.Tensor, keep: int, what: str, count_name: str = "budget") -> torch.Tensor:
    """Kept indices [B, keep] (int64, sorted ascending) of the ``keep`` highest of each row of ``scores`` [B, N],
    compared in float32, ties to the lower index. ``what`` names the scores in errors; a malformed input, a
    non-finite score or a count outside [1, N] is a ValueError."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else None
        raise ValueError(f"{what} must be a [B, N] tensor, got shape {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {scores.dtype}")
    n = scores.shape[1]
    if isinstance(keep, bool) or not isinstance(keep, Integral) or not 1 <= keep <= n:
        raise ValueError(f"{count_name} must be an int in [1, {n}] (visual tokens of this image), got {keep!r}")
    return top_k(check_finite(scores.float(), what), int(keep)).sort(dim=1).values


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
    # Prompt-aware methods: which tower layer token_embeds come from on CLIP towers (None: the last layer, HiPrune++;
    # FEATURE_LAYER: the layer that feeds the LLM, TRIM), the prompt pooling they need from the prompt encoder (None:
    # the encoder's own), and whether only a CLIP text tower paired with the vision tower will do (refused elsewhere).
    # HiPrune++ reads the first two from its options (patch_layer, text_pooling).
    prompt_patch_layer: ClassVar[str | None] = None
    prompt_pooling: ClassVar[str | None] = None
    needs_clip_text: ClassVar[bool] = False
    # Vision-stage methods that pass every grid's CLS token on (VisionZip) set this: the family puts the grid's CLS
    # token (its feature-layer state, projected like the patches) in front of the kept_count(budget) tokens that
    # ``select`` returns. Families without a CLS token, or without that layout, refuse such a method before loading.
    keeps_cls: ClassVar[bool] = False
    # Vision-stage methods that resolve a ratio budget into each grid's count by their own rule set this (VisionZip's
    # global-attention port: d + C of the grid's n tokens, :meth:`resolve_grid_budget`); only families that ask the
    # method (``Adapter.asks_grid_budget``: Qwen2.5-VL) run it, the others refuse it before loading.
    own_grid_budgets: ClassVar[bool] = False

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

    def requests(self) -> dict[str, Request]:
        """What this method needs from the vision encoder: name -> :class:`Request`.

        The pipeline captures exactly these, and nothing else (every other layer keeps its fast attention kernel),
        and passes them in ``VisionTokens.scores`` (attention) / ``VisionTokens.states`` (keys, hidden) under the
        same names.
        """
        return {}

    def score_layers(self) -> dict[str, int | str]:
        """The attention requests' layers: name -> encoder layer (what FLOPs counting needs to know)."""
        return {name: r.layer for name, r in self.requests().items() if r.kind == "attention"}

    def selection_flops(self, num_tokens: int, budget: int, widths: dict[str, int]) -> int:
        """Vision-stage methods: the FLOPs of one grid's selection arithmetic beyond the captures (matrix products,
        2 per multiply-add, as torch's FlopCounterMode counts them), for FLOPs accounting. ``widths``: "features"
        (width of the tokens passed on), "hidden" (the feature layer's hidden states), "keys" (a head's key width).
        Tokens a method sends through ``VisionTokens.project`` cost the family's projector on top (not counted here).
        Default: 0 (selection by sorting scores)."""
        return 0

    def projected_tokens(self, budget: int) -> int:
        """Vision-stage methods: tokens per grid that go through the family's projector on top of the grid's own
        (merged pre-projector states, a CLS token passed on), for FLOPs accounting. Default: 0."""
        return 0

    def kept_count(self, budget: int) -> int:
        """Tokens per grid the LLM receives for a resolved budget (methods that add tokens on top override it)."""
        return budget

    def resolve_grid_budget(self, num_tokens: int) -> int:
        """Methods with ``own_grid_budgets``: the resolved budget of a grid of ``num_tokens`` tokens (what
        :meth:`select` gets as ``budget``). Other methods leave the family's rule in place."""
        raise NotImplementedError(f"method {self.name!r} leaves resolving its budget to the family")

    def trailing_count(self, budget: int) -> int:
        """Vision-stage merging methods: how many of the last tokens ``select`` returns per grid (for a resolved
        ``budget``) stand for merged groups rather than for a grid position; a family whose official layout for the
        method puts them after every grid's positioned tokens reads it (VisionZip's contextual tokens on LLaVA-NeXT).
        Default 0."""
        return 0

    def decides_split(self) -> bool:
        """Whether this method splits an image's budget over its grids itself (:meth:`split_visual`); a method
        whose split is an option overrides this to say whether the option is on."""
        return type(self).split_visual is not Method.split_visual

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        """Choose ``kept_count(budget)`` tokens of each grid. Vision-side methods override this."""
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) does not select vision tokens")

    def split_visual(
        self, grids: list[VisionTokens], budget: int, tiles: list[tuple[int, int] | None]
    ) -> list[int] | None:
        """Vision-stage methods that split one image's budget over its grids themselves (HiRED over LLaVA-NeXT
        crops). The pipeline calls it once per image with more than one grid, before any ``select``: ``grids`` are
        that image's grids in the family's order, one row each, with their requests filled; ``budget`` is the
        image's budget (the sum of what the family's own rule gives its grids, so the processor's placeholder count
        stays right); ``tiles`` the (row, col) of every grid in the image's tiling, None for a grid that covers the
        whole visual (LLaVA-NeXT: the base image first, None, then the sub-crops (i, j) in raster order; video
        frames: all None). Returns one budget per grid summing to ``budget`` (0 allowed: the grid passes nothing
        on), or None to keep the family's split. The default keeps it."""
        return None

    def merge_schedule(self, num_patches: int, budget: int, layers: int, protected: int = 1) -> list[int]:
        """Encoder-stage methods: merges per encoder layer 1..``layers`` (the feature layer), summing to
        ``num_patches - budget``, so that exactly ``budget`` patch tokens leave the feature layer; ``protected``
        leading tokens that never merge (1: a CLS token, 0: an encoder without one) ride along."""
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) has no encoder merge schedule")

    def uses_proportional_attention(self) -> bool:
        """Encoder-stage methods: whether every key's attention logit gets + log(size) once tokens have merged."""
        return True

    def merge(self, tokens: EncoderTokens, merges: int) -> torch.Tensor:
        """Encoder-stage methods: [B, T] the output slot of every token (T - ``merges`` slots, numbered in output
        order; tokens that share a slot merge into their size-weighted mean; protected tokens keep slots
        0..protected-1). The pipeline does the merging, sizes and merge maps."""
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) does not merge encoder tokens")

    def drop_schedule(self, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
        """LLM-side methods: where visual tokens are dropped inside the decoder and how many each image keeps.

        visual_tokens: visual tokens of one image at the LLM's input; decoder_layers: layers of the LLM. Returns the
        stages in order (see :class:`DropStage`); ``hiprune.adapters.llm_pruning`` validates and runs them.
        """
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) has no decoder drop schedule")

    def drop_positions(self) -> DropPositions:
        """LLM-side methods: the RoPE positions of the tokens after a drop stage: "original" (each keeps its position
        in the unpruned sequence, FastV) or "compact" (renumbered without gaps after every stage, and later decode
        steps shifted by the tokens dropped before them, PyramidDrop)."""
        return "original"

    def text_raters(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """LLM-side methods with "raters" stages: image_embeds [N, D] (one image) and text_embeds [M, D] (the tokens
        after it) at the LLM's input -> [M] bool, the text tokens whose attention ranks the image tokens."""
        raise NotImplementedError(f"method {self.name!r} has no text raters")

    def recycle_tokens(self, hidden: torch.Tensor, scores: torch.Tensor, stage: int) -> torch.Tensor:
        """LLM-side methods with stages that add tokens: the dropped tokens of one image at stage ``stage`` (0-based),
        hidden [n, D] (the outputs of the layer before the stage) and scores [n] -> [added, D] new tokens."""
        raise NotImplementedError(f"method {self.name!r} does not recycle dropped tokens")

    def recycle_candidates(self, pruned: int) -> int:
        """LLM-side methods that recycle: how many of ``pruned`` dropped tokens :meth:`recycle_tokens` compares
        pairwise (its pairwise distances, FLOPs accounting); 0: none."""
        return 0

    def select_from_attention(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """LLM-side methods, once per stage of :meth:`drop_schedule`: scores [B, N] (the attention the last prompt
        token pays each of one image's N current visual tokens, heads averaged) -> [B, keep] kept indices into
        those N tokens."""
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) does not select from attention")

    def describe(self) -> dict:
        """Flat dict of the method's settings, recorded with every result."""
        return {"name": self.name, **asdict(self)}


# name -> method class; filled by @register_method as hiprune.methods imports every module of its package.
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method buildable by its ``name`` (``hiprune.build_method``, Hydra ``method=``)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two methods are registered as {cls.name!r}: {METHODS[cls.name]} and {cls}")
    METHODS[cls.name] = cls
    return cls


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


ScoreSource = Literal["previous", "own", "raters"]
SCORE_SOURCES: tuple[str, ...] = ("previous", "own", "raters")
DropPositions = Literal["original", "compact"]
DROP_POSITIONS: tuple[str, ...] = ("original", "compact")


@dataclass(frozen=True)
class DropStage:
    """One stage of an LLM-side method's drop schedule (:meth:`Method.drop_schedule`).

    layer: 0-based index of the first decoder layer that runs on the shortened sequence.
    keep: visual tokens per image kept from that layer on (until the next stage drops more).
    score: which attention ranks the visual tokens (the last prompt token's row, heads averaged):
        "previous" -- the one layer ``layer - 1`` computed (FastV's K);
        "own" -- layer ``layer``'s own: its input norm, query / key projections and RoPE applied to its (not yet
        shortened) input hidden states, causal softmax over all keys (PyramidDrop);
        "raters" -- layer ``layer - 1``'s attention from the method's text raters (:meth:`Method.text_raters`, chosen
        once on the LLM's input embeddings), mean over the raters (SparseVLM).
    added: tokens per image the stage adds after the ``keep`` kept ones (:meth:`Method.recycle_tokens`: SparseVLM's
        cluster tokens of the dropped ones); they are visual tokens for the later stages.
    """

    layer: int
    keep: int
    score: ScoreSource = "previous"
    added: int = 0
