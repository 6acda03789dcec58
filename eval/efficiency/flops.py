"""FLOPs of one sample through a LLaVA-style VLM, counted three ways.

1. :func:`tflops_fastv` -- the convention of FastV / VisionZip / DivPrune and most visual-token-pruning papers:
   per decoder layer ``4*n*d^2 + 2*n^2*d + 2*n*d*m`` (n tokens at that layer, d hidden size, m FFN size), summed over
   the LLM's layers, prefill only. Read term by term it counts multiply-accumulates (MACs), not FLOPs: ``4nd^2`` =
   the q/k/v/o projections at n*d*d MACs each, ``2n^2d`` = QK^T + AV at n*n*d MACs each (dense, not causal),
   ``2ndm`` = a two-matrix FFN. For a Llama LLM it therefore undercounts the real FLOPs by a bit more than 2x
   (MACs vs FLOPs, and SwiGLU has three FFN matrices), and it ignores the vision encoder, projector and lm_head.
   Comparable with the papers, not with hardware.

2. :func:`flops_exact` -- 2 x MACs of every matmul/convolution the HF model actually runs, from the config:
   CLIP vision tower (patch conv + *all* encoder layers: HF runs every layer even though LLaVA reads layer -2),
   2-layer projector, Llama-style LLM (grouped-query k/v projections, SwiGLU gate/up/down, QK^T and AV), lm_head,
   and optionally cached single-token decode steps. Norms, activations, softmax, rotary and residual adds are
   not counted (they are not matmuls; torch's FlopCounterMode does not count them either, and they are <0.5%).

3. :func:`flops_measured` -- ``torch.utils.flop_counter.FlopCounterMode`` around a real ``no_grad`` forward, with a
   formula for the CPU SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, which torch does not
   register, so attention would silently count as 0), split by module: vision tower / projector / language
   model / lm_head.

Attention under a causal mask ("dense" vs "triangular")
-------------------------------------------------------
HF Llama under SDPA passes ``is_causal=True`` and no mask tensor when there is no padding (prefill, q_len > 1).
On CPU that runs ``_scaled_dot_product_flash_attention_for_cpu``: it tiles queries and keys, skips key blocks that
lie entirely above the diagonal, but computes the diagonal blocks in full and masks afterwards. GPU flash kernels
do the same. The work done therefore lies between the n(n+1)/2 causal pairs and the n^2 dense pairs, depending on
block sizes. Two conventions are offered, identical in :func:`flops_exact` and :func:`flops_measured`:

- ``attention="dense"`` (default): every (query, key) pair, ``2 * 2 * Sq * Skv * heads * head_dim`` (QK^T and
  AV). This is torch's own convention for its registered SDPA formulas ("we aren't accounting for causal
  attention here"), what the math/eager backends and mask-carrying kernels compute, and what the FastV-style
  ``2n^2d`` term counts (in MACs).
- ``attention="triangular"``: only the pairs a causal kernel needs, sum over queries i of min(i + 1 + Skv - Sq, Skv)
  (SDPA's ``is_causal`` is top-left aligned; for prefill Sq == Skv this is n(n+1)/2), applied only where the
  kernel is actually called with ``is_causal=True``. A lower bound for block-skipping kernels.

The vision encoder is bidirectional (dense either way); a single-token decode step attends densely to its cache.

Paper numbers (HiPrune Table 5, paper_efficiency.csv) come from calflops, which hooks nn.Modules and torch
functionals but not ``F.scaled_dot_product_attention``: under SDPA it misses every QK^T/AV FLOP, so the paper's
TFLOPs equal the linear-layer part of :func:`flops_exact` (see ``attention_scores`` in its result).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from hiprune.adapters.llm_pruning import visual_per_layer
from hiprune.methods.base import DropStage, resolve_budget

__all__ = [
    "encoder_merges",
    "fastv_layer_flops",
    "flops_llm",
    "vision_method_costs",
    "fastv_tokens_per_layer",
    "flops_exact",
    "llm_scoring_flops",
    "flops_measured",
    "sdpa_flop_formulas",
    "tflops_fastv",
]

ATTENTION_CONVENTIONS = ("dense", "triangular")


# ------------------------------------------------------------------------------------------------------------------
# 1. FastV-style theoretical count
# ------------------------------------------------------------------------------------------------------------------
def fastv_layer_flops(n: int, hidden: int, ffn_intermediate: int) -> int:
    """``4*n*d^2 + 2*n^2*d + 2*n*d*m`` for one decoder layer holding ``n`` tokens (FastV Eq. for one layer)."""
    d, m = hidden, ffn_intermediate
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def tflops_fastv(n_layers: int, hidden: int, ffn_intermediate: int, tokens_per_layer: Sequence[int]) -> float:
    """FastV / VisionZip / DivPrune-convention prefill TFLOPs of the LLM: sum over layers of
    ``4*n_l*d^2 + 2*n_l^2*d + 2*n_l*d*m`` / 1e12, with ``n_l`` = tokens (text + visual) at decoder layer ``l``.

    ``tokens_per_layer`` has one entry per decoder layer, so LLM-side methods that drop tokens inside the decoder
    (FastV after layer K, or any drop schedule) are expressed directly; a method that prunes before the LLM (HiPrune, VisionZip) has the same count
    at every layer (see :func:`fastv_tokens_per_layer`).
    """
    tokens = list(tokens_per_layer)
    if n_layers <= 0 or hidden <= 0 or ffn_intermediate <= 0:
        raise ValueError("n_layers, hidden and ffn_intermediate must be positive")
    if len(tokens) != n_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens)} entries for {n_layers} layers")
    if any(int(n) != n or n < 0 for n in tokens):
        raise ValueError(f"token counts must be non-negative integers, got {tokens}")
    return sum(fastv_layer_flops(int(n), hidden, ffn_intermediate) for n in tokens) / 1e12


def fastv_tokens_per_layer(
    n_layers: int,
    n_text: int,
    n_visual: int,
    prune_after: int | None = None,
    n_visual_after: int | None = None,
    schedule: Sequence[DropStage] | None = None,
) -> list[int]:
    """Token count per decoder layer: ``n_text`` plus the visual tokens at that layer.

    schedule: an LLM-side method's drop schedule (``method.drop_schedule(n_visual, n_layers)``, any number of
        stages): ``n_visual`` before its first stage, each stage's ``keep`` from its layer on.
    prune_after, n_visual_after: one drop, ``n_text + n_visual`` in layers ``< prune_after`` and
        ``n_text + n_visual_after`` from layer ``prune_after`` on (FastV's K and R).
    With neither, the same count in every layer (pruning before the LLM)."""
    if schedule is not None:
        if prune_after is not None or n_visual_after is not None:
            raise ValueError("give either a drop schedule or prune_after / n_visual_after, not both")
        return [n_text + v for v in visual_per_layer(schedule, n_visual, n_layers)]
    if prune_after is None:
        return [n_text + n_visual] * n_layers
    if n_visual_after is None or not 0 <= prune_after <= n_layers:
        raise ValueError("prune_after needs n_visual_after and must lie in [0, n_layers]")
    return [n_text + (n_visual if layer < prune_after else n_visual_after) for layer in range(n_layers)]


# ------------------------------------------------------------------------------------------------------------------
# shared attention arithmetic
# ------------------------------------------------------------------------------------------------------------------
def _attention_pairs(q_len: int, kv_len: int, causal: bool, attention: str) -> int:
    """(query, key) pairs an SDPA call is counted for."""
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention must be one of {ATTENTION_CONVENTIONS}, got {attention!r}")
    if not causal or attention == "dense":
        return q_len * kv_len
    # is_causal in SDPA is top-left aligned: query i sees keys 0..min(i, kv_len - 1), i.e. sum_i min(i + 1, kv_len)
    # pairs; n(n+1)/2 for a prefill (q_len == kv_len).
    if q_len <= kv_len:
        return q_len * (q_len + 1) // 2
    return kv_len * (kv_len + 1) // 2 + (q_len - kv_len) * kv_len


def _sdpa_flops(batch: int, q_heads: int, qk_dim: int, v_dim: int, pairs: int) -> int:
    """QK^T (2 * pairs * qk_dim per head) + AV (2 * pairs * v_dim per head)."""
    return 2 * batch * q_heads * pairs * (qk_dim + v_dim)


# ------------------------------------------------------------------------------------------------------------------
# 2. Exact count from the architecture
# ------------------------------------------------------------------------------------------------------------------
def vision_method_costs(method: Any, config: Any, prompt_width: int | None = None) -> dict[str, Any]:
    """:func:`flops_exact`'s keyword arguments for what a vision- or encoder-stage method adds to the vision side of
    one image of a LLaVA-style ``config``: its score maps by query rows, its own selection arithmetic
    (``Method.selection_flops``; ``prompt_width``: the prompt embedding's width, for prompt-aware ones), tokens it
    projects on top, and an encoder-stage method's merges. Empty for other stages."""
    if method.stage == "encoder":
        return {"encoder_merges": encoder_merges(method, config)}
    if method.stage != "vision":
        return {}
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    budget = resolve_budget(method.budget, patches)
    widths = {"features": _get(config, "text_config", default=config).hidden_size, "hidden": vc.hidden_size,
              "keys": vc.hidden_size // vc.num_attention_heads}
    if prompt_width is not None:
        widths["prompt"] = int(prompt_width)
    return {
        "score_queries": [r.queries for r in method.requests().values() if r.kind == "attention"],
        "selection": method.selection_flops(patches, budget, widths),
        "projected_extra": method.projected_tokens(budget),
    }


def encoder_merges(method: Any, config: Any) -> list[int] | None:
    """The merge schedule an encoder-stage method (ToMe) runs on one image (crop, frame) of a LLaVA-style ``config``,
    for :func:`flops_exact`'s ``encoder_merges``; None for methods of other stages."""
    if method.stage != "encoder":
        return None
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    feature = _get(config, "vision_feature_layer", default=-2)
    layers = feature if feature >= 0 else vc.num_hidden_layers + 1 + feature
    return method.merge_schedule(patches, resolve_budget(method.budget, patches), layers)


def llm_scoring_flops(config: Any, ops: Sequence[tuple[str, int, int]]) -> int:
    """FLOPs of the scoring an LLM-side method's drop schedule ran for one batch row (``LayerRecord.scoring``: the
    plumbing's own arithmetic in the decoder, beyond the layers themselves), for :func:`flops_exact`'s
    ``llm_scoring``. Matmuls only, as everywhere here (d hidden, H / Hkv heads, hd head dim):

    - ("last", 1, n): the last token's attention row captured in the layer before a stage (FastV): QK^T and the
      column sums as one product, 2 * H * n * (hd + 1);
    - ("own", 1, n): the stage layer's own last-query row (PyramidDrop): q of one token, k of n tokens, QK^T:
      2 * d * H * hd + 2 * n * d * Hkv * hd + 2 * H * n * hd;
    - ("raters", R, n): R rater rows in the pruning layer (SparseVLM): 2 * R * d * H * hd + 2 * n * d * Hkv * hd +
      2 * H * R * n * hd (a batch computes every row with its largest R; this is the row alone);
    - ("rater_choice", M, N): text x image input embeddings, 2 * M * N * d;
    - ("recycle", c, c): pairwise distances of c candidates (torch.cdist's mm form), 2 * c * c * (d + 2).
    """
    tc = _get(config, "text_config", default=config)
    d, heads = tc.hidden_size, tc.num_attention_heads
    kv_heads = _get(tc, "num_key_value_heads", default=heads)
    head_dim = _get(tc, "head_dim", default=d // heads)
    total = 0
    for kind, queries, keys in ops:
        q, n = int(queries), int(keys)
        if kind == "last":
            total += 2 * heads * n * (head_dim + 1) * q
        elif kind in ("own", "raters"):
            total += 2 * q * d * heads * head_dim + 2 * n * d * kv_heads * head_dim + 2 * heads * q * n * head_dim
        elif kind == "rater_choice":
            total += 2 * q * n * d
        elif kind == "recycle":
            total += 2 * q * n * (d + 2)
        else:
            raise ValueError(f"unknown LLM scoring operation {kind!r}")
    return total


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def flops_exact(
    config: Any,
    n_text: int,
    n_visual_kept: int | Sequence[int],
    n_visual_encoder: int | None = None,
    decode_tokens: int = 0,
    *,
    n_images: int = 1,
    logits_to_keep: int = 0,
    attention: str = "dense",
    score_layers: int = 0,
    encoder_merges: Sequence[int] | None = None,
    score_queries: Sequence[str] | None = None,
    selection: int = 0,
    projected_extra: int = 0,
    llm_scoring: int = 0,
) -> dict[str, int]:
    """FLOPs (2 x MACs) of one sample through a LLaVA-1.5-style model (HF ``LlavaConfig``: CLIP vision tower,
    2-layer MLP projector, Llama-style LLM), as the HF implementation runs it.

    n_text: text tokens the LLM sees (everything that is not a visual token: system prompt, role tags, question).
    n_visual_kept: visual tokens the LLM sees (all images together). An int for pruning before the LLM (the same
        count in every decoder layer), or one count per decoder layer for LLM-side methods (FastV: 576 in layers
        0..K-1, fewer afterwards; each layer's queries, keys and KV cache have that layer's length).
    n_visual_encoder: patch tokens per image entering the CLIP encoder, CLS excluded (default
        (image_size / patch_size)^2 = 576 for CLIP-L/14-336). The encoder runs on n_visual_encoder + 1 tokens
        and the projector on n_visual_encoder tokens (strategy "default") or n_visual_encoder + 1 ("full"):
        pruning after the projector saves nothing in either.
    decode_tokens: cached single-token forward passes after the prefill. Step i (0-based) feeds one token that
        attends to n_l + i + 1 keys (its own included) in layer l, and runs the lm_head once.
        ``generate(max_new_tokens=K)`` makes K - 1 of them (the prefill yields the first token).
    n_images: images (or LLaVA-NeXT crops) per sample, each through the full encoder and projector.
    logits_to_keep: lm_head positions in the prefill: 0 = all positions (HF ``forward`` default, and what
        calflops / FlopCounterMode see on a plain forward); k = the last k (``generate`` prefill uses 1).
    attention: "dense" or "triangular" for causal LLM prefill attention; see the module docstring.
    score_layers: vision layers whose attention map is recomputed for token scoring (HiPrune: 2, the object and
        deep layers; each costs one extra QK^T, 2 * T^2 * hidden). Included in "vision", also shown as "scoring".
    encoder_merges: encoder-stage methods (ToMe): tokens merged in each encoder layer, from the first (the merge
        schedule that ran). Layer l's attention runs on its t_l input tokens and its MLP on t_l - r_l; the
        bipartite matching costs 2 * ceil(t_l / 2) * floor(t_l / 2) * head_dim (in "scoring"); the projector runs
        on what leaves the feature layer. The LLM still sees ``n_visual_kept``.
    score_queries: the query rows of each recomputed score map instead of ``score_layers`` full maps: "all" (every
        query: 2 * T^2 * (hidden + heads)) or "cls" / "last" (one row: 2 * T * (hidden + heads)).
    selection: a vision method's own selection arithmetic per image (``Method.selection_flops``), in "scoring".
    projected_extra: tokens per image a method sends through the projector on top of the patches (merged states, a
        CLS token passed on: ``Method.projected_tokens``).
    llm_scoring: an LLM-side method's scoring inside the decoder for this sample (:func:`llm_scoring_flops` of its
        ``LayerRecord.scoring``), in "llm_prefill" and "scoring".

    Returns FLOPs (not T) for "vision", "projector", "llm_prefill" (decoder layers), "lm_head" (prefill logits),
    "decode" (decoder layers and lm_head of all decode steps) and their sum "total"; plus two informational
    subsets that are *not* added again: "attention_scores" (all QK^T and AV FLOPs, vision + prefill + decode:
    what calflops misses under SDPA) and "scoring".
    """
    vc = config.vision_config
    tc = _get(config, "text_config", default=config)
    vision_type = getattr(vc, "model_type", None)
    if vision_type not in ("clip_vision_model", "clip"):
        raise NotImplementedError(f"flops_exact covers CLIP vision towers, got {vision_type!r}")
    if int(n_text) != n_text or n_text < 0 or decode_tokens < 0 or n_images < 1 or score_layers < 0:
        raise ValueError("n_text, decode_tokens and score_layers must be >= 0 and n_images >= 1")

    # --- vision tower: patch conv + every encoder layer ------------------------------------------------------
    dv = vc.hidden_size
    iv = vc.intermediate_size
    lv = vc.num_hidden_layers
    channels = _get(vc, "num_channels", default=3)
    patch = vc.patch_size
    patches = n_visual_encoder if n_visual_encoder is not None else (vc.image_size // patch) ** 2
    seq = patches + 1  # CLS
    conv = 2 * patches * dv * (channels * patch * patch)
    merges = [int(r) for r in (encoder_merges or [])] + [0] * (lv - len(encoder_merges or []))
    if len(merges) != lv or any(r < 0 for r in merges) or sum(merges) > patches:
        raise ValueError(f"encoder_merges must give at most {lv} layers a count >= 0, summing to <= {patches}")
    head_dim_v = dv // vc.num_attention_heads
    vision_layers = vision_attn = matching = 0
    t = seq
    for r in merges:
        attn_layer = _sdpa_flops(1, 1, dv, dv, _attention_pairs(t, t, False, attention))
        vision_layers += 2 * t * dv * (4 * dv) + 2 * (t - r) * dv * iv * 2 + attn_layer  # q,k,v,o | fc1,fc2 | attn
        vision_attn += attn_layer
        if r:
            matching += 2 * ((t + 1) // 2) * (t // 2) * head_dim_v
        t -= r
    # per scored layer: one extra QK^T (all heads), then the column sums of the softmax as one product with the
    # reciprocal row sums (hiprune.capture.key_scores): 2 * seq * seq * (head_dim + 1) per head
    rows = [seq if q == "all" else 1 for q in score_queries] if score_queries is not None else [seq] * score_layers
    scoring = n_images * (sum(2 * r * seq * (dv + vc.num_attention_heads) for r in rows) + matching + int(selection))
    vision_attn = n_images * vision_attn
    vision = n_images * (conv + vision_layers) + scoring

    # --- projector: linear_1 (vision features -> text hidden), activation, linear_2 ----------------------------
    d = tc.hidden_size
    feature_layer = _get(config, "vision_feature_layer", default=-2)
    proj_in = dv * (len(feature_layer) if isinstance(feature_layer, (list, tuple)) else 1)
    strategy = _get(config, "vision_feature_select_strategy", default="default")
    proj_tokens = patches - sum(merges) + (0 if strategy == "default" else 1) + int(projected_extra)
    projector = n_images * 2 * proj_tokens * (proj_in * d + d * d)

    # --- LLM -------------------------------------------------------------------------------------------------
    llm = flops_llm(config, n_text, n_visual_kept, decode_tokens, logits_to_keep=logits_to_keep, attention=attention,
                    llm_scoring=llm_scoring)
    llm_prefill, lm_head, decode = llm["llm_prefill"], llm["lm_head"], llm["decode"]
    scoring += int(llm_scoring)

    total = vision + projector + llm_prefill + lm_head + decode
    return {
        "vision": vision,
        "projector": projector,
        "llm_prefill": llm_prefill,
        "lm_head": lm_head,
        "decode": decode,
        "total": total,
        "attention_scores": vision_attn + llm["attention_scores"],
        "scoring": scoring,
    }


def flops_llm(
    config: Any,
    n_text: int,
    n_visual_kept: int | Sequence[int],
    decode_tokens: int = 0,
    *,
    logits_to_keep: int = 0,
    attention: str = "dense",
    llm_scoring: int = 0,
) -> dict[str, int]:
    """FLOPs (2 x MACs) of the LLM side of one sample: a Llama-style decoder (q, k, v, o, gate, up, down linears per
    layer, grouped-query attention with ``head_dim``; Llama, Vicuna, Qwen2, Qwen2.5 and Qwen3 alike: biases, norms,
    rotary and DeepStack additions not counted) and its lm_head. Arguments as :func:`flops_exact`'s, which adds the
    vision side. Returns "llm_prefill" (decoder layers, with ``llm_scoring``), "lm_head" (prefill logits), "decode"
    (decoder layers and lm_head of all decode steps) and "attention_scores" (QK^T and AV of prefill and decode)."""
    tc = _get(config, "text_config", default=config)
    d = tc.hidden_size
    n_layers = tc.num_hidden_layers
    heads = tc.num_attention_heads
    kv_heads = _get(tc, "num_key_value_heads", default=heads)
    head_dim = _get(tc, "head_dim", default=d // heads)
    m = tc.intermediate_size
    vocab = tc.vocab_size
    if isinstance(n_visual_kept, Sequence):
        visual = [int(v) for v in n_visual_kept]
        if len(visual) != n_layers:
            raise ValueError(f"n_visual_kept has {len(visual)} per-layer entries for {n_layers} decoder layers")
    else:
        visual = [int(n_visual_kept)] * n_layers
    if any(v < 0 for v in visual):
        raise ValueError("visual token counts must be >= 0")
    tokens = [int(n_text) + v for v in visual]

    # per token: q (d -> H*hd), k and v (d -> Hkv*hd each), o (H*hd -> d), gate and up (d -> m), down (m -> d)
    linear_per_token = 2 * (d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d + 3 * d * m)
    llm_linear = sum(n * linear_per_token for n in tokens)
    llm_attn = sum(_sdpa_flops(1, heads, head_dim, head_dim, _attention_pairs(n, n, n > 1, attention)) for n in tokens)
    if int(llm_scoring) < 0:
        raise ValueError("llm_scoring must be >= 0")
    llm_prefill = llm_linear + llm_attn + int(llm_scoring)

    last = tokens[-1]
    positions = last if logits_to_keep == 0 else min(int(logits_to_keep), last)
    lm_head_per_token = 2 * d * vocab
    lm_head = positions * lm_head_per_token

    # --- decode: one token per step, attending to the growing cache ----------------------------------------------
    decode_attn = 0
    for step in range(decode_tokens):
        # q_len = 1: HF passes is_causal=False (nothing to mask), the kernel attends to every cached key.
        decode_attn += sum(_sdpa_flops(1, heads, head_dim, head_dim, n + step + 1) for n in tokens)
    decode = decode_tokens * (n_layers * linear_per_token + lm_head_per_token) + decode_attn

    return {"llm_prefill": llm_prefill, "lm_head": lm_head, "decode": decode,
            "attention_scores": llm_attn + decode_attn}


# ------------------------------------------------------------------------------------------------------------------
# 3. Measured count
# ------------------------------------------------------------------------------------------------------------------
_aten = torch.ops.aten

# Position of ``is_causal`` among the positional arguments of each SDPA backend op (from the aten schemas).
_IS_CAUSAL_ARG = {
    "_scaled_dot_product_flash_attention_for_cpu": 4,  # (q, k, v, dropout_p, is_causal, *, attn_mask, scale)
    "_scaled_dot_product_flash_attention": 4,  # (q, k, v, dropout_p, is_causal, return_debug_mask, *, scale)
    "_scaled_dot_product_efficient_attention": 6,  # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal)
    "_scaled_dot_product_cudnn_attention": 6,  # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, ...)
}


def _make_sdpa_formula(causal_index: int, attention: str):
    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        # [B, Hq, Sq, Dqk] x [B, Hkv, Skv, Dqk] x [B, Hkv, Skv, Dv]; grouped-query kernels broadcast k/v heads,
        # so the work is per query head.
        batch, q_heads, q_len, qk_dim = query_shape
        kv_len = key_shape[2]
        v_dim = value_shape[3]
        rest = (query_shape, key_shape, value_shape, *args)
        causal = bool(kwargs.get("is_causal", rest[causal_index] if len(rest) > causal_index else False))
        pairs = _attention_pairs(q_len, kv_len, causal, attention)
        return _sdpa_flops(batch, q_heads, qk_dim, v_dim, pairs)

    return formula


def sdpa_flop_formulas(attention: str = "dense") -> dict[Any, Any]:
    """``custom_mapping`` for FlopCounterMode: every SDPA backend op, the CPU one included, counted as QK^T + AV
    under the chosen convention. (Passed per counter rather than registered globally: torch's
    ``register_flop_formula`` refuses a second registration and would leak into every FlopCounterMode.)"""
    if attention not in ATTENTION_CONVENTIONS:
        raise ValueError(f"attention must be one of {ATTENTION_CONVENTIONS}, got {attention!r}")
    mapping = {}
    for name, index in _IS_CAUSAL_ARG.items():
        op = getattr(_aten, name, None)
        if op is not None:
            mapping[op] = _make_sdpa_formula(index, attention)
    return mapping


def cdist_flop_formulas() -> dict[Any, Any]:
    """``custom_mapping`` for FlopCounterMode: torch.cdist (SparseVLM's recycling), which torch does not count,
    counted as the matmul of its mm-based form, 2 * P * R * (M + 2)."""
    return {op: _cdist_formula for op in (getattr(_aten, n, None) for n in ("_euclidean_dist", "_cdist_forward")) if op}


def _cdist_formula(x1_shape, x2_shape, *args, out_shape=None, **kwargs) -> int:
    """[..., P, M] x [..., R, M] pairwise distances: the product of [P, M + 2] and [M + 2, R] that torch's mm form
    computes (both operands extended by the squared norms and ones), for every leading batch entry."""
    batch = 1
    for size in x1_shape[:-2]:
        batch *= int(size)
    return 2 * batch * int(x1_shape[-2]) * int(x2_shape[-2]) * (int(x1_shape[-1]) + 2)


# Module names that identify each part; the shortest matching path wins.
_PARTS = {
    "vision": ("vision_tower", "visual", "vision_model"),
    "projector": ("multi_modal_projector", "mm_projector"),
    "language_model": ("language_model",),
    "lm_head": ("lm_head",),
}


def _part_paths(model: torch.nn.Module) -> dict[str, str]:
    found: dict[str, str] = {}
    for path, _ in model.named_modules():
        if not path:
            continue
        last = path.rsplit(".", 1)[-1]
        for part, names in _PARTS.items():
            if last in names and (part not in found or path.count(".") < found[part].count(".")):
                found[part] = path
    decoder = getattr(model, "model", None)
    if "language_model" not in found and "lm_head" in found and isinstance(decoder, torch.nn.Module):
        found["language_model"] = "model"  # a bare *ForCausalLM: decoder under .model
    return found


def flops_measured(model: torch.nn.Module, inputs: Mapping[str, Any], *, attention: str = "dense") -> dict[str, Any]:
    """Run ``model(**inputs)`` once under ``no_grad`` inside ``FlopCounterMode`` and return FLOPs split by module.

    Keys: "vision" (vision tower), "projector", "language_model" (decoder; for a prefill forward this is
    :func:`flops_exact`'s "llm_prefill", for a cached one-token forward its per-step decode minus the lm_head),
    "lm_head", "other" (anything outside those modules), "total", "attention_scores" (FLOPs of all SDPA calls),
    and "by_op" ({op name: FLOPs} over the whole forward). Counted ops are torch's registered ones (mm, addmm,
    bmm, baddbmm, convolution, ...) plus every SDPA backend via :func:`sdpa_flop_formulas` and torch.cdist via
    :func:`cdist_flop_formulas`.
    """
    counter = FlopCounterMode(display=False, custom_mapping={**sdpa_flop_formulas(attention), **cdist_flop_formulas()})
    with torch.no_grad(), counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = sum(counts.get("Global", {}).values())
    result: dict[str, Any] = {}
    for part, path in ((p, _part_paths(model).get(p)) for p in _PARTS):
        result[part] = sum(counts.get(f"{root}.{path}", {}).values()) if path is not None else 0
    result["other"] = total - sum(result[p] for p in _PARTS)
    result["total"] = total
    sdpa_ops = set(sdpa_flop_formulas(attention))
    by_op = {str(op): int(v) for op, v in counts.get("Global", {}).items()}
    result["attention_scores"] = sum(v for op, v in counts.get("Global", {}).items() if op in sdpa_ops)
    result["by_op"] = by_op
    return result
