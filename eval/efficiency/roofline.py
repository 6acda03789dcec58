"""Device peaks for a roofline bound, measured in the run that uses them, and the bound itself.

    python -m eval.efficiency.roofline                       # this machine's CPU, float32 and bfloat16
    python -m eval.efficiency.roofline --device cuda --dtype float16

Peak compute: square matmuls ``a @ b`` (n x n, in the dtype the model runs in) at a few sizes; FLOPs = 2 n^3 per
call, the best size's median rate is the peak. Peak bandwidth: ``dst.copy_(src)`` of a buffer well above the
last-level cache; bytes moved = 2 x buffer (one read, one write), median rate. Both are *achievable* peaks of this
torch build on this device at this moment (other processes included), not data-sheet numbers.

Roofline bound of a computation that does ``flops`` FLOPs and must move ``bytes`` bytes:
``max(flops / peak_flops, bytes / bandwidth)`` -- the time it cannot beat if compute and memory traffic overlap
perfectly. :func:`prefill_bytes` and :func:`decode_bytes` model the bytes of one LLM prefill / decode step (see their
docstrings); FLOPs come from :func:`eval.efficiency.flops.flops_exact`.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from eval.efficiency.measure import DTYPES, synchronize, time_call


def _time_calls(fn: Callable[[], Any], device: torch.device, calls: int, repeats: int, warmup: int) -> list[float]:
    """Seconds per call, one value per repeat (each repeat times ``calls`` back-to-back calls)."""
    for _ in range(warmup):
        fn()
    synchronize(device)

    def back_to_back() -> None:
        for _ in range(calls):
            fn()

    return [time_call(back_to_back, device)[0] / calls for _ in range(repeats)]


def peak_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    sizes: Sequence[int] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    min_seconds: float = 0.05,
) -> dict[str, Any]:
    """Achievable matmul FLOP/s: the best median rate over square ``n x n`` matmuls of the given sizes."""
    device = torch.device(device)
    if sizes is None:
        sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    per_size = {}
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(n)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        out = torch.empty(n, n, device=device, dtype=dtype)
        fn = functools.partial(torch.mm, a, b, out=out)
        one = min(_time_calls(fn, device, 1, 1, 1))
        calls = max(1, int(min_seconds / max(one, 1e-9)))
        seconds = statistics.median(_time_calls(fn, device, calls, repeats, warmup))
        per_size[n] = 2 * n**3 / seconds
    best = max(per_size, key=per_size.get)
    return {"flops_per_s": per_size[best], "best_size": best, "per_size": per_size}


def peak_bandwidth(
    device: str | torch.device = "cpu",
    nbytes: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    min_seconds: float = 0.05,
) -> dict[str, Any]:
    """Achievable memory bandwidth (bytes/s) of ``dst.copy_(src)``: 2 x buffer bytes per call (read + write)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    fn = functools.partial(dst.copy_, src)
    one = min(_time_calls(fn, device, 1, 1, 1))
    calls = max(1, int(min_seconds / max(one, 1e-9)))
    seconds = statistics.median(_time_calls(fn, device, calls, repeats, warmup))
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_per_s": moved / seconds, "buffer_bytes": src.numel() * src.element_size()}


@dataclass
class Peaks:
    """Measured peaks of one device for one dtype."""

    device: str
    dtype: str
    flops_per_s: float
    bytes_per_s: float
    matmul_size: int
    copy_buffer_bytes: int
    seconds: float  # wall time the two benchmarks took

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_peaks(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    sizes: Sequence[int] | None = None,
    copy_bytes: int | None = None,
    repeats: int = 5,
) -> Peaks:
    """Matmul and copy benchmarks, back to back."""
    device = torch.device(device)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    t0 = time.perf_counter()
    compute = peak_flops(device, dtype, sizes=sizes, repeats=repeats)
    memory = peak_bandwidth(device, nbytes=copy_bytes, repeats=repeats)
    return Peaks(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        flops_per_s=compute["flops_per_s"],
        bytes_per_s=memory["bytes_per_s"],
        matmul_size=compute["best_size"],
        copy_buffer_bytes=memory["buffer_bytes"],
        seconds=time.perf_counter() - t0,
    )


def roofline_bound(flops: float, nbytes: float, flops_per_s: float, bytes_per_s: float) -> dict[str, Any]:
    """``max(flops / peak, bytes / bandwidth)`` in seconds, and which side bounds it."""
    if flops_per_s <= 0 or bytes_per_s <= 0:
        raise ValueError("peaks must be positive")
    compute_s = flops / flops_per_s
    memory_s = nbytes / bytes_per_s
    return {
        "seconds": max(compute_s, memory_s),
        "compute_s": compute_s,
        "memory_s": memory_s,
        "bound_by": "compute" if compute_s >= memory_s else "memory",
        "intensity": flops / nbytes if nbytes else float("inf"),  # FLOPs per byte
    }


# ------------------------------------------------------------------------------------------------------------------
# Bytes an LLM forward must move (Llama-style decoder, as in LLaVA-1.5)
# ------------------------------------------------------------------------------------------------------------------
def _text_dims(config: Any) -> dict[str, int]:
    tc = getattr(config, "text_config", None) or config
    d = tc.hidden_size
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    hd = getattr(tc, "head_dim", None) or d // heads
    return {"d": d, "m": tc.intermediate_size, "layers": tc.num_hidden_layers, "heads": heads, "kv_heads": kv,
            "head_dim": hd, "vocab": tc.vocab_size}


def decoder_weight_elements(config: Any, with_lm_head: bool = True) -> int:
    """Weights a forward of the decoder reads (token embedding excluded: an inputs_embeds forward and a decode
    step read one row of it): q,k,v,o, gate/up/down and the two RMSNorms per layer, final norm, lm_head."""
    t = _text_dims(config)
    d, m, hd = t["d"], t["m"], t["head_dim"]
    per_layer = d * t["heads"] * hd * 2 + d * t["kv_heads"] * hd * 2 + 3 * d * m + 2 * d
    return t["layers"] * per_layer + d + (d * t["vocab"] if with_lm_head else 0)


def _activation_elements_per_token_layer(t: dict[str, int]) -> int:
    """Activation elements one token moves through one decoder layer, counting each GEMM's input read and output
    written once and the attention kernel reading q, k, v and writing its output once (HF runs the seven
    projections as separate GEMMs). Norms, rotary, SiLU x up and residual adds are assumed fused (not counted),
    which makes this a lower estimate."""
    d, m = t["d"], t["m"]
    q = t["heads"] * t["head_dim"]
    kv = t["kv_heads"] * t["head_dim"]
    projections = (d + q) + 2 * (d + kv) + (q + d)  # q, k, v, o: input + output
    attention = q + 2 * kv + q  # read q, k, v, write output
    mlp = 2 * (d + m) + (m + d)  # gate, up: d in, m out; down: m in, d out
    return projections + attention + mlp


def _per_layer(n_tokens: int | Sequence[int], layers: int) -> list[int]:
    """One token count per decoder layer: an int is the same in every layer (pruning before the LLM); a sequence
    gives each layer's own (LLM-side pruning such as FastV shortens the layers from K on)."""
    if isinstance(n_tokens, Sequence):
        tokens = [int(n) for n in n_tokens]
        if len(tokens) != layers:
            raise ValueError(f"{len(tokens)} per-layer token counts for {layers} decoder layers")
    else:
        tokens = [int(n_tokens)] * layers
    if any(n < 0 for n in tokens):
        raise ValueError(f"token counts must be >= 0, got {tokens}")
    return tokens


def prefill_bytes(config: Any, n_tokens: int | Sequence[int], dtype_bytes: int, batch: int = 1) -> dict[str, int]:
    """Bytes one LLM prefill over ``n_tokens`` (per sequence; one count, or one per decoder layer n_l) must move, as
    modelled here:

    - weights: every decoder weight and the lm_head read once (:func:`decoder_weight_elements`);
    - kv_cache: keys and values of every layer written once (2 x sum_l n_l x kv_heads x head_dim);
    - activations: :func:`_activation_elements_per_token_layer` x sum_l n_l, plus the inputs_embeds read (n_0
      tokens) and the final hidden state written (n_{L-1} tokens).
    Attention itself is assumed to run in a fused kernel (flash / SDPA: scores never reach memory). The gather that
    shortens the sequence inside an LLM-side method (FastV: n_K x hidden elements once) is not counted.
    """
    t = _text_dims(config)
    tokens = _per_layer(n_tokens, t["layers"])
    weights = decoder_weight_elements(config) * dtype_bytes
    kv_cache = 2 * sum(tokens) * t["kv_heads"] * t["head_dim"] * dtype_bytes * batch
    activations = (_activation_elements_per_token_layer(t) * sum(tokens) + t["d"] * (tokens[0] + tokens[-1])) \
        * dtype_bytes * batch
    return {"weights": weights, "kv_cache": kv_cache, "activations": activations,
            "total": weights + kv_cache + activations}


def decode_bytes(config: Any, n_cached: int | Sequence[int], dtype_bytes: int, batch: int = 1) -> dict[str, int]:
    """Bytes of one cached single-token decode step: all decoder weights and the lm_head read once, the whole KV
    cache (``n_cached`` positions; one count, or one per decoder layer) read once and one new position written per
    layer, the token's activations."""
    t = _text_dims(config)
    cached = _per_layer(n_cached, t["layers"])
    weights = decoder_weight_elements(config) * dtype_bytes
    kv_cache = 2 * sum(n + 1 for n in cached) * t["kv_heads"] * t["head_dim"] * dtype_bytes * batch
    activations = (_activation_elements_per_token_layer(t) * t["layers"] + 2 * t["d"]) * dtype_bytes * batch
    return {"weights": weights, "kv_cache": kv_cache, "activations": activations,
            "total": weights + kv_cache + activations}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.efficiency.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="matmul sizes n (n x n)")
    p.add_argument("--copy-mib", type=int, default=None, help="copy buffer in MiB")
    args = p.parse_args(argv)
    copy_bytes = args.copy_mib << 20 if args.copy_mib else None
    results = {}
    for name in args.dtype:
        peaks = measure_peaks(args.device, DTYPES[name], sizes=args.sizes, copy_bytes=copy_bytes)
        results[name] = peaks.to_dict()
        print(f"{args.device} {name}: {peaks.flops_per_s / 1e12:.3f} TFLOP/s (matmul n={peaks.matmul_size}), "
              f"{peaks.bytes_per_s / 1e9:.1f} GB/s (copy of {peaks.copy_buffer_bytes >> 20} MiB)")
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
