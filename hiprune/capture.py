"""Attention scores of a few chosen encoder layers, while every layer keeps its fast attention kernel.

transformers 5 returns no attention probabilities under SDPA/flash, and ``output_attentions=True`` switches the
whole tower to eager and materialises every layer's H x T x T map (what the official HiPrune code does). Here only
the attention modules of the requested layers are rerouted, through a registered attention function that

1. computes the layer's output with the model's own attention implementation (so outputs are bit-identical to an
   unpruned run), and
2. computes softmax(QK^T * scale + mask) from the same (already projected / rotated) queries and keys, reduced
   at once to one score per key: mean over heads, then over queries. Only that [B, T] vector is kept.

Only the rerouted modules get a private shallow copy of their config naming the capture function; all other layers
and the shared config object are untouched, and everything is restored on exit.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_IMPLEMENTATION = "hiprune_capture"
# Probabilities materialised at once (float32 elements, ~256 MB): whole layers for CLIP-sized maps in one pass,
# head chunks for long sequences, so the extra memory stays bounded.
_MAX_CHUNK_ELEMENTS = 64 * 2**20


QUERY_MODES = ("all", "cls", "last")


# What a capture can record from one layer: its attention (a per-key score), its keys (mean over heads), its output
# hidden states, or its scaled queries and keys ("query_key": [2, B, H, T, Dh], key heads repeated to the query heads;
# for scores over several calls of one layer, e.g. a windowed block's windows scored as one sequence).
KINDS = ("attention", "keys", "hidden", "query_key")


@dataclass(frozen=True)
class Tap:
    """One recording: under ``name``, the ``kind`` of a module's work (attention: with ``queries`` rows)."""

    name: str
    kind: str = "attention"
    queries: str = "all"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown capture kind {self.kind!r}; expected one of {KINDS}")
        if self.queries not in QUERY_MODES:
            raise ValueError(f"unknown attention query mode {self.queries!r}; expected one of {QUERY_MODES}")


@dataclass
class _Route:
    sink: Capture
    taps: list[Tap]
    original: Callable


def key_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Mean attention each key receives: [B, H, Tq, Dh] x [B, Hk, Tk, Dh] -> [B, Tk] (float32).

    Equal to ``global_attention(softmax(q k^T * scaling + mask), skip_cls=False)`` without holding all heads'
    maps at once. ``attention_mask`` is additive (eager: 0 / large negative) or boolean (SDPA: True = attend).
    """
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key head serves several query heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    chunk = max(1, min(heads, _MAX_CHUNK_ELEMENTS // max(1, batch * q_len * k_len)))
    total = torch.zeros(batch, k_len, dtype=torch.float32, device=query.device)
    for start in range(0, heads, chunk):
        q = query[:, start : start + chunk].float() * scaling  # scale the (smaller) queries, not the T x T logits
        k = key[:, start : start + chunk].float()
        # One T x T buffer per chunk, worked on in place: softmax = exp(x - row max) / row sum, and the column
        # sums of the probabilities are one product with the reciprocal row sums, so no second T x T buffer.
        logits = torch.matmul(q, k.transpose(-1, -2))
        if attention_mask is not None:
            mask = attention_mask[..., : k.shape[2]]
            if mask.dtype == torch.bool:  # SDPA-style mask: True where a query may attend
                logits.masked_fill_(~mask, float("-inf"))
            else:  # additive mask (eager): 0 or a large negative value
                logits.add_(mask.float())
        weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        inverse_row_sums = weights.sum(dim=-1, keepdim=True).reciprocal_()  # [B, h, Tq, 1]
        total += torch.matmul(inverse_row_sums.transpose(-1, -2), weights).sum(dim=1).squeeze(1)  # [B, Tk]
    return total / (heads * q_len)


def _original_attention(module: nn.Module, implementation: str | None) -> Callable:
    if implementation in (None, "eager"):
        # Each modeling file defines its own eager function; the module's file is where the model would look.
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"cannot find the eager attention function of {type(module).__name__}")
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _capture_attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    route: _Route = module._hiprune_route
    output = route.original(module, query, key, value, attention_mask, *args, **kwargs)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = args[0] if args else query.shape[-1] ** -0.5
    with torch.no_grad():
        for tap in route.taps:
            if tap.kind == "keys":  # [B, Tk, Dh]: the keys the layer attended with (after any rotary), heads averaged
                route.sink.record(tap.name, key.detach().float().mean(dim=1))
            elif tap.kind == "query_key":  # key_scores(q, k, None, 1.0) of these equals the layer's unmasked scores
                k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
                route.sink.record(tap.name, torch.stack([query.detach().float() * scaling, k.detach().float()]))
            else:
                route.sink.record(tap.name, _query_scores(tap.queries, query, key, attention_mask, scaling))
    return output


def _query_scores(queries: str, query, key, attention_mask, scaling) -> torch.Tensor:
    if queries == "cls":  # the CLS token's attention row only (token 0), as CLS-attention pruning methods use
        query = query[:, :, :1]
        attention_mask = attention_mask[..., :1, :] if attention_mask is not None else None
    elif queries == "last":  # the last token's row only (FastV: the last prompt token of a left-padded batch)
        query = query[:, :, -1:]
        attention_mask = attention_mask[..., -1:, :] if attention_mask is not None else None
    return key_scores(query, key, attention_mask, scaling)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)


class Capture:
    """Context manager: while active, every tapped module records what its taps ask for.

    ``taps`` maps an attention module (kinds "attention", "keys") or a layer module (kind "hidden": its output
    hidden states, through a forward hook) to its taps. One module may carry several taps (e.g. the CLS row and the
    keys of one layer). A module that runs several times in one forward (e.g. per image chunk) has its results
    concatenated on dim 0 by :meth:`collect`, or kept per call in :attr:`chunks`.
    """

    def __init__(self, taps: Mapping[nn.Module, Sequence[Tap]]):
        self.taps = {module: list(module_taps) for module, module_taps in taps.items()}
        names = [tap.name for module_taps in self.taps.values() for tap in module_taps]
        if len(names) != len(set(names)):
            raise ValueError(f"capture names must be distinct, got {names}")
        self.names = names
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._saved: list[tuple[nn.Module, object]] = []
        self._hooks: list = []

    @property
    def chunks(self) -> dict[str, list[torch.Tensor]]:
        """name -> what each call recorded since the last collect, in call order."""
        return self._parts

    def record(self, name: str, value: torch.Tensor) -> None:
        self._parts.setdefault(name, []).append(value)

    def collect(self) -> dict[str, torch.Tensor]:
        """Recorded since the last collect (name -> [B, T] or [B, T, D]); clears them."""
        missing = [n for n in self.names if n not in self._parts]
        if missing:
            raise RuntimeError(f"attention of layer(s) {missing} was not computed in this forward pass")
        out = {n: torch.cat(parts, dim=0) for n, parts in self._parts.items()}
        self._parts.clear()
        return out

    def __enter__(self) -> Capture:
        try:
            for module, module_taps in self.taps.items():
                hidden = [tap for tap in module_taps if tap.kind == "hidden"]
                routed = [tap for tap in module_taps if tap.kind != "hidden"]
                if hidden:
                    self._hooks.append(module.register_forward_hook(self._hidden_hook(hidden)))
                if routed:
                    self._reroute(module, routed)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _hidden_hook(self, taps: list[Tap]):
        def hook(module: nn.Module, args, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            for tap in taps:
                self.record(tap.name, hidden.detach())

        return hook

    def _reroute(self, module: nn.Module, taps: list[Tap]) -> None:
        if not hasattr(module, "config"):
            raise TypeError(f"{type(module).__name__} has no config; cannot reroute its attention")
        original_config = module.config
        private = copy.copy(original_config)
        private._attn_implementation_internal = CAPTURE_IMPLEMENTATION
        original = _original_attention(module, original_config._attn_implementation)
        module._hiprune_route = _Route(self, taps, original)
        module.config = private
        self._saved.append((module, original_config))

    def __exit__(self, *exc) -> None:
        for module, original_config in self._saved:
            module.config = original_config
            del module._hiprune_route
        for handle in self._hooks:
            handle.remove()
        self._saved.clear()
        self._hooks.clear()
        self._parts.clear()


class AttentionScores(Capture):
    """Capture of attention scores only: each named attention module records its per-key score.

    >>> with AttentionScores({"object": layers[8].self_attn, "deep": layers[22].self_attn}) as cap:
    ...     model(...)
    >>> cap.collect()["object"]  # [B, T]
    """

    def __init__(self, modules: Mapping[str, nn.Module], queries: str = "all"):
        if queries not in QUERY_MODES:
            raise ValueError(f"unknown attention query mode {queries!r}; expected one of {QUERY_MODES}")
        taps: dict[nn.Module, list[Tap]] = {}
        for name, module in modules.items():
            if module in taps:
                raise ValueError("one attention module can be captured under one name only")
            taps[module] = [Tap(name, "attention", queries)]
        super().__init__(taps)
        self.queries = queries
        self.modules = dict(modules)
