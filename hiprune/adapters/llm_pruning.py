"""LLM-side pruning plumbing: drop visual tokens inside a Llama-style decoder during prefill (FastV).

How it enters a transformers 5 decoder (``LlamaModel``) without replacing its forward:

- The family adapter wraps its multimodal forward in :meth:`VisualTokenDrop.forward`, which is told where the image
  tokens are (a [B, T] mask). A forward with image tokens is a *prefill*; any other forward is a decode step (or a
  text-only call).
- During a prefill, layer K-1's attention module is rerouted through :class:`hiprune.capture.AttentionScores` with
  the "last" query mode: the layer's output still comes from the model's own kernel, and the last token's attention
  row (mean over heads) is recorded on the side.
- A forward pre-hook on layer K asks the method which visual tokens of each image to keep, then replaces the layer's
  inputs with the kept positions only: hidden states, position embeddings (cos, sin of the *original* positions),
  position ids and the 4-D attention mask (rows and columns). Hooks on layers K+1..L-1 hand them the same shortened
  inputs (``LlamaModel`` gives every layer the full-length ones). The decoder output, and so the logits, then cover
  the kept positions only (text + kept visual tokens, in order).
- The kept positions are stored on the KV cache object. In later (decode) forwards the hooks of layers >= K drop
  the pruned prefill columns from the attention mask (when there is one: padding, or eager attention), so each
  layer's mask matches its own, shorter cache. New tokens' positions continue the unpruned numbering (HF computes
  them from layer 0's cache or the 2-D attention mask), as in the official code. Without a KV cache
  (``use_cache=False``) every generation step is a prefill and selects again from its own last token.
- Every pruned prefill appends a :class:`~hiprune.adapters.base.LayerRecord` to the session: the sequence length
  each decoder layer ran on, the visual tokens among them, and the kept indices of every image.

Supported: Llama decoders under eager or SDPA attention, ``DynamicCache`` (HF ``generate``'s default; greedy,
sampling and beam search -- beams of one sample share its prefill, so reordering them leaves the kept positions
valid) or no cache, left-padded batches with the same number of images in every row. Anything else (StaticCache,
a cache cropped into the prefill or pre-filled by another forward, right padding, flash/flex attention, a prepared 4-D mask) raises
a PruningError naming it rather than running unpruned or misaligned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from hiprune.adapters.base import LayerRecord, PruningError, PruningSession
from hiprune.capture import AttentionScores
from hiprune.methods.base import Method, resolve_budget

SUPPORTED_DECODERS = ("llama",)
SUPPORTED_ATTENTION = ("eager", "sdpa")
# Attribute of the KV cache object holding what a pruned prefill kept (the cache lives as long as the generation).
_PRUNED_PREFILL = "_hiprune_pruned_prefill"


def check_llm_method(method: Method, text_config: Any, family: str) -> None:
    """Raise ValueError if this plumbing cannot run ``method`` on a decoder with ``text_config``."""
    if not hasattr(method, "select_from_attention") or not hasattr(method, "layer"):
        raise ValueError(
            f"method {method.name!r} prunes inside the LLM in a way the {family} adapter does not implement "
            "(it supports one drop at layer K ranked by layer K-1's last-query attention, i.e. FastV)"
        )
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_DECODERS:
        raise ValueError(
            f"method {method.name!r} needs a decoder of type {SUPPORTED_DECODERS}; this {family} model's LLM is "
            f"{model_type!r}"
        )
    n_layers = text_config.num_hidden_layers
    if not 1 <= method.layer < n_layers:
        raise ValueError(
            f"method {method.name!r} prunes from decoder layer {method.layer} (0-based), but this LLM has "
            f"{n_layers} layers: layer must lie in 1..{n_layers - 1}"
        )
    implementation = getattr(text_config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"method {method.name!r} shortens the decoder's attention masks, which is implemented for "
            f"attn_implementation {SUPPORTED_ATTENTION}; this LLM uses {implementation!r}"
        )


@dataclass
class PrunedPrefill:
    """Kept by the KV cache of a pruned prefill: which prefill positions layers >= K hold."""

    keep: torch.Tensor  # [B, T'] sorted prefill positions (text, padding and kept visual tokens)
    prefill_length: int  # T


@dataclass
class _Prefill:
    """State of one prefill forward while it runs."""

    image_positions: torch.Tensor  # [B, images per row, tokens per image] sequence positions of every image token
    capture: AttentionScores
    layer_tokens: list[int] = field(default_factory=list)  # sequence length each decoder layer ran on
    shortened: dict[str, Any] | None = None  # layer inputs for layers > K, set by layer K's hook
    indices: torch.Tensor | None = None  # [B * images, kept] kept indices within each image


class VisualTokenDrop:
    """FastV-style drop of visual tokens before decoder layer ``method.layer``, installed on ``decoder_layers``.

    tokens_per_image: visual tokens of one image in the sequence (LLaVA-1.5: 576).
    """

    def __init__(self, session: PruningSession, decoder_layers: nn.ModuleList, tokens_per_image: int):
        self.session = session
        self.method = session.method
        self.layers = decoder_layers
        self.prune_layer = int(self.method.layer)
        if not 1 <= self.prune_layer < len(decoder_layers):
            raise ValueError(f"prune layer {self.prune_layer} outside 1..{len(decoder_layers) - 1}")
        self.tokens_per_image = int(tokens_per_image)
        self.budget = resolve_budget(self.method.budget, self.tokens_per_image)
        self._prefill: _Prefill | None = None

    # --- installation --------------------------------------------------------------------------------------
    def install(self, stack: ExitStack) -> None:
        """Register the layer hooks; the stack removes them."""
        for index, layer in enumerate(self.layers):
            handle = layer.register_forward_pre_hook(self._make_hook(index), with_kwargs=True)
            stack.callback(handle.remove)

    @contextmanager
    def forward(self, image_mask: torch.Tensor | None, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Wrap one multimodal forward. image_mask: [B, T] True at image tokens (None or all False: no prefill)."""
        if self._prefill is not None:
            raise PruningError("a forward started while another pruned prefill was still running (re-entrant call)")
        if image_mask is None or not bool(image_mask.any()):
            yield
            return
        image_positions = self._image_positions(image_mask)
        self._check_padding(attention_mask, image_mask.shape)
        attention = self.layers[self.prune_layer - 1].self_attn
        with AttentionScores({"last": attention}, queries="last") as capture:
            self._prefill = _Prefill(image_positions=image_positions, capture=capture)
            try:
                yield
                prefill = self._prefill
                if len(prefill.layer_tokens) != len(self.layers) or prefill.indices is None:
                    raise PruningError(
                        f"the prefill ran {len(prefill.layer_tokens)} of {len(self.layers)} decoder layers through "
                        f"the pruning hooks and {'did not reach' if prefill.indices is None else 'reached'} layer "
                        f"{self.prune_layer}; the decoder was not called the way the plumbing expects"
                    )
                n_visual = image_positions.shape[1] * image_positions.shape[2]
                n_kept = image_positions.shape[1] * self.budget
                self.session.layer_records.append(
                    LayerRecord(
                        tokens=list(prefill.layer_tokens),
                        visual=[n_visual if i < self.prune_layer else n_kept for i in range(len(self.layers))],
                        indices=prefill.indices.detach().cpu(),
                    )
                )
            finally:
                self._prefill = None

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

    # --- hooks ---------------------------------------------------------------------------------------------
    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None:
                raise PruningError(f"decoder layer {index} was called without hidden states")
            prefill = self._prefill
            if prefill is not None:
                if index < self.prune_layer:
                    prefill.layer_tokens.append(hidden.shape[1])
                    return None
                if index == self.prune_layer:
                    args, kwargs = self._drop(module, args, kwargs, hidden)
                elif prefill.shortened is None:
                    raise PruningError(f"decoder layer {index} ran before layer {self.prune_layer} pruned")
                else:
                    kwargs = {**kwargs, **prefill.shortened}
                    hidden = args[0] if args else kwargs["hidden_states"]
                    expected = prefill.layer_tokens[self.prune_layer]
                    if hidden.shape[1] != expected:
                        raise PruningError(f"decoder layer {index} got {hidden.shape[1]} tokens, expected {expected}")
                prefill.layer_tokens.append((args[0] if args else kwargs["hidden_states"]).shape[1])
                return args, kwargs
            if index < self.prune_layer:
                return None
            return self._decode_step(index, args, kwargs, hidden)

        return hook

    def _drop(self, module: nn.Module, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """Layer K of a prefill: choose the kept tokens and shorten every layer input."""
        prefill = self._prefill
        batch, length = hidden.shape[:2]
        implementation = module.self_attn.config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise PruningError(f"attn_implementation {implementation!r} is not supported (only {SUPPORTED_ATTENTION})")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._check_cache(cache)
        try:
            scores = prefill.capture.collect()["last"]
        except RuntimeError as exc:
            raise PruningError(f"layer {self.prune_layer - 1}'s attention was not captured: {exc}") from exc
        if scores.shape != (batch, length):
            raise PruningError(f"last-query attention has shape {tuple(scores.shape)}, expected ({batch}, {length})")
        positions = prefill.image_positions.to(hidden.device)
        _, images, per_image = positions.shape
        if positions.shape[0] != batch or int(positions.max()) >= length:
            raise PruningError("the image token mask does not match the decoder's input sequence")

        image_scores = scores.gather(1, positions.flatten(1)).view(batch * images, per_image)
        try:
            kept = self.method.select_from_attention(image_scores, self.budget)
        except ValueError as exc:
            raise PruningError(f"{self.method.name} selection failed: {exc}") from exc
        if kept.shape != (batch * images, self.budget) or kept.min() < 0 or kept.max() >= per_image:
            raise PruningError(
                f"{self.method.name} returned indices of shape {tuple(kept.shape)} in [{int(kept.min())}, "
                f"{int(kept.max())}]; expected {self.budget} of {per_image} per image"
            )
        kept = kept.to(hidden.device)
        kept_positions = positions.view(batch * images, per_image).gather(1, kept).view(batch, -1)
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        keep_mask.scatter_(1, positions.flatten(1), False)
        keep_mask.scatter_(1, kept_positions, True)
        short = length - images * (per_image - self.budget)
        if int(keep_mask.sum()) != batch * short:
            raise PruningError(f"{self.method.name} kept duplicate visual tokens")
        keep = keep_mask.nonzero()[:, 1].view(batch, short)  # row-major: each row's kept positions, sorted

        hidden = _take(hidden, keep, dim=1)
        shortened: dict[str, Any] = {}
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

        if cache is not None:
            setattr(cache, _PRUNED_PREFILL, PrunedPrefill(keep=keep, prefill_length=length))
        prefill.shortened = shortened
        prefill.indices = kept
        kwargs = {**kwargs, **shortened}
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _check_cache(self, cache: Any) -> None:
        if cache is None:
            return
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
            raise PruningError(
                f"{self.method.name} leaves later decoder layers with a shorter KV cache, which needs a DynamicCache "
                f"of DynamicLayer's (HF generate's default); got {type(cache).__name__} with layers {kinds}"
            )
        if len(cache.layers) > self.prune_layer and cache.layers[self.prune_layer].get_seq_length() != 0:
            raise PruningError(
                f"{self.method.name} prunes a fresh prefill, but the KV cache already holds "
                f"{cache.layers[self.prune_layer].get_seq_length()} tokens (continuing a cached conversation with "
                "new images is not supported)"
            )

    def _decode_step(self, index: int, args: tuple, kwargs: dict, hidden: torch.Tensor):
        """Layer >= K outside a prefill: align the attention mask with this layer's shorter cache."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        record: PrunedPrefill | None = getattr(cache, _PRUNED_PREFILL, None) if cache is not None else None
        if record is None:
            return None  # a forward with neither images nor a pruned cache: nothing was pruned
        batch, q_len = hidden.shape[:2]
        full = cache.layers[0].get_seq_length()  # layer 0 already holds this forward's tokens
        past_new = full - q_len - record.prefill_length  # tokens generated after the prefill, before this forward
        expected = record.keep.shape[1] + past_new
        held = cache.layers[index].get_seq_length()
        if record.keep.shape[0] != batch or past_new < 0 or held != expected:
            raise PruningError(
                f"decoder layer {index}'s KV cache holds {held} tokens for a batch of {batch}, but the pruned prefill "
                f"implies {expected} for a batch of {record.keep.shape[0]}: the cache was cropped, reordered across "
                "samples or reused in a way LLM-side pruning does not support"
            )
        mask = kwargs.get("attention_mask")
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != full:
            raise PruningError(
                f"expected a [B, 1, {q_len}, {full}] attention mask in a decode step, got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        later = torch.arange(record.prefill_length, full, device=record.keep.device).expand(batch, -1)
        columns = torch.cat([record.keep, later], dim=1).to(mask.device)
        return args, {**kwargs, "attention_mask": _take(mask, columns, dim=3)}


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
