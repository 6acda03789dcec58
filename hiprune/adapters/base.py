"""The pipeline between methods and model families, written once, and the session that ``hiprune.apply`` yields.

A family adapter (one file per family) states only its geometry and layout: where the encoder's layers are, how one
forward's visual tokens split into grids (images, anyres crops, video frames, merged patch grids) and how a budget
splits over them, and how the passed-on tokens are laid out for its LLM (positions, M-RoPE, newline tokens). This
module does the rest, for every family:

    capture (the method's requests)  ->  checks of what was captured  ->  grids  ->  VisionTokens
    ->  method.select  ->  checks of what it returned  ->  records  ->  the family puts the tokens back
    ->  the processor emits the matching number of placeholder tokens

See docs/extending.md for adding a family.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from hiprune.capture import Capture, Tap
from hiprune.scores import all_finite
from hiprune.methods.base import FEATURE_LAYER, EncoderTokens, Method, Selection, VisionTokens, resolve_budget


class PruningError(RuntimeError):
    """A pruning step produced something unusable (wrong count, NaN scores, ...). Never caught by the harness."""


@dataclass
class GridRecord:
    """One grid (image or crop) that went through a method in one forward pass."""

    tokens_in: int
    tokens_kept: int  # tokens the LLM receives from the grid (with a CLS token put in front for keeps_cls methods)
    indices: torch.Tensor | None  # kept (or representative) indices (CPU, long), None when nothing was pruned
    sources: torch.Tensor | None = None  # merging methods: [tokens_in] output slot of every token (-1: dropped)


class ForwardRecord(list):
    """The GridRecords of one vision forward, in grid order; ``kind`` says which visuals ("image" or "video")."""

    def __init__(self, kind: str, records=()):
        super().__init__(records)
        self.kind = kind


@dataclass
class GridInput:
    """One grid of one vision forward as its family cut it out: what the pipeline hands to the method.

    shape: (rows, cols) of the grid, raster order. features: [rows * cols, D] tokens that would be passed on.
    captured: request name -> [rows * cols] attention scores or [rows * cols, d] keys / hidden states.
    budget: the method's budget for this grid; keep: tokens the LLM receives from it (``method.kept_count``).
    sample_id: seeds random methods (stable per image / crop / frame, independent of batching).
    visual: which image or video of the forward the grid belongs to (its prompt, for prompt-aware methods).
    token_embeds: [rows * cols, E] the grid's tokens in the prompt embedding's space (prompt-aware methods only).
    tile: (row, col) of the grid in its image's tiling (LLaVA-NeXT sub-crops), None for a grid covering the whole
        visual (an image, the base image, a frame); see ``Method.split_visual``.
    """

    shape: tuple[int, int]
    features: torch.Tensor
    captured: dict[str, torch.Tensor]
    budget: int
    keep: int
    sample_id: int
    visual: int = 0
    token_embeds: torch.Tensor | None = None
    tile: tuple[int, int] | None = None


@dataclass
class GridOutput:
    """What the method passed on from one grid: ``indices`` [keep] grid indices (kept tokens, or a merged
    token's representative), ``features`` [keep, D], ``sources`` [N] output slot per grid token or None."""

    indices: torch.Tensor
    features: torch.Tensor
    sources: torch.Tensor | None = None


@dataclass
class LayerRecord:
    """One LLM prefill under an LLM-side method: what each decoder layer processed, the same for every row.

    tokens: sequence positions per row that each decoder layer ran on (text, padding and visual tokens).
    visual: visual tokens per row among them, at each decoder layer (``eval.flops.flops_exact`` takes this list).
    indices: [rows * images per row, kept] visual-token indices of each image kept by the last stage of the drop
        schedule (indices into the image's original tokens; CPU, long, sorted), in batch order, or None when the
        forward pruned nothing.
    stages: every stage of the schedule that ran, in order: (first decoder layer on the shortened sequence, kept
        indices [rows * images per row, kept], as ``indices``); the last one's indices are ``indices``.
    visual_in: visual tokens of one image at the LLM's input (a visual: an image, LLaVA-NeXT's image of all its crops,
        a video); images: images per row (0: not recorded).
    scoring: per batch row, the scoring arithmetic the plumbing ran for it, in order, as (kind, queries, keys):
        "last" / "own" (the last token's attention row over ``keys`` tokens: captured in the layer before, or
        recomputed in the stage's layer with its q / k projections), "raters" (``queries`` rater rows, recomputed),
        "rater_choice" (``queries`` text x ``keys`` image embeddings), "recycle" (pairwise distances of ``queries``
        candidates); ``eval.efficiency.flops.llm_scoring_flops`` counts them.
    """

    tokens: list[int]
    visual: list[int]
    indices: torch.Tensor | None
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    visual_in: int = 0
    images: int = 0
    scoring: list[list[tuple[str, int, int]]] = field(default_factory=list)


@dataclass
class PruningSession:
    """Handle yielded by ``hiprune.apply``: what was installed and what it did.

    records: one ForwardRecord per vision forward pass (a ``generate`` call makes one), one GridRecord per grid.
    layer_records: one LayerRecord per LLM prefill that an LLM-side method pruned (empty for other methods).
    last_selection: what the method returned in the last vision forward, one row per grid in record order (the
        grids of all its ``select`` calls together); None when those grids kept different counts (images of
        different sizes on Qwen2.5-VL, LLaVA-NeXT's native layout): ``records`` has every grid then.
    """

    method: Method
    adapter: Adapter
    prompt_encoder: Any = None
    records: list[list[GridRecord]] = field(default_factory=list)
    layer_records: list[LayerRecord] = field(default_factory=list)
    last_selection: Selection | None = None
    _prompts: list[str] | None = None

    def set_prompts(self, prompts_per_image: list[str]) -> None:
        """Prompt of every image of the next forward pass, in image order (prompt-aware methods need them)."""
        self._prompts = list(prompts_per_image)

    def take_prompts(self, n_images: int) -> list[str]:
        """The prompts set for this forward pass (consumed, so a stale prompt is never reused)."""
        prompts, self._prompts = self._prompts, None
        if prompts is None:
            raise PruningError(
                f"method {self.method.name!r} is prompt-aware: call session.set_prompts([...]) before each generate"
            )
        if len(prompts) != n_images:
            raise PruningError(f"{len(prompts)} prompts were set for a forward pass over {n_images} images")
        return prompts

    def tokens_per_image(self) -> int:
        """Visual tokens the LLM receives per image under this method (what the processor must emit)."""
        return self.adapter.tokens_per_image(self.method)

    def pop_records(self) -> list[list[GridRecord]]:
        out, self.records = self.records, []
        return out

    def pop_layer_records(self) -> list[LayerRecord]:
        out, self.layer_records = self.layer_records, []
        return out


def patch_attribute(stack: ExitStack, obj: Any, name: str, value: Any) -> None:
    """Set ``obj.name = value`` as an instance attribute; the stack restores the exact previous state."""
    had_own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)

    def restore() -> None:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    stack.callback(restore)


def stable_ids(pixel_values: torch.Tensor) -> list[int]:
    """One 63-bit id per image from its pixel bytes: seeds random methods independently of batch composition."""
    ids = []
    for row in pixel_values.detach().to("cpu", torch.float32).contiguous():
        digest = hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest()
        ids.append(int.from_bytes(digest, "little") >> 1)
    return ids


def derived_id(base: int, index: int | str) -> int:
    """A 63-bit id for part ``index`` (a crop, a frame) of the visual whose :func:`stable_ids` id is ``base``."""
    digest = hashlib.blake2b(f"{base}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def select_checked(method: Method, tokens: VisionTokens, budget: int, keep: int, unit: str) -> Selection:
    """``method.select`` on ``tokens``, failing loudly unless it returns ``keep`` indices and features per row."""
    selection = method.select(tokens, budget)
    rows = tokens.features.shape[0]
    if selection.indices.shape != (rows, keep) or selection.features.shape[:2] != (rows, keep):
        raise PruningError(
            f"method {method.name!r} returned {tuple(selection.indices.shape)} indices and features "
            f"{tuple(selection.features.shape)}; expected {keep} tokens for each of {rows} {unit}"
        )
    return selection


def spread_budget(budget: int, capacities: Sequence[int]) -> list[int]:
    """Split ``budget`` tokens over grids of the given sizes as equally as they allow (water-filling).

    Every round gives each open grid int(remaining / open grids); a grid that cannot take its share keeps all its
    tokens and leaves the rest to the others. What int() rounds off is not handed out (as the official
    int(N' / crops)). Raises when a grid would keep nothing.
    """
    keep = [0] * len(capacities)
    open_grids = [i for i, c in enumerate(capacities) if c > 0]
    remaining = budget
    first = True
    while open_grids:
        share = remaining // len(open_grids)
        if share == 0:
            if first:
                raise ValueError(
                    f"budget {budget} cannot give every one of the image's {len(open_grids)} grids a token"
                )
            break
        first = False
        small = [i for i in open_grids if capacities[i] <= share]
        if not small:
            for i in open_grids:
                keep[i] = share
            break
        for i in small:
            keep[i] = capacities[i]
            remaining -= capacities[i]
        open_grids = [i for i in open_grids if i not in small]
    return keep


SPLITS = ("equal", "fill")


def split_budget(
    budget: int | float, capacities: Sequence[int], unit: str = "grid", rule: str = "equal", why: str = ""
) -> list[int]:
    """The budget of one visual (image or video) per grid, for grids of ``capacities`` tokens -- the one rule every
    family uses.

    A float budget is a ratio of each grid (round(n * ratio), :func:`resolve_budget`). An int budget N' over one
    grid is N'; over g grids, ``rule`` "equal" gives every grid int(N' / g) (the official LLaVA-NeXT crops and
    Video-LLaVA frames; ``why`` explains it in errors), "fill" spreads it by water-filling (:func:`spread_budget`).
    """
    if rule not in SPLITS:
        raise ValueError(f"unknown budget split {rule!r}; expected one of {SPLITS}")
    if isinstance(budget, float):
        return [resolve_budget(budget, c) for c in capacities]
    if len(capacities) == 1:
        return [resolve_budget(budget, capacities[0])]
    if rule == "fill":
        return spread_budget(int(budget), capacities)
    parts = len(capacities)
    share = int(budget) // parts
    note = f" ({why})" if why else ""
    if share < 1:
        raise ValueError(
            f"budget {budget} gives int({budget} / {parts} {unit}s) = 0 tokens per {unit}{note}; "
            f"use a budget of at least {parts}"
        )
    if share > min(capacities):
        raise ValueError(
            f"budget {budget} asks for int({budget} / {parts} {unit}s) = {share} tokens per {unit} but a {unit} "
            f"has only {min(capacities)}"
        )
    return [share] * parts


def check_captured(captured: dict[str, torch.Tensor], expected: tuple[int, ...], unit: str = "") -> None:
    """Captured tensors must have the leading shape ``expected`` and be finite (else PruningError)."""
    check_captured_shapes(captured, expected, unit)
    check_captured_finite(captured)


def check_captured_shapes(captured: dict[str, torch.Tensor], expected: tuple[int, ...], unit: str = "") -> None:
    for name, value in captured.items():
        if tuple(value.shape[: len(expected)]) != expected:
            raise PruningError(
                f"{unit + ' ' if unit else ''}capture {name!r} has shape {tuple(value.shape)}, expected {expected}"
            )


def check_captured_finite(captured: dict[str, torch.Tensor]) -> None:
    for name, value in captured.items():
        if not torch.isfinite(value).all():
            raise PruningError(f"attention score {name!r} contains NaN or inf")


class Adapter:
    """Plumbing for one model family: its geometry and layout. Subclasses set ``model_types`` and implement
    ``install_model`` (wrap the model's encoder call so that it cuts grids, runs :meth:`select_grids` and puts the
    result back) and ``placeholder_counts`` (what the processor emits).
    """

    family: ClassVar[str] = ""
    # Where this family's plumbing lets a method act: "vision" (before the LLM), "encoder" (between vision-encoder
    # layers), "llm" (inside the decoder).
    stages: ClassVar[tuple[str, ...]] = ("none", "vision")
    model_types: ClassVar[tuple[type, ...]] = ()
    # CLIP-tower families compare prompts through an external text tower; others use their own LLM embeddings.
    needs_prompt_encoder: ClassVar[bool] = True
    # Whether the encoder has a CLS token (Request queries="cls" needs one).
    has_cls: ClassVar[bool] = True
    # Why a stage this family does not support cannot run here (said before anything loads), where it is by design.
    stage_limits: ClassVar[dict[str, str]] = {}
    # Whether the family lays out a grid's CLS token in front of its kept tokens (methods with ``keeps_cls``).
    passes_cls: ClassVar[bool] = False
    # Whether the family asks methods with ``own_grid_budgets`` for each grid's budget (Method.resolve_grid_budget).
    asks_grid_budget: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_types)

    # --- encoder description -------------------------------------------------------------------------------
    def num_encoder_layers(self) -> int:
        raise NotImplementedError

    def feature_layer(self) -> int:
        """1-based encoder layer whose output feeds the LLM."""
        raise NotImplementedError

    def layer_module(self, layer: int, tower: str = "image") -> nn.Module:
        """1-based encoder layer ``layer`` of ``tower`` (its output: Request kind "hidden")."""
        raise NotImplementedError

    def attention_module(self, layer: int, tower: str = "image") -> nn.Module:
        """Attention module of 1-based encoder layer ``layer`` of ``tower`` (Request kinds "attention", "keys")."""
        raise NotImplementedError

    def tokens_per_image(self, method: Method) -> int:
        raise NotImplementedError

    def projector(self, tower: str = "image") -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The map from the feature layer's hidden states to the tokens the LLM receives (``VisionTokens.project``),
        or None where the grid's tokens are not such a projection."""
        return None

    def describe_encoder(self) -> dict[str, Any]:
        """How this family presents visual tokens to methods: grid, CLS, feature layer, merge (recorded per run)."""
        return {"family": self.family, "layers": self.num_encoder_layers(), "feature_layer": self.feature_layer()}

    # --- method plumbing -----------------------------------------------------------------------------------
    def resolve_layers(self, method: Method) -> dict[str, int]:
        """Method's score requests -> 1-based layers, validated against this encoder."""
        resolved = {}
        n_layers = self.num_encoder_layers()
        for name, request in method.requests().items():
            layer = request.layer
            index = self.feature_layer() if layer == FEATURE_LAYER else layer
            if not isinstance(index, int) or not 1 <= index <= n_layers:
                raise ValueError(
                    f"method {method.name!r} asks for encoder layer {layer!r} ({name}) but the "
                    f"{self.family} vision encoder has layers 1..{n_layers}"
                )
            resolved[name] = index
        return resolved

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        """Raise if this family cannot run ``method``. Called before anything is patched."""
        if method.needs_prompt and self.needs_prompt_encoder and prompt_encoder is None:
            raise ValueError(
                f"method {method.name!r} compares visual tokens with the prompt: the {self.family} adapter needs a "
                "prompt encoder, e.g. apply(model, method, processor, "
                "prompt_encoder=hiprune.ClipPromptEncoder.from_pretrained('openai/clip-vit-large-patch14-336'))"
            )
        if method.stage == "vision" and method.stage in self.stages:
            self.resolve_layers(method)
        self.check_method(method)

    @classmethod
    def check_method(cls, method: Method) -> None:
        """What can be told without a model: raise if no model of this family can run ``method`` (its stage, a CLS
        token or a paired CLIP text tower it needs, a layout it needs)."""
        if method.needs_prompt and method.needs_clip_text and not cls.needs_prompt_encoder:
            raise ValueError(
                f"method {method.name!r} compares visual tokens with the prompt through a CLIP text tower paired with "
                f"the vision tower; the {cls.family} encoder has none (use hiprune_pp, which compares prompts in the "
                "LLM's embedding space there)"
            )
        if method.stage not in cls.stages:
            raise ValueError(unsupported_stage_message(method.name, cls.family, method.stage))
        if not cls.has_cls and any(r.queries == "cls" for r in method.requests().values()):
            raise ValueError(
                f"method {method.name!r} scores by the CLS token's attention; the {cls.family} encoder has none "
                "(use a method that scores by global attention instead, e.g. hiprune, or a global-attention port: "
                "vispruner attention=global, visionzip variant=global)"
            )
        if method.keeps_cls and not (cls.has_cls and cls.passes_cls):
            raise ValueError(
                f"method {method.name!r} passes every grid's CLS token on to the LLM, which the {cls.family} adapter "
                f"{'cannot: its encoder has no CLS token' if not cls.has_cls else 'does not lay out yet'}"
            )
        if method.stage == "vision" and method.own_grid_budgets and not cls.asks_grid_budget:
            raise ValueError(
                f"method {method.name!r} ({method.describe()}) resolves each grid's budget by its own rule, which the "
                f"{cls.family} adapter does not apply (it is a port for encoders without a CLS token)"
            )

    def capture(self, method: Method, tower: str = "image") -> Capture:
        """A capture of exactly the method's requests on ``tower`` (nothing for methods outside the vision stage)."""
        taps: dict[nn.Module, list[Tap]] = {}
        if method.stage == "vision":
            layers = self.resolve_layers(method)
            for name, request in method.requests().items():
                if request.kind == "hidden":
                    module = self.layer_module(layers[name], tower)
                else:
                    module = self.attention_module(layers[name], tower)
                taps.setdefault(module, []).append(Tap(name, request.kind, request.queries))
        return Capture(taps)

    # --- the pipeline ----------------------------------------------------------------------------------------
    def embed_prompts(self, session: PruningSession, prompts: list[str]) -> torch.Tensor:
        """[n, E] one embedding per prompt (default: the session's prompt encoder)."""
        pooling = session.method.prompt_pooling
        if pooling is None:
            return session.prompt_encoder.encode_prompts(prompts)
        return session.prompt_encoder.encode_prompts(prompts, pooling=pooling)

    def select_grids(
        self, session: PruningSession, grids: list[GridInput], n_visuals: int, kind: str = "image",
        tower: str = "image",
    ) -> list[GridOutput]:
        """Run the method on every grid of one vision forward and record what it kept.

        Grids of equal shape, budget and kept count share one ``select`` call (rows are independent). Fails loudly
        on non-finite captures and on a selection of the wrong size; appends one ForwardRecord to the session.
        """
        method = session.method
        for grid in grids:
            check_captured_shapes(grid.captured, (grid.shape[0] * grid.shape[1],))
        # finiteness of every capture as one device flag, read back once below with the kept indices: nothing in
        # the selection waits for the device
        finite = all_finite(*[value for grid in grids for value in grid.captured.values()]) if any(
            grid.captured for grid in grids) else None
        prompt_embeds = self.embed_prompts(session, session.take_prompts(n_visuals)) if method.needs_prompt else None
        grids = split_visuals(method, grids)
        groups: dict[tuple[tuple[int, int], int, int], list[int]] = {}
        for k, grid in enumerate(grids):
            groups.setdefault((grid.shape, grid.budget, grid.keep), []).append(k)
        outputs: list[GridOutput | None] = [None] * len(grids)
        selections: list[Selection | None] = [None] * len(grids)
        for (shape, budget, keep), members in groups.items():
            first = grids[members[0]]
            if keep == 0:  # a grid the method's split left without tokens (Method.split_visual)
                for k in members:
                    features = grids[k].features
                    empty = Selection(torch.zeros(1, 0, dtype=torch.long, device=features.device), features[None, :0])
                    outputs[k] = GridOutput(empty.indices[0], empty.features[0])
                    selections[k] = empty
                continue
            tokens = VisionTokens(
                features=torch.stack([grids[k].features for k in members]),
                grid=shape,
                sample_ids=[grids[k].sample_id for k in members],
                project=self.projector(tower),
            )
            for name in first.captured:
                stacked = torch.stack([grids[k].captured[name] for k in members])
                (tokens.scores if stacked.dim() == 2 else tokens.states)[name] = stacked
            if prompt_embeds is not None:
                tokens.prompt_embeds = prompt_embeds[[grids[k].visual for k in members]]
                tokens.token_embeds = torch.stack([grids[k].token_embeds for k in members])
            selection = select_checked(method, tokens, budget, keep, f"{kind} grids")
            for row, k in enumerate(members):
                sources = selection.sources[row] if selection.sources is not None else None
                outputs[k] = GridOutput(selection.indices[row], selection.features[row], sources)
                selections[k] = selection_row(selection, row)
        # keeps_cls: images get their CLS token in front (counted); video frames carry theirs for every method
        front = 1 if method.keeps_cls and kind == "image" else 0
        if finite is not None and not bool(finite):
            for grid in grids:
                check_captured_finite(grid.captured)
        self.record_outputs(session, [grid.shape[0] * grid.shape[1] for grid in grids], outputs, kind, front)
        session.last_selection = stack_selections(selections)
        return outputs

    def record_outputs(
        self, session: PruningSession, tokens_in: Sequence[int], outputs: Sequence[GridOutput], kind: str = "image",
        front: int = 0,
    ) -> None:
        """Record what one vision forward passed on from each of its grids (``front``: tokens without grid position
        the family puts in front of every grid's tokens, such as a CLS token)."""
        session.records.append(ForwardRecord(kind, [
            GridRecord(n, out.indices.shape[0] + front, out.indices.detach().cpu(),
                       None if out.sources is None else out.sources.detach().cpu())
            for n, out in zip(tokens_in, outputs)
        ]))

    def record_unpruned(self, session: PruningSession, counts: Sequence[int], kind: str = "image") -> None:
        """Record a vision forward that passed every token on (method ``none``, or one that prunes in the LLM)."""
        session.records.append(ForwardRecord(kind, [GridRecord(n, n, None) for n in counts]))

    # --- installation ----------------------------------------------------------------------------------------
    def install(self, stack: ExitStack, session: PruningSession, processor: Any | None) -> None:
        self.install_model(stack, session)
        if processor is not None:
            self.install_processor(stack, session, processor)

    def install_processor(self, stack: ExitStack, session: PruningSession, processor: Any) -> None:
        """Make ``processor`` emit the placeholder tokens the model will fill (default: ``placeholder_counts``)."""
        patch_processor(stack, processor, self.placeholder_counts(session.method))

    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        """Wrap the model's own calls (restored by ``stack``) so the method runs on every vision forward."""
        raise NotImplementedError

    def placeholder_counts(self, method: Method) -> dict[str, Callable[[dict, int], int]]:
        """Visual kind ("image", "video") -> (processor outputs, index) -> placeholder tokens the processor emits."""
        raise NotImplementedError


class LlmPromptEmbeddings:
    """Adapter mixin for families without a CLIP text tower: a prompt is the mean LLM input embedding of its tokens,
    tokenized by the processor passed to ``hiprune.apply`` (put it before the Adapter class among the bases)."""

    def install(self, stack: ExitStack, session: PruningSession, processor: Any | None) -> None:
        if session.method.needs_prompt and getattr(processor, "tokenizer", None) is None:
            raise ValueError(
                f"method {session.method.name!r} embeds the prompt with the LLM's input embeddings: pass the "
                "processor (its tokenizer) to hiprune.apply"
            )
        self.tokenizer = getattr(processor, "tokenizer", None)
        super().install(stack, session, processor)

    def embed_prompts(self, session: PruningSession, prompts: list[str]) -> torch.Tensor:
        """[n, E]: mean LLM input embedding of each prompt's tokens (no special tokens added)."""
        embed = self.model.get_input_embeddings()
        rows = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if ids.numel() == 0:
                raise PruningError(f"prompt {prompt!r} has no tokens to compare the visual tokens with")
            with torch.no_grad():
                rows.append(embed(ids.to(embed.weight.device)).float().mean(dim=0))
        return torch.stack(rows)


class EncoderMerging:
    """The bookkeeping of an ``encoder``-stage method over one vision-encoder forward, for any family.

    A family calls :meth:`expect` with the budget before the encoder runs, :meth:`step` between attention and MLP of
    every layer up to the feature layer (it asks the method for the merge and applies it: size-weighted means, sizes,
    where every original patch went), passes :meth:`attention_bias` (proportional attention: + log size of every
    key) to each layer's attention, and reads :meth:`finish` after the encoder ran.
    """

    def __init__(self, method: Method, num_patches: int, layers: int, protected: int):
        self.method = method
        self.num_patches = num_patches
        self.layers = layers  # merging layers 1..layers (the feature layer)
        self.protected = protected
        self.schedule: list[int] | None = None
        self.sizes: torch.Tensor | None = None  # [B, T]
        self.where: torch.Tensor | None = None  # [B, N] current token of every original patch

    def schedule_for(self, budget: int) -> list[int]:
        """The method's merges per layer for ``budget`` patch tokens after the feature layer, validated."""
        schedule = [int(r) for r in self.method.merge_schedule(self.num_patches, budget, self.layers, self.protected)]
        if len(schedule) != self.layers or any(r < 0 for r in schedule) or sum(schedule) != self.num_patches - budget:
            raise ValueError(
                f"method {self.method.name!r} merge schedule {schedule} must give each of the {self.layers} layers "
                f"up to the feature layer a count >= 0, summing to {self.num_patches} - {budget}"
            )
        return schedule

    def expect(self, budget: int) -> None:
        self.schedule = self.schedule_for(budget)
        self.sizes = self.where = None

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, T] log sizes once a token stands for several patches (else None: the kernel runs unmasked)."""
        if not self.method.uses_proportional_attention() or self.sizes is None or bool((self.sizes == 1).all()):
            return None
        return self.sizes.log().to(dtype)[:, None, None, :]

    def step(self, layer: int, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Merge the tokens of 1-based ``layer`` as the method says; returns the shorter hidden states."""
        if self.schedule is None:
            raise PruningError(f"encoder layer {layer} ran, but no budget was set for this forward (expect())")
        batch, length = hidden.shape[:2]
        if layer == 1:
            if length != self.protected + self.num_patches:
                raise PruningError(f"encoder layer 1 got {length} tokens, expected {self.protected + self.num_patches}")
            self.sizes = torch.ones(batch, length, device=hidden.device)
            patches = torch.arange(self.protected, length, device=hidden.device)
            self.where = patches.expand(batch, -1).clone()
        merges = self.schedule[layer - 1]
        if merges == 0:
            return hidden
        tokens = EncoderTokens(hidden, keys, self.sizes, self.protected, layer)
        slots = self.method.merge(tokens, merges)
        out = length - merges
        self._check_slots(slots, batch, length, out, layer)
        weights = self.sizes.to(hidden.dtype).unsqueeze(-1)
        index = slots.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        summed = hidden.new_zeros(batch, out, hidden.shape[-1]).scatter_add_(1, index, hidden * weights)
        self.sizes = self.sizes.new_zeros(batch, out).scatter_add_(1, slots, self.sizes)
        self.where = slots.gather(1, self.where)
        return summed / self.sizes.to(hidden.dtype).unsqueeze(-1)

    def _check_slots(self, slots: torch.Tensor, batch: int, length: int, out: int, layer: int) -> None:
        name = self.method.name
        if not isinstance(slots, torch.Tensor) or slots.shape != (batch, length) or slots.dtype != torch.long:
            shape = tuple(slots.shape) if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise PruningError(f"method {name!r} returned merge slots {shape}, expected long [{batch}, {length}]")
        if int(slots.min()) < 0 or int(slots.max()) >= out:
            raise PruningError(f"method {name!r} merge slots at layer {layer} leave [0, {out})")
        used = torch.zeros(batch, out, dtype=torch.bool, device=slots.device).scatter_(1, slots, True)
        if not bool(used.all()):
            raise PruningError(f"method {name!r} left merge slots empty at layer {layer}: {length} tokens -> {out}")
        p = self.protected
        if p and not (torch.equal(slots[:, :p], torch.arange(p, device=slots.device).expand(batch, p))
                      and bool((slots[:, p:] >= p).all())):
            raise PruningError(f"method {name!r} merged a protected token (CLS) at layer {layer}")

    def finish(self) -> list[GridOutput]:
        """Per row: the patch tokens after the feature layer -- each one's representative (its lowest original
        patch), and the slot every original patch went into. Features are the family's to attach."""
        if self.where is None:
            raise PruningError("the vision encoder did not run the merging layers in this forward")
        where = self.where - self.protected
        count = int(self.sizes.shape[1]) - self.protected
        patches = torch.arange(self.num_patches, device=where.device).expand_as(where)
        representative = torch.full((where.shape[0], count), self.num_patches, dtype=torch.long, device=where.device)
        representative.scatter_reduce_(1, where, patches, reduce="amin")
        self.schedule = self.sizes = self.where = None
        return [GridOutput(representative[b], torch.empty(0), where[b]) for b in range(where.shape[0])]


def splits_visuals(method: Method) -> bool:
    """Whether ``method`` splits an image's budget over its grids itself (overrides ``Method.split_visual``)."""
    return method.decides_split()


def split_visuals(method: Method, grids: list[GridInput]) -> list[GridInput]:
    """The grids with the budgets ``method.split_visual`` gives the grids of each visual that has several (the
    family's own budgets where it returns None). Fails loudly unless a split keeps the visual's total number of
    passed-on tokens (what the processor emitted) and fits every grid."""
    if not splits_visuals(method):
        return grids
    by_visual: dict[int, list[int]] = {}
    for k, grid in enumerate(grids):
        by_visual.setdefault(grid.visual, []).append(k)
    grids = list(grids)
    for visual, members in by_visual.items():
        if len(members) < 2:
            continue
        tokens = []
        for k in members:
            grid = grids[k]
            view = VisionTokens(features=grid.features[None], grid=grid.shape, sample_ids=[grid.sample_id])
            for name, value in grid.captured.items():
                (view.scores if value.dim() == 1 else view.states)[name] = value[None]
            tokens.append(view)
        budget = sum(grids[k].budget for k in members)
        split = method.split_visual(tokens, budget, [grids[k].tile for k in members])
        if split is None:
            continue
        split = [int(b) for b in split]
        keep = [method.kept_count(b) if b else 0 for b in split]
        capacities = [grids[k].shape[0] * grids[k].shape[1] for k in members]
        if (len(split) != len(members) or any(b < 0 for b in split) or sum(split) != budget
                or sum(keep) != sum(grids[k].keep for k in members) or any(n > c for n, c in zip(keep, capacities))):
            raise PruningError(
                f"method {method.name!r} split visual {visual}'s budget {budget} over grids of {capacities} tokens "
                f"as {split}: expected one count >= 0 per grid, at most its tokens, summing to {budget}"
            )
        for k, b, n in zip(members, split, keep):
            grids[k] = replace(grids[k], budget=b, keep=n)
    return grids


def selection_row(selection: Selection, row: int) -> Selection:
    """Row ``row`` of a selection, as a one-row Selection."""
    return Selection(
        selection.indices[row : row + 1],
        selection.features[row : row + 1],
        {name: mask[row : row + 1] for name, mask in selection.roles.items()},
        None if selection.sources is None else selection.sources[row : row + 1],
    )


def stack_selections(rows: list[Selection]) -> Selection | None:
    """One Selection of all rows, or None when they kept different counts (``sources`` only where every row has
    them over grids of one size)."""
    if not rows or len({row.indices.shape[1] for row in rows}) != 1:
        return None
    sources = [row.sources for row in rows]
    stackable = all(s is not None for s in sources) and len({s.shape[1] for s in sources}) == 1
    return Selection(
        torch.cat([row.indices for row in rows]),
        torch.cat([row.features for row in rows]),
        {name: torch.cat([row.roles[name] for row in rows]) for name in rows[0].roles},
        torch.cat(sources) if stackable else None,
    )


# Visual kind -> the processor's replacement hook, its index keyword, and its placeholder token attribute.
PLACEHOLDERS = {
    "image": ("replace_image_token", "image_idx", "image_token"),
    "video": ("replace_video_token", "video_idx", "video_token"),
}


def patch_processor(stack: ExitStack, processor: Any, counts: dict[str, Callable[[dict, int], int]]) -> None:
    """Make ``processor`` emit ``counts[kind](inputs, index)`` placeholder tokens per visual of each kind."""
    for kind in counts:
        replace, _, token = PLACEHOLDERS[kind]
        if not (hasattr(processor, replace) and hasattr(processor, token)):
            raise TypeError(f"cannot set the {' / '.join(counts)} token count of {type(processor).__name__}")
    for kind, count in counts.items():
        replace, index_name, token = PLACEHOLDERS[kind]

        def replacement(inputs: dict, *args, _count=count, _index=index_name, _token=token, **kwargs) -> str:
            index = args[0] if args else kwargs[_index]
            return getattr(processor, _token) * _count(inputs, index)

        patch_attribute(stack, processor, replace, replacement)


STAGE_ACTIONS = {
    "vision": "prunes before the LLM",
    "encoder": "merges inside the vision encoder",
    "llm": "prunes inside the LLM",
}


def unsupported_stage_message(method: str, family: str, stage: str = "llm") -> str:
    """Why ``family`` cannot run a method of ``stage``: the adapter's own reason (``stage_limits``) where it has one."""
    reasons = [cls.stage_limits[stage] for cls in _ADAPTERS if cls.family == family and stage in cls.stage_limits]
    because = f" ({reasons[0]})" if reasons else " yet"
    return f"method {method!r} {STAGE_ACTIONS.get(stage, stage)}, which the {family} adapter does not support{because}"


_ADAPTERS: list[type[Adapter]] = []


def family_supports_stage(family: str, stage: str) -> bool:
    """Whether the registered adapter of ``family`` can run methods of ``stage`` (decidable without a model)."""
    matching = [cls for cls in _ADAPTERS if cls.family == family]
    if not matching:
        raise ValueError(f"no adapter is registered for the model family {family!r}")
    return all(stage in cls.stages for cls in matching)


def check_family_method(family: str, method: Method) -> None:
    """Raise if ``family``'s adapter cannot run ``method`` whatever the model (:meth:`Adapter.check_method`), so a
    harness can refuse it before any weight loads."""
    matching = [cls for cls in _ADAPTERS if cls.family == family]
    if not matching:
        raise ValueError(f"no adapter is registered for the model family {family!r}")
    for cls in matching:
        cls.check_method(method)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append(cls)
    return cls


def adapter_for(model: nn.Module, **options: Any) -> Adapter:
    """The adapter of ``model``'s family; ``options`` are that adapter's own (e.g. Qwen2.5-VL ``positions``)."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            try:
                return cls(model, **options)
            except TypeError as exc:
                if options and "unexpected keyword" in str(exc):
                    raise ValueError(f"the {cls.family} adapter has no option(s) {sorted(options)}") from exc
                raise
    supported = ", ".join(t.__name__ for cls in _ADAPTERS for t in cls.model_types)
    raise TypeError(f"no pruning adapter for {type(model).__name__}; supported: {supported}")


@contextmanager
def apply(
    model: nn.Module,
    method: Method,
    processor: Any | None = None,
    prompt_encoder: Any | None = None,
    **adapter_options: Any,
) -> Iterator[PruningSession]:
    """Install ``method`` on ``model`` (and make ``processor`` emit the matching number of image tokens).

    Prompt-aware methods on CLIP-tower families also need ``prompt_encoder`` (e.g. hiprune.ClipPromptEncoder) and
    the prompts of each forward pass (``session.set_prompts``). ``adapter_options`` go to the family's adapter
    (e.g. ``positions="compact"`` for Qwen2.5-VL). Everything patched is restored on exit, also when the body raises.
    """
    method.validate()
    adapter = adapter_for(model, **adapter_options)
    if method.stage not in adapter.stages:  # first: a family's own checks may assume its stages
        raise ValueError(unsupported_stage_message(method.name, adapter.family, method.stage))
    adapter.check_supported(method, prompt_encoder)
    session = PruningSession(method=method, adapter=adapter, prompt_encoder=prompt_encoder)
    with ExitStack() as stack:
        adapter.install(stack, session, processor)
        yield session
