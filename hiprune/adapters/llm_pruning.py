"""LLM-side pruning plumbing: run a method's drop schedule inside a Llama-style decoder during prefill.

A drop schedule (:meth:`hiprune.methods.base.Method.drop_schedule`) is any number of stages
:class:`~hiprune.methods.base.DropStage` ``(layer, keep, score)``: from decoder layer ``layer`` on, every image keeps
the ``keep`` of its current visual tokens that the last prompt token attends to most (heads averaged), chosen by the
method's ``select_from_attention``; the attention is layer ``layer - 1``'s (``score="previous"``, FastV: the one-stage
schedule ``[(K, k)]``) or layer ``layer``'s own on its input (``score="own"``, PyramidDrop:
:func:`own_last_query_attention` computes only the last query row from the layer's norm, q / k projections and RoPE).
Positions (:meth:`~hiprune.methods.base.Method.drop_positions`): "original" keeps every token's position of the
unpruned sequence; "compact" renumbers them without gaps after each stage (cos / sin from the decoder's rotary
embedding) and shifts later decode steps, per layer, by the visual tokens dropped before that layer. A stage may also
rank by the attention of the method's text raters (``score="raters"``: :meth:`~hiprune.methods.base.Method.text_raters`
chosen once on the LLM's input embeddings, one image per row; their rows of layer ``layer - 1``'s attention, computed
from that layer's inputs) and add tokens after the kept ones (``added``: :meth:`~hiprune.methods.base.Method.
recycle_tokens` of the dropped tokens' outputs of layer ``layer - 1``, SparseVLM's recycling; compact positions only).
An added token takes the prefill column of a token its stage dropped, so decode-step masks stay aligned.
:func:`resolve_schedule` is the one place a schedule is validated (:func:`check_schedule`), before anything runs.

How it enters a transformers 5 decoder (``LlamaModel``) without replacing its forward:

- The family adapter wraps its multimodal forward in :meth:`VisualTokenDrop.forward` (:func:`install_decoder_drop`:
  the family names its visual placeholder ids), which is told where the image tokens are (a [B, T] mask) and how
  many each visual holds (LLaVA-1.5: 576; elsewhere each run of visual tokens is one visual -- a LLaVA-NeXT or
  LLaVA-OneVision image of all its crops, an InternVL image of all its tiles, a Qwen2.5-VL / Qwen3-VL image, a
  Video-LLaVA image or video); the schedule is resolved for that count. Per-token side inputs of the prefill that the
  decoder applies between layers (Qwen3-VL's DeepStack features) follow the kept tokens through
  :meth:`VisualTokenDrop.held_rows`. A
  forward with image tokens is a *prefill*; any other forward is a decode step (or a text-only call).
- During a prefill, the attention module of every layer ``layer - 1`` a "previous" stage scores with is rerouted through
  :class:`hiprune.capture.AttentionScores` with the "last" query mode: the layer's output still comes from the
  model's own kernel, and the last token's attention row (mean over heads) is recorded on the side. Other layers
  keep their kernel untouched.
- A forward pre-hook on each stage's layer ranks the visual tokens each image still holds, keeps ``keep`` of them, and
  replaces the layer's inputs with the kept positions only: hidden states, position embeddings (cos, sin of the kept
  positions, or compact ones), position ids and the 4-D attention mask (rows and columns). Hooks on the later layers
  hand them the same shortened inputs (``LlamaModel`` gives every layer the full-length ones) until the next stage
  shortens them again. "own" stages capture nothing: the stage's hook scores from the layer's own inputs. The decoder
  output, and so the logits, then cover the positions the last stage kept (text + kept visual tokens, in order).
- The prefill positions each stage's layers hold are stored on the KV cache object (:class:`PrunedPrefill`). In
  later (decode) forwards the hooks of layers from the first stage on drop the pruned prefill columns of their own
  stage from the attention mask (when there is one: padding, or eager attention), so each layer's mask matches its
  own, shorter cache. New tokens' positions continue the unpruned numbering (HF computes them from layer 0's cache
  or the 2-D attention mask), as in the official FastV code. Without a KV cache (``use_cache=False``) every
  generation step is a prefill and selects again from its own last token.
- Every pruned prefill appends a :class:`~hiprune.adapters.base.LayerRecord` to the session: the sequence length
  each decoder layer ran on, the visual tokens among them, the kept indices of every image after each stage, and
  the scoring arithmetic each row ran (for FLOPs).
- Positions: the method's rule, unless the family fixes one (Qwen2.5-VL: "original", its layers get M-RoPE's
  (cos, sin) and no 1-D position ids; decoding continues from HF's ``rope_deltas`` of the unpruned prefill).

Supported: Llama-style decoders (Llama, Mistral, Qwen2, Qwen2.5-VL's and Qwen3-VL's text models) under eager or SDPA attention, ``DynamicCache`` (HF ``generate``'s default; greedy,
sampling and beam search -- beams of one sample share its prefill, so reordering them leaves the kept positions
valid) or no cache, left-padded batches with the same number of images of one token count in every row. Anything else (StaticCache,
a cache cropped into the prefill or pre-filled by another forward, right padding, flash/flex attention, a prepared 4-D mask) raises
a PruningError naming it rather than running unpruned or misaligned.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from numbers import Integral
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from hiprune.adapters.base import LayerRecord, PruningError, PruningSession, patch_attribute
from hiprune.capture import AttentionScores
from hiprune.methods.base import DROP_POSITIONS, SCORE_SOURCES, DropStage, Method

# Decoders whose layers this plumbing drives: Llama-style pre-norm layers (input_layernorm, self_attn with q / k
# projections and rotate-half RoPE from position_embeddings). Qwen2 (LLaVA-OneVision's, InternVL3's LLM) adds q / k
# biases; Qwen2.5-VL's and Qwen3-VL's text models have the same layer, their M-RoPE already folded into the (cos, sin)
# [B, T, head_dim] every layer gets; Qwen3-VL's also normalizes every head's queries and keys (q_norm, k_norm).
SUPPORTED_DECODERS = ("llama", "mistral", "qwen2", "qwen2_5_vl_text", "qwen3_vl_text")
SUPPORTED_ATTENTION = ("eager", "sdpa")
# Attribute of the KV cache object holding what a pruned prefill kept (the cache lives as long as the generation).
_PRUNED_PREFILL = "_hiprune_pruned_prefill"


def check_schedule(
    schedule: Sequence[DropStage], visual_tokens: int, decoder_layers: int, name: str = ""
) -> list[DropStage]:
    """Raise ValueError unless ``schedule`` can run on a decoder of ``decoder_layers`` layers for images of
    ``visual_tokens`` tokens: one or more DropStage's with strictly increasing layers in 1..L-1 and strictly
    decreasing keep counts >= 1, the first at most ``visual_tokens``. Returns the schedule as a list.

    name: the method's name, for the messages. This is the one validation of a schedule (the plumbing, the adapters'
    checks and the eval side's per-layer counts all go through it).
    """
    who = f"method {name!r}" if name else "the drop schedule"
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"{who}: a drop schedule is a non-empty list of DropStage's, got {schedule!r}")
    stages = list(schedule)
    for stage in stages:
        if not isinstance(stage, DropStage):
            raise ValueError(f"{who}: drop schedule entries must be DropStage's, got {stage!r}")
        for what, value in (("layer", stage.layer), ("keep", stage.keep), ("added", stage.added)):
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise ValueError(f"{who}: drop stage {what} must be an int, got {value!r} in {stage}")
        if stage.score not in SCORE_SOURCES:
            raise ValueError(f"{who}: drop stage score must be one of {SCORE_SOURCES}, got {stage.score!r}")
        if not 1 <= stage.layer < decoder_layers:
            raise ValueError(
                f"{who} prunes from decoder layer {stage.layer} (0-based), but this LLM has "
                f"{decoder_layers} layers: layer must lie in 1..{decoder_layers - 1}"
            )
        if stage.keep < 1:
            raise ValueError(f"{who}: drop stage {stage} keeps no visual token (keep must be >= 1)")
        if stage.added < 0:
            raise ValueError(f"{who}: drop stage {stage} adds a negative number of tokens")
    for before, after in pairwise(stages):
        if after.layer <= before.layer or after.keep >= before.keep + before.added:
            raise ValueError(
                f"{who}: drop stages must have strictly increasing layers and strictly decreasing keep "
                f"counts, got {before} then {after}"
            )
    if stages[0].keep > visual_tokens:
        raise ValueError(
            f"{who} keeps {stages[0].keep} visual tokens per image from decoder layer {stages[0].layer}, "
            f"but an image has only {visual_tokens}"
        )
    return stages


def resolve_schedule(method: Method, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
    """``method.drop_schedule`` for images of ``visual_tokens`` tokens at the LLM's input, validated."""
    return check_schedule(
        method.drop_schedule(visual_tokens, decoder_layers), visual_tokens, decoder_layers, method.name
    )


def visual_per_layer(schedule: Sequence[DropStage], visual_tokens: int, decoder_layers: int) -> list[int]:
    """Visual tokens of one image at each decoder layer under ``schedule`` (validated here):
    ``visual_tokens`` before the first stage, each stage's ``keep`` from its layer on."""
    stages = check_schedule(schedule, visual_tokens, decoder_layers)
    counts = [int(visual_tokens)] * decoder_layers
    for stage in stages:
        counts[stage.layer :] = [int(stage.keep + stage.added)] * (decoder_layers - stage.layer)
    return counts


def check_llm_method(
    method: Method, text_config: Any, family: str, visual_tokens: int, positions: str | None = None
) -> None:
    """Raise ValueError if this plumbing cannot run ``method`` on a decoder with ``text_config`` for images of
    ``visual_tokens`` tokens at the LLM's input (a schedule's counts may depend on both, e.g. FastV's avg_layers).

    positions: the family's position rule for the kept tokens, overriding :meth:`Method.drop_positions` (None: the
    method's; Qwen2.5-VL: "original", kept tokens keep their M-RoPE positions)."""
    n_layers = text_config.num_hidden_layers
    try:
        if type(method).select_from_attention is Method.select_from_attention:
            raise NotImplementedError
        schedule = resolve_schedule(method, visual_tokens, n_layers)
        if any(s.score == "raters" for s in schedule) and type(method).text_raters is Method.text_raters:
            raise NotImplementedError
        if any(s.added for s in schedule) and type(method).recycle_tokens is Method.recycle_tokens:
            raise NotImplementedError
    except NotImplementedError:
        raise ValueError(
            f"method {method.name!r} prunes inside the LLM in a way the {family} adapter does not implement (it "
            "runs a drop schedule: a method's drop_schedule, each stage ranked with its select_from_attention by "
            "the last prompt token's attention in the layer before or in the stage's own layer)"
        ) from None
    positions = method.drop_positions() if positions is None else positions
    if positions not in DROP_POSITIONS:
        raise ValueError(f"method {method.name!r}: drop positions must be one of {DROP_POSITIONS}, got {positions!r}")
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_DECODERS:
        raise ValueError(
            f"method {method.name!r} needs a decoder of type {SUPPORTED_DECODERS}; this {family} model's LLM is "
            f"{model_type!r}"
        )
    implementation = getattr(text_config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"method {method.name!r} shortens the decoder's attention masks, which is implemented for "
            f"attn_implementation {SUPPORTED_ATTENTION}; this LLM uses {implementation!r}"
        )


@dataclass
class PrunedPrefill:
    """Kept by the KV cache of a pruned prefill: which prefill positions each decoder layer holds.

    stages: (first layer of a stage, [B, T_s] sorted prefill positions that layer and the later ones up to the next
        stage hold: text, padding and the visual tokens kept so far), in layer order; earlier layers hold all T.
    """

    stages: list[tuple[int, torch.Tensor]]
    prefill_length: int  # T

    def held(self, layer: int) -> torch.Tensor | None:
        """[B, T_s] prefill positions decoder ``layer``'s cache holds; None: all of them (before the first stage)."""
        positions = None
        for first, kept in self.stages:
            if first <= layer:
                positions = kept
        return positions


@dataclass
class _Prefill:
    """State of one prefill forward while it runs."""

    image_positions: torch.Tensor  # [B, images per row, tokens per image] sequence positions of every image token
    length: int  # T, the prefill's sequence length
    captures: dict[int, AttentionScores]  # stage index -> last-query attention of the layer before it ("previous")
    layer_tokens: list[int] = field(default_factory=list)  # sequence length each decoder layer ran on
    # per batch row: the scoring arithmetic the plumbing ran for it, (kind, queries, keys) (LayerRecord.scoring)
    scoring: list[list[tuple[str, int, int]]] = field(default_factory=list)
    layer_visual: list[int] = field(default_factory=list)  # visual tokens per row each decoder layer ran on
    held: torch.Tensor | None = None  # [B, T'] prefill positions the current (shortened) sequence holds; None: all
    image_kept: torch.Tensor | None = None  # [B * images, n] indices into each image's tokens still held; None: all
    shortened: dict[str, Any] | None = None  # layer inputs for the current sequence, set by the last stage's hook
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, image_kept after that stage)
    cached: PrunedPrefill | None = None  # what this prefill stored on its KV cache
    real: torch.Tensor | None = None  # [B, T] False at padding (None: no padding mask)
    raters: list[torch.Tensor] | None = None  # per row: prefill positions of its text raters ("raters" stages)
    choice: list[tuple[str, int, int]] = field(default_factory=list)  # per row: the raters' choice (scoring)
    stash: dict[int, tuple[torch.Tensor, dict]] = field(default_factory=dict)  # layer -> its inputs ("raters")
    # [B * images, N + added so far]: the prefill column each image token id stands at; ids >= N are tokens a stage
    # added (they take the column of a token dropped at that stage, so decode masks stay valid); None: no additions
    columns: torch.Tensor | None = None


class VisualTokenDrop:
    """Runs ``session.method``'s drop schedule on ``decoder_layers`` (a Llama-style decoder's layers).

    tokens_per_image: visual tokens of one image (one *visual*: an image, a LLaVA-NeXT image of all its crops, a
        video) in the sequence, when the family fixes it (LLaVA-1.5: 576); None: each prefill says it
        (:meth:`forward`), and the schedule is resolved for that count (Qwen2.5-VL's images, LLaVA-NeXT's, videos).
    rotary: the decoder's rotary embedding (``LlamaModel.rotary_emb``: (hidden, position_ids) -> (cos, sin)); needed
        by methods with compact positions (:meth:`Method.drop_positions`), which renumber the kept tokens.
    positions: the family's position rule, overriding the method's (None: :meth:`Method.drop_positions`): Qwen2.5-VL
        passes "original" (kept tokens keep their M-RoPE positions; its layers get no 1-D position ids to renumber).
    """

    def __init__(
        self,
        session: PruningSession,
        decoder_layers: nn.ModuleList,
        tokens_per_image: int | None,
        rotary: nn.Module | None = None,
        positions: str | None = None,
    ):
        self.session = session
        self.method = session.method
        self.layers = decoder_layers
        positions = self.method.drop_positions() if positions is None else positions
        if positions not in DROP_POSITIONS:
            raise PruningError(f"{self.method.name}: drop positions must be one of {DROP_POSITIONS}, got {positions!r}")
        self.compact = positions == "compact"
        if self.compact and rotary is None:
            raise PruningError(f"{self.method.name} renumbers positions after each drop and needs the rotary embedding")
        self.rotary = rotary
        self.tokens_per_image: int | None = None
        self._schedules: dict[int, list[DropStage]] = {}
        if tokens_per_image is not None:
            self._configure(int(tokens_per_image))  # validates the schedule before anything runs
        self._prefill: _Prefill | None = None

    def _configure(self, tokens_per_image: int) -> None:
        """Resolve the schedule for visuals of ``tokens_per_image`` tokens (cached per count)."""
        if tokens_per_image not in self._schedules:
            try:
                self._schedules[tokens_per_image] = resolve_schedule(self.method, tokens_per_image, len(self.layers))
            except ValueError as exc:
                raise PruningError(f"an image of {tokens_per_image} visual tokens: {exc}") from exc
        self.tokens_per_image = tokens_per_image
        self.schedule = self._schedules[tokens_per_image]
        self._raters_layers = {stage.layer - 1 for stage in self.schedule if stage.score == "raters"}
        self.first_layer = self.schedule[0].layer
        self._stage_at = {stage.layer: i for i, stage in enumerate(self.schedule)}

    # --- installation --------------------------------------------------------------------------------------
    def install(self, stack: ExitStack) -> None:
        """Register the layer hooks; the stack removes them."""
        for index, layer in enumerate(self.layers):
            handle = layer.register_forward_pre_hook(self._make_hook(index), with_kwargs=True)
            stack.callback(handle.remove)

    @contextmanager
    def forward(
        self,
        image_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        tokens_per_image: int | None = None,
    ) -> Iterator[None]:
        """Wrap one multimodal forward. image_mask: [B, T] True at image tokens (None or all False: no prefill);
        tokens_per_image: tokens of each visual in this forward (None: the count fixed at construction)."""
        if self._prefill is not None:
            raise PruningError("a forward started while another pruned prefill was still running (re-entrant call)")
        if image_mask is None or not bool(image_mask.any()):
            yield
            return
        if tokens_per_image is not None:
            self._configure(int(tokens_per_image))
        elif self.tokens_per_image is None:
            raise PruningError(f"{self.method.name}: the adapter did not say how many tokens each image holds")
        image_positions = self._image_positions(image_mask)
        self._check_padding(attention_mask, image_mask.shape)
        self._check_attention()
        with ExitStack() as captures:
            prefill = _Prefill(
                real=None if attention_mask is None else attention_mask.bool(),
                image_positions=image_positions,
                length=image_mask.shape[1],
                captures={
                    i: captures.enter_context(
                        AttentionScores({"last": self.layers[s.layer - 1].self_attn}, queries="last")
                    )
                    for i, s in enumerate(self.schedule)
                    if s.score == "previous"
                },
            )
            self._prefill = prefill
            try:
                yield
                if len(prefill.layer_tokens) != len(self.layers) or len(prefill.stages) != len(self.schedule):
                    raise PruningError(
                        f"the prefill ran {len(prefill.layer_tokens)} of {len(self.layers)} decoder layers through "
                        f"the pruning hooks and {len(prefill.stages)} of the {len(self.schedule)} drop stage(s) at "
                        f"layers {[s.layer for s in self.schedule]}; the decoder was not called the way the "
                        "plumbing expects"
                    )
                stages = [(layer, kept.detach().cpu()) for layer, kept in prefill.stages]
                self.session.layer_records.append(
                    LayerRecord(
                        tokens=list(prefill.layer_tokens),
                        visual=list(prefill.layer_visual),
                        indices=stages[-1][1],
                        stages=stages,
                        visual_in=self.tokens_per_image,
                        images=int(image_positions.shape[1]),
                        scoring=[
                            ([prefill.choice[row]] if prefill.choice else []) + ops
                            for row, ops in enumerate(prefill.scoring)
                        ],
                    )
                )
            finally:
                self._prefill = None

    def held_rows(self, mask: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A per-token side input of the prefill (``mask`` [B, T] over the unpruned sequence, with one row of some
        tensor per True entry, row-major: Qwen3-VL's ``visual_pos_masks`` and DeepStack features) cut to the sequence
        the decoder layers hold now: (mask [B, T'] over the current sequence, the indices of the rows its True entries
        keep, in the same order). None outside a prefill or before its first stage (the sequence is the whole prefill).
        what: the side input, for the messages. Tokens a stage added (recycling) have no row of their own: an error."""
        prefill = self._prefill
        if prefill is None or prefill.held is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != prefill.held.shape[0] or mask.shape[1] != prefill.length:
            raise PruningError(f"{what}: expected a [{prefill.held.shape[0]}, {prefill.length}] mask over the prefill, "
                               f"got shape {tuple(mask.shape)}")
        if prefill.image_kept is not None and bool((prefill.image_kept >= self.tokens_per_image).any()):
            raise PruningError(f"{self.method.name}: {what} reached a layer after a stage added (recycled) visual "
                               "tokens, which have no rows of their own")
        held = prefill.held.to(mask.device)
        rank = mask.reshape(-1).long().cumsum(0).view_as(mask) - 1  # index of every True entry's row
        cut = mask.gather(1, held)
        return cut, rank.gather(1, held)[cut]

    # --- checks --------------------------------------------------------------------------------------------
    def _image_positions(self, image_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] mask -> [B, images, tokens_per_image] positions; every row must hold the same whole images."""
        if image_mask.dim() != 2:
            raise PruningError(f"image token mask must be [B, T], got shape {tuple(image_mask.shape)}")
        counts = image_mask.sum(dim=1).tolist()
        n = self.tokens_per_image
        if len(set(counts)) != 1 or counts[0] % n != 0:
            raise PruningError(
                f"{self.method.name} drops visual tokens of every batch row at once and needs the same number of "
                f"whole images ({n} tokens each) in every row; got {counts} image tokens per row"
            )
        batch = image_mask.shape[0]
        positions = image_mask.nonzero()[:, 1].view(batch, counts[0] // n, n)  # nonzero is row-major: sorted
        if bool((positions.diff(dim=2) != 1).any()):
            raise PruningError(f"the {n} tokens of an image are not contiguous in the sequence")
        return positions

    def _check_padding(self, attention_mask: torch.Tensor | None, shape: torch.Size) -> None:
        if attention_mask is None:
            return
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
            raise PruningError(
                f"{self.method.name} needs a 2-D [B, T] padding mask (or none); got shape "
                f"{tuple(attention_mask.shape)} for a sequence of shape {tuple(shape)}"
            )
        if not bool(attention_mask[:, -1].bool().all()):
            raise PruningError(
                f"{self.method.name} ranks visual tokens by the last token's attention, but a row ends in padding "
                "(right padding); pad on the left"
            )

    def _check_attention(self) -> None:
        """Every decoder layer's kernel must take the masks this plumbing shortens (checked before rerouting)."""
        implementations = {layer.self_attn.config._attn_implementation for layer in self.layers}
        if not implementations <= set(SUPPORTED_ATTENTION):
            raise PruningError(
                f"attn_implementation {sorted(implementations)} is not supported (only {SUPPORTED_ATTENTION})"
            )

    # --- hooks ---------------------------------------------------------------------------------------------
    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None:
                raise PruningError(f"decoder layer {index} was called without hidden states")
            if self._prefill is not None:
                return self._prefill_layer(index, args, kwargs, hidden)
            return self._decode_step(index, args, kwargs, hidden)

        return hook

    def _prefill_layer(self, index: int, args: tuple, kwargs: dict, hidden: torch.Tensor):
        """Decoder layer ``index`` of a prefill: run a stage at its layer, hand later layers the shortened inputs."""
        prefill = self._prefill
        images = prefill.image_positions.shape[1]
        if self._raters_layers and index == 0:
            prefill.raters = self._text_raters(hidden)
        if index < self.first_layer:
            if index in self._raters_layers:
                prefill.stash[index] = (hidden, kwargs)
            prefill.layer_tokens.append(hidden.shape[1])
            prefill.layer_visual.append(images * self.tokens_per_image)
            return None
        if index > self.first_layer and prefill.shortened is None:
            raise PruningError(f"decoder layer {index} ran before layer {self.first_layer} pruned")
        expected = prefill.length if prefill.held is None else prefill.held.shape[1]
        if hidden.shape[1] != expected:
            raise PruningError(f"decoder layer {index} got {hidden.shape[1]} tokens, expected {expected}")
        if prefill.shortened is not None:
            kwargs = {**kwargs, **prefill.shortened}
        stage = self._stage_at.get(index)
        if stage is not None:
            if len(prefill.stages) != stage:
                raise PruningError(f"decoder layer {index} ran before the drop stages of the layers before it")
            args, kwargs = self._drop(stage, args, kwargs, hidden)
        if index in self._raters_layers:
            prefill.stash[index] = (args[0] if args else kwargs["hidden_states"], kwargs)
        prefill.layer_tokens.append((args[0] if args else kwargs["hidden_states"]).shape[1])
        prefill.layer_visual.append(images * prefill.image_kept.shape[1])
        return args, kwargs

    def _drop(self, stage_index: int, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """A stage's layer in a prefill: choose the kept tokens of every image and shorten every layer input."""
        prefill, stage = self._prefill, self.schedule[stage_index]
        batch, length = hidden.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._check_cache(cache, stage.layer)
        if not prefill.scoring:
            prefill.scoring = [[] for _ in range(batch)]
        # the records count each row as if it ran alone: without its left padding (never dropped)
        padding = [0] * batch if prefill.real is None else (~prefill.real).sum(dim=1).tolist()
        if stage.score == "own":
            scores = own_last_query_attention(self.layers[stage.layer], hidden, kwargs)
            for ops, pad in zip(prefill.scoring, padding, strict=True):
                ops.append(("own", 1, length - pad))
        elif stage.score == "raters":
            scores = self._rater_scores(stage)
            keys = prefill.layer_tokens[stage.layer - 1]
            for ops, raters, pad in zip(prefill.scoring, prefill.raters, padding, strict=True):
                ops.append(("raters", len(raters), keys - pad))
        else:
            try:
                scores = prefill.captures[stage_index].collect()["last"]
            except RuntimeError as exc:
                raise PruningError(f"layer {stage.layer - 1}'s attention was not captured: {exc}") from exc
            for ops, pad in zip(prefill.scoring, padding, strict=True):
                ops.append(("last", 1, prefill.layer_tokens[stage.layer - 1] - pad))
        if scores.shape != (batch, length):
            raise PruningError(f"last-query attention has shape {tuple(scores.shape)}, expected ({batch}, {length})")
        positions = prefill.image_positions.to(hidden.device)
        _, images, per_image = positions.shape
        if positions.shape[0] != batch or int(positions.max()) >= prefill.length:
            raise PruningError("the image token mask does not match the decoder's input sequence")

        # the visual tokens each image still holds: indices into its own tokens, and positions in the current sequence
        rows = batch * images
        image_kept = prefill.image_kept
        if image_kept is None:
            image_kept = torch.arange(per_image, device=hidden.device).expand(rows, per_image)
        image_kept = image_kept.to(hidden.device)
        held = image_kept.shape[1]
        table = positions.view(rows, per_image) if prefill.columns is None else prefill.columns.to(hidden.device)
        original = table.gather(1, image_kept).view(batch, images * held)
        if prefill.held is None:
            current = original
        else:
            current = _inverse(prefill.held.to(hidden.device), prefill.length).gather(1, original)
            if bool((current < 0).any()):
                raise PruningError(f"stage at layer {stage.layer}: an image token kept so far is not in the sequence")

        image_scores = scores.gather(1, current).view(rows, held)
        try:
            kept = self.method.select_from_attention(image_scores, stage.keep)
        except ValueError as exc:
            raise PruningError(f"{self.method.name} selection failed: {exc}") from exc
        if (
            not isinstance(kept, torch.Tensor)
            or kept.shape != (rows, stage.keep)
            or kept.dtype != torch.int64
            or kept.min() < 0
            or kept.max() >= held
        ):
            got = (
                f"{tuple(kept.shape)} {kept.dtype} in [{int(kept.min())}, {int(kept.max())}]"
                if isinstance(kept, torch.Tensor)
                else type(kept).__name__
            )
            raise PruningError(
                f"{self.method.name} returned indices {got}; expected {stage.keep} of {held} per image (int64)"
            )
        kept = kept.to(hidden.device)
        kept_current = current.view(rows, held).gather(1, kept).view(batch, -1)
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        keep_mask.scatter_(1, current, False)
        keep_mask.scatter_(1, kept_current, True)
        short = length - images * (held - stage.keep)
        if int(keep_mask.sum()) != batch * short:
            raise PruningError(f"{self.method.name} kept duplicate visual tokens")
        keep = keep_mask.nonzero()[:, 1].view(batch, short)  # row-major: each row's kept positions, sorted
        if stage.added:
            return self._drop_and_add(
                stage_index, args, kwargs, hidden, keep, current, kept, image_scores, image_kept, table
            )

        hidden = _take(hidden, keep, dim=1)
        shortened: dict[str, Any] = {}
        if self.compact:
            # renumber without gaps: every kept token moves down by the visual tokens dropped before it
            position_ids = kwargs.get("position_ids")
            if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != length:
                raise PruningError(
                    f"{self.method.name} renumbers positions and needs the decoder's [B, {length}] position_ids; got "
                    f"{None if position_ids is None else tuple(position_ids.shape)}"
                )
            dropped_before = (~keep_mask).long().cumsum(dim=1)
            position_ids = _take(position_ids, keep, dim=1) - dropped_before.gather(1, keep).to(position_ids.device)
            shortened["position_ids"] = position_ids
            shortened["position_embeddings"] = self.rotary(hidden, position_ids)
        else:
            cos, sin = kwargs["position_embeddings"]
            shortened["position_embeddings"] = (_take(cos, keep, dim=1), _take(sin, keep, dim=1))
            if kwargs.get("position_ids") is not None:
                shortened["position_ids"] = _take(kwargs["position_ids"], keep, dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (length, length):
                raise PruningError(
                    f"expected a [B, 1, {length}, {length}] attention mask in the prefill, got "
                    f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
                )
            mask = _take(_take(mask, keep, dim=2), keep, dim=3)
        shortened["attention_mask"] = mask  # None stays None: SDPA's is_causal is right for the kept order too

        held_positions = keep if prefill.held is None else prefill.held.to(keep.device).gather(1, keep)
        image_kept = image_kept.gather(1, kept).sort(dim=1).values
        return self._finish_stage(stage, args, kwargs, cache, hidden, shortened, held_positions, image_kept)

    def _finish_stage(self, stage, args, kwargs, cache, hidden, shortened, held_positions, image_kept):
        """Record a stage's result on the prefill (and the KV cache) and hand the layer its new inputs."""
        prefill = self._prefill
        if cache is not None:
            if prefill.cached is None:
                prefill.cached = PrunedPrefill(stages=[], prefill_length=prefill.length)
                setattr(cache, _PRUNED_PREFILL, prefill.cached)
            elif getattr(cache, _PRUNED_PREFILL, None) is not prefill.cached:
                raise PruningError(f"decoder layer {stage.layer} got another KV cache than the earlier drop stages")
            prefill.cached.stages.append((stage.layer, held_positions))
        prefill.held = held_positions
        prefill.image_kept = image_kept
        prefill.stages.append((stage.layer, prefill.image_kept))
        prefill.shortened = shortened
        kwargs = {**kwargs, **shortened}
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _drop_and_add(self, stage_index, args, kwargs, hidden, keep, current, kept, image_scores, image_kept, table):
        """A stage that adds tokens (:meth:`Method.recycle_tokens`) after dropping: each image's new tokens go right after
        its last kept visual token; they take the prefill columns of dropped tokens of that image (for decode-step
        masks) and new image token ids N, N + 1, ... (for the records and the later stages). Positions: compact
        (renumbered), or original (each new token takes the position of the dropped token whose column it takes)."""
        prefill, stage = self._prefill, self.schedule[stage_index]
        batch, length, width = hidden.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        images = prefill.image_positions.shape[1]
        rows, held = image_scores.shape
        added, short = stage.added, keep.shape[1]
        device = hidden.device
        # the dropped tokens of every image (indices into its held tokens, in order), their layer outputs and scores
        dropped_mask = torch.ones(rows, held, dtype=torch.bool, device=device)
        dropped_mask.scatter_(1, kept, False)
        dropped = dropped_mask.nonzero()[:, 1].view(rows, held - stage.keep)
        if added > dropped.shape[1]:
            raise PruningError(f"stage at layer {stage.layer} adds {added} tokens but drops only {dropped.shape[1]}")
        dropped_current = current.view(rows, held).gather(1, dropped).view(batch, -1)
        dropped_hidden = _take(hidden, dropped_current, dim=1).view(rows, -1, width)
        dropped_scores = image_scores.gather(1, dropped)
        new_tokens = []
        for row in range(rows):
            try:
                tokens = self.method.recycle_tokens(dropped_hidden[row], dropped_scores[row], stage_index)
                candidates = self.method.recycle_candidates(dropped_hidden.shape[1])
                if candidates:  # the pairwise distances among the candidates (the counted arithmetic)
                    prefill.scoring[row // images].append(("recycle", candidates, candidates))
            except ValueError as exc:
                raise PruningError(f"{self.method.name} recycling failed: {exc}") from exc
            if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (added, width):
                got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
                raise PruningError(f"{self.method.name} recycled {got}; expected ({added}, {width})")
            new_tokens.append(tokens.to(device=device, dtype=hidden.dtype))
        new_hidden = torch.stack(new_tokens).view(batch, images * added, width)
        new_columns = table.gather(1, image_kept).gather(1, dropped[:, :added]).view(batch, images * added)

        # order: the kept sequence with each image's new tokens after its last kept visual token
        kept_current = current.view(rows, held).gather(1, kept).view(batch, images, stage.keep)
        after = torch.searchsorted(keep, kept_current.amax(dim=2))  # [B, images] index in ``keep``
        step = added + 1
        keys = torch.cat(
            [
                torch.arange(short, device=device).expand(batch, short) * step,
                after.repeat_interleave(added, dim=1) * step + 1 + torch.arange(added, device=device).repeat(images),
            ],
            dim=1,
        )
        order = keys.argsort(dim=1, stable=True)
        source = torch.cat([keep, torch.full((batch, images * added), -1, device=device)], dim=1).gather(1, order)
        is_new = source < 0
        hidden = torch.cat([_take(hidden, keep, dim=1), new_hidden], dim=1)
        hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, width))
        previous = keep if prefill.held is None else prefill.held.to(device).gather(1, keep)
        held_positions = torch.cat([previous, new_columns], dim=1).gather(1, order)
        real = (
            torch.ones_like(held_positions, dtype=torch.bool)
            if prefill.real is None
            else prefill.real.to(device).gather(1, held_positions)
        )
        if self.compact:
            position_ids = (real.long().cumsum(dim=1) - 1).masked_fill(~real, 1)  # HF's numbering of a padded row
            shortened: dict[str, Any] = {
                "position_ids": position_ids,
                "position_embeddings": self.rotary(hidden, position_ids),
            }
        else:  # original positions: a new token takes the position of the dropped token whose column it takes
            new_current = current.view(rows, held).gather(1, dropped[:, :added]).view(batch, images * added)
            at = torch.cat([keep, new_current], dim=1).gather(1, order)  # index in the current sequence
            cos, sin = kwargs["position_embeddings"]
            shortened = {"position_embeddings": (_take(cos, at, dim=1), _take(sin, at, dim=1))}
            if kwargs.get("position_ids") is not None:
                shortened["position_ids"] = _take(kwargs["position_ids"], at, dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (length, length):
                raise PruningError(
                    f"expected a [B, 1, {length}, {length}] attention mask in the prefill, got "
                    f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
                )
            index = source.clamp(min=0)
            old = _take(_take(mask, index, dim=2), index, dim=3)
            size = held_positions.shape[1]
            allowed = torch.ones(size, size, dtype=torch.bool, device=device).tril()[None, None] & real[:, None, None]
            fresh = (
                allowed
                if mask.dtype == torch.bool
                else torch.zeros((), dtype=mask.dtype, device=device).where(allowed, torch.finfo(mask.dtype).min)
            )
            involves_new = is_new[:, None, :, None] | is_new[:, None, None, :]
            mask = torch.where(involves_new, fresh, old)
        shortened["attention_mask"] = mask

        start = table.shape[1]
        ids = torch.arange(start, start + added, device=device).expand(rows, added)
        prefill.columns = torch.cat([table, new_columns.view(rows, added)], dim=1)
        image_kept = torch.cat([image_kept.gather(1, kept).sort(dim=1).values, ids], dim=1)
        return self._finish_stage(stage, args, kwargs, cache, hidden, shortened, held_positions, image_kept)

    def _text_raters(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Per batch row, the prefill positions of the method's text raters among the tokens after its image."""
        positions = self._prefill.image_positions
        if positions.shape[1] != 1:
            raise PruningError(
                f"{self.method.name} rates one image per sample by the text after it; got "
                f"{positions.shape[1]} images per row"
            )
        raters = []
        for row in range(embeds.shape[0]):
            image = positions[row, 0].to(embeds.device)
            after = torch.arange(int(image[-1]) + 1, embeds.shape[1], device=embeds.device)
            try:
                chosen = self.method.text_raters(embeds[row, image], embeds[row, after])
            except ValueError as exc:
                raise PruningError(f"{self.method.name} raters failed: {exc}") from exc
            if not isinstance(chosen, torch.Tensor) or chosen.dtype != torch.bool or chosen.shape != after.shape:
                raise PruningError(f"{self.method.name} text_raters must return [{len(after)}] bool")
            if not bool(chosen.any()):
                raise PruningError(f"{self.method.name} chose no text rater for batch row {row}")
            raters.append(after[chosen])
            self._prefill.choice.append(("rater_choice", len(after), len(image)))
        return raters

    def _rater_scores(self, stage: DropStage) -> torch.Tensor:
        """[B, T] mean over each row's raters of layer ``stage.layer - 1``'s head-averaged attention (its inputs
        were kept by its hook), T the length that layer ran on."""
        prefill = self._prefill
        try:
            hidden, kwargs = prefill.stash.pop(stage.layer - 1)
        except KeyError:
            raise PruningError(f"decoder layer {stage.layer - 1}'s inputs were not kept for its raters") from None
        batch = hidden.shape[0]
        inverse = None if prefill.held is None else _inverse(prefill.held.to(hidden.device), prefill.length)
        count = max(len(r) for r in prefill.raters)
        queries = torch.zeros(batch, count, dtype=torch.long, device=hidden.device)
        valid = torch.zeros(batch, count, dtype=torch.bool, device=hidden.device)
        for row, raters in enumerate(prefill.raters):
            raters = raters.to(hidden.device)
            current = raters if inverse is None else inverse[row].gather(0, raters)
            if bool((current < 0).any()):
                raise PruningError("a text rater is not in the sequence")
            queries[row, : len(current)], valid[row, : len(current)] = current, True
        return query_rows_attention(self.layers[stage.layer - 1], hidden, kwargs, queries, valid)

    def _check_cache(self, cache: Any, layer: int) -> None:
        if cache is None:
            return
        if not isinstance(cache, DynamicCache) or any(type(entry) is not DynamicLayer for entry in cache.layers):
            kinds = sorted({type(entry).__name__ for entry in getattr(cache, "layers", [])})
            raise PruningError(
                f"{self.method.name} leaves later decoder layers with a shorter KV cache, which needs a DynamicCache "
                f"of DynamicLayer's (HF generate's default); got {type(cache).__name__} with layers {kinds}"
            )
        if len(cache.layers) > layer and cache.layers[layer].get_seq_length() != 0:
            raise PruningError(
                f"{self.method.name} prunes a fresh prefill, but the KV cache already holds "
                f"{cache.layers[layer].get_seq_length()} tokens (continuing a cached conversation with "
                "new images is not supported)"
            )

    def _decode_step(self, index: int, args: tuple, kwargs: dict, hidden: torch.Tensor):
        """A layer from the first stage on, outside a prefill: align the attention mask with this layer's cache."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        record: PrunedPrefill | None = getattr(cache, _PRUNED_PREFILL, None) if cache is not None else None
        if record is None:
            return None  # a forward with neither images nor a pruned cache: nothing was pruned
        held_positions = record.held(index)
        if held_positions is None:
            return None  # a layer before the prefill's first stage holds the whole prefill
        batch, q_len = hidden.shape[:2]
        full = cache.layers[0].get_seq_length()  # layer 0 already holds this forward's tokens
        past_new = full - q_len - record.prefill_length  # tokens generated after the prefill, before this forward
        expected = held_positions.shape[1] + past_new
        held = cache.layers[index].get_seq_length()
        if held_positions.shape[0] != batch or past_new < 0 or held != expected:
            raise PruningError(
                f"decoder layer {index}'s KV cache holds {held} tokens for a batch of {batch}, but the pruned prefill "
                f"implies {expected} for a batch of {held_positions.shape[0]}: the cache was cropped, reordered across "
                "samples or reused in a way LLM-side pruning does not support"
            )
        changed: dict[str, Any] = {}
        if self.compact:
            # the prefill renumbered this layer's tokens: new tokens move down by the visual tokens it dropped
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise PruningError(f"{self.method.name} renumbers positions and needs the decoder's position_ids")
            shifted = position_ids - (record.prefill_length - held_positions.shape[1])
            changed["position_ids"] = shifted
            changed["position_embeddings"] = self.rotary(hidden, shifted)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != full:
                raise PruningError(
                    f"expected a [B, 1, {q_len}, {full}] attention mask in a decode step, got "
                    f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
                )
            later = torch.arange(record.prefill_length, full, device=held_positions.device).expand(batch, -1)
            columns = torch.cat([held_positions, later], dim=1).to(mask.device)
            changed["attention_mask"] = _take(mask, columns, dim=3)
        if not changed:
            return None
        return args, {**kwargs, **changed}


def install_decoder_drop(
    stack: ExitStack,
    session: PruningSession,
    model: nn.Module,
    language_model: nn.Module,
    visual_token_ids: Sequence[int],
    tokens_per_image: int | None = None,
    positions: str | None = None,
    visual_inputs: Sequence[str] = ("pixel_values",),
    refused_token_ids: dict[int, str] | None = None,
) -> VisualTokenDrop:
    """Install ``session.method``'s drop schedule on ``language_model`` (``.layers``, ``.rotary_emb``) and wrap
    ``model.forward`` (the family's multimodal model: it embeds, scatters the visual features, calls the decoder) so
    the plumbing knows where each forward's visual tokens are. What a family states, nothing else:

    visual_token_ids: the placeholder ids of the visual tokens the method prunes (LLaVA: the image token; Video-LLaVA:
        image and video tokens; Qwen2.5-VL: the image pad token).
    tokens_per_image: the tokens of every visual when the family fixes it (LLaVA-1.5: 576; a run of k * 576 is k
        images); None: every maximal run of visual tokens is one visual, and all of one forward must have the same
        count (LLaVA-NeXT's images of all their crops, Qwen2.5-VL's images, Video-LLaVA's images or videos).
    positions: the family's position rule (see :class:`VisualTokenDrop`); None: the method's.
    visual_inputs: forward arguments that carry visual inputs (a forward with any of them, or with encoder outputs
        computed beforehand by ``generate``, is a prefill).
    refused_token_ids: placeholder id -> why a prefill holding it cannot be pruned (Qwen2.5-VL's videos).
    """
    drop = VisualTokenDrop(session, language_model.layers, tokens_per_image, language_model.rotary_emb, positions)
    drop.install(stack)
    original = model.forward  # bound method of the class
    signature = inspect.signature(original)
    ids = [int(i) for i in visual_token_ids]
    refused = dict(refused_token_ids or {})

    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs") or {}
        input_ids, inputs_embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        images = any(bound.get(k, extra.get(k)) is not None for k in (*visual_inputs, "mm_encoder_outputs"))
        if input_ids is not None and images:  # a decode step may generate a visual token's id: not a visual
            for token, why in refused.items():
                if bool((input_ids == token).any()):
                    raise PruningError(f"{session.method.name}: {why}")
            image_mask = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        elif inputs_embeds is not None and images:  # HF's own rule: placeholders hold the token's embedding
            table = model.get_input_embeddings()
            image_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
            for token in ids:
                embedding = table(torch.tensor(token, device=inputs_embeds.device))
                image_mask |= (inputs_embeds == embedding).all(-1)
        else:
            image_mask = None
            cache = bound.get("cache", extra.get("past_key_values", bound.get("past_key_values")))
            prefill = cache is None or cache.get_seq_length() == 0
            if inputs_embeds is not None and inputs_embeds.shape[1] > 1 and prefill:
                # Embeddings with the image features already scattered in: nothing says where the images are,
                # and running unpruned would be a silent fallback.
                raise PruningError(
                    f"{session.method.name} needs input_ids (or pixel_values with placeholder embeddings) to "
                    "locate the image tokens; a prefill from pre-merged inputs_embeds cannot be pruned"
                )
        count = None
        if image_mask is not None and tokens_per_image is None and bool(image_mask.any()):
            count = visual_run_length(image_mask, session.method.name)
        with drop.forward(image_mask, bound.get("attention_mask"), count):
            return original(*args, **kwargs)

    patch_attribute(stack, model, "forward", forward)
    return drop


def visual_run_length(image_mask: torch.Tensor, name: str = "") -> int:
    """The token count of every visual in ``image_mask`` [B, T] (each maximal run of True is one visual); raises
    PruningError unless all runs of the batch have one length."""
    lengths: set[int] = set()
    for row in image_mask:
        positions = row.nonzero()[:, 0]
        if positions.numel():
            breaks = (positions.diff() != 1).nonzero()[:, 0] + 1
            edges = [0, *breaks.tolist(), positions.numel()]
            lengths.update(b - a for a, b in pairwise(edges))
    if len(lengths) != 1:
        raise PruningError(
            f"{name} drops the visual tokens of every image of a forward at once and needs images of one token count; "
            f"got images of {sorted(lengths)} tokens in one batch (images of different sizes: run batch_size=1 with "
            "one image per sample)"
        )
    return lengths.pop()


def own_last_query_attention(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """[B, T] attention probabilities of the last token over all T tokens in decoder ``layer`` (heads averaged), from
    its input ``hidden`` [B, T, D] and its call's ``kwargs`` (position_embeddings, attention_mask), as the layer
    itself will compute them: input norm, q / k projections (only the last token's query), RoPE, causal softmax in
    float32. Used by "own" drop stages; only the last query row is computed (O(T) instead of O(T^2))."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)
    query = _head_norm(attn, "q_norm", attn.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim)).transpose(1, 2)
    key = _head_norm(attn, "k_norm", attn.k_proj(normed).view(batch, length, -1, head_dim)).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    query = _rotate(query, cos[:, -1:], sin[:, -1:])
    key = _rotate(key, cos, sin)
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise PruningError(f"decoder layer has {heads} query heads and {kv_heads} key heads")
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scaling  # [B, H, 1, T]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != length:
            raise PruningError(
                f"expected a [B, 1, T, {length}] attention mask, got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        row = mask[:, :, -1:, :]
        logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float()
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]


def query_rows_attention(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, queries: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """[B, T] mean over the ``valid`` query rows ``queries`` [B, R] (sequence indices) of decoder ``layer``'s
    attention probabilities (heads averaged), from its inputs as the layer computes them: norm, q / k projections,
    RoPE, causal softmax (each query sees the keys up to itself, and the padding mask) in float32."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)
    rows = _take(normed, queries, dim=1)
    query = _head_norm(attn, "q_norm", attn.q_proj(rows).view(batch, queries.shape[1], -1, head_dim)).transpose(1, 2)
    key = _head_norm(attn, "k_norm", attn.k_proj(normed).view(batch, length, -1, head_dim)).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    query = _rotate(query, _take(cos, queries, dim=1), _take(sin, queries, dim=1))
    key = _rotate(key, cos, sin)
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scaling  # [B, H, R, T]
    causal = torch.arange(length, device=hidden.device)[None, None, :] <= queries[:, :, None]  # [B, R, T]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        row_mask = _take(mask, queries, dim=2)[:, 0]  # [B, R, T]
        causal = causal & (row_mask if row_mask.dtype == torch.bool else row_mask == 0)
    causal = causal | ~valid[:, :, None]  # unused query slots (index 0, maybe padding): any finite row, weighted 0
    logits = logits.masked_fill(~causal[:, None], float("-inf"))
    probabilities = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, R, T]
    weights = valid.float()
    return (probabilities * weights[:, :, None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)


def _head_norm(attn: nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    """``attn``'s per-head norm ``name`` (Qwen3's q_norm / k_norm, on [B, T, heads, d] before RoPE) if it has one."""
    norm = getattr(attn, name, None)
    return states if norm is None else norm(states)


def _inverse(held: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T'] prefill columns the sequence holds -> [B, length] index of each column in the sequence (-1: none)."""
    inverse = torch.full((held.shape[0], length), -1, dtype=torch.long, device=held.device)
    order = torch.arange(held.shape[1], device=held.device).expand_as(held)
    return inverse.scatter_(1, held, order)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE on x [B, heads, T, d] with cos / sin [B, T, d] (rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _take(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Select ``index`` [B, K] (per batch row) along ``dim`` of ``tensor`` [B or 1, ...]."""
    batch = index.shape[0]
    if tensor.shape[0] not in (1, batch):
        raise PruningError(f"cannot index a tensor of shape {tuple(tensor.shape)} with {batch} rows")
    tensor = tensor.expand(batch, *tensor.shape[1:])
    shape = [1] * tensor.dim()
    shape[0], shape[dim] = batch, index.shape[1]
    expanded = index.to(tensor.device).view(shape).expand(*tensor.shape[:dim], index.shape[1], *tensor.shape[dim + 1 :])
    return tensor.gather(dim, expanded)
