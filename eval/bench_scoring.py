"""Benchmark "scoring overhead": what HiPrune's attention scores cost on top of the vision tower LLaVA runs anyway.

    python -m eval.bench_scoring                          # CLIP ViT-L/14-336 at real shape, random weights
    python -m eval.bench_scoring --device cuda --repeats 30 --json results/bench_scoring.json
    python -m eval.bench_scoring --shape tiny --repeats 1 --warmup 0   # smoke run (seconds)

Three variants run on one random-weight CLIP vision tower, in one process, interleaved round by round (the order
rotates every round so no variant always runs first, e.g. on warm caches):

  plain      the tower under SDPA, requesting the feature layer's hidden state the way transformers' LLaVA
             ``get_image_features`` does (``output_hidden_states=vision_feature_layer``; hidden_states[-2]).
  ours       the same call under SDPA inside ``hiprune.capture.AttentionScores`` on the object layer (9) and the
             deep layer (23, the one whose output is hidden_states[-2]); then ``select_hiprune`` on the CLS-dropped
             scores.
  reference  the authors' approach: the whole tower in eager attention with ``output_attentions=True`` (all 24
             maps materialised), ``global_attention`` on layers 9 and 23, ``select_hiprune``. It requests the same
             hidden state as the others (the official code asks for all 25; that adds references, not compute), so
             the three calls differ only in how the scores are obtained.

Reported: per-round ratios ours/plain and reference/plain (median and IQR over the repeats after warm-up), the
absolute times, and the peak memory of each variant. The goal is ours/plain <= 1.05 (median).

Correctness is checked on every call, outside the timed region: ours and reference must keep identical indices
(a RuntimeError otherwise, so the benchmark never times two different computations), and the hidden state of ours
is compared bit-for-bit with plain's (capture must not change the model's output).

Weights: ``CLIPVisionModel(config)`` with transformers' own random init, then the query and key projections scaled
by ``--qk-gain``. With the stock init (std 0.02-ish) the attention of a random CLIP is almost uniform (max row
probability ~1/577), so per-key scores differ by ~1e-7 relative and the top-k ranking is decided by rounding noise;
the gain makes attention peaked (as in a trained CLIP) so that the index check compares rankings, not noise. It
changes no shape, kernel or FLOP count; weights never touch denormal range at the default gain.

Memory:
  CUDA: in process, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, per variant; reported
        as the peak and as the peak minus what was allocated before the call (weights + input).
  CPU:  one fresh subprocess per variant (glibc malloc with a fixed mmap threshold, so large tensors are returned to
        the OS when freed): build the tower, run the variant once (warm-up), free, ``malloc_trim``, then reset the
        kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5) and run the variant again. Reported: VmHWM after the
        call minus VmRSS before it = the peak resident memory the call added (activations, kept hidden states,
        attention maps, scores, outputs, allocator slack). tracemalloc would not see torch's allocations.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

GOAL_RATIO = 1.05
VARIANTS = ("plain", "ours", "reference")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_QK_GAIN = 12.0
_PROBE_MARKER = "BENCH_SCORING_MEMORY "


@dataclass(frozen=True)
class Shape:
    """A CLIP vision tower and the HiPrune settings that go with it."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    object_layer: int  # 1-based encoder layer of the object score
    vision_feature_layer: int  # hidden_states index LLaVA passes on (-2: output of layer L - 1)
    budget: int

    @property
    def side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.side, self.side)

    @property
    def num_patches(self) -> int:
        return self.side * self.side

    @property
    def deep_layer(self) -> int:
        """1-based encoder layer whose output is hidden_states[vision_feature_layer] (hidden_states[0] = embeddings)."""
        k = self.vision_feature_layer
        return k if k >= 0 else self.num_layers + 1 + k

    def validate(self) -> None:
        for name, layer in (("object", self.object_layer), ("deep", self.deep_layer)):
            if not 1 <= layer <= self.num_layers:
                raise ValueError(f"{name} layer {layer} is outside the tower's layers 1..{self.num_layers}")
        if not 1 <= self.budget <= self.num_patches:
            raise ValueError(f"budget {self.budget} must be in [1, {self.num_patches}]")


SHAPES: dict[str, Shape] = {
    # openai/clip-vit-large-patch14-336 as LLaVA-1.5 uses it: 24 x 24 patches + CLS, object layer 9, feature layer -2.
    "clip-l-336": Shape(1024, 4096, 24, 16, 336, 14, object_layer=9, vision_feature_layer=-2, budget=192),
    # Smoke shape: 8 x 8 patches; budget 32 -> round(32 * 0.1 / 5) = 1 anchor.
    "tiny": Shape(64, 256, 6, 4, 112, 14, object_layer=3, vision_feature_layer=-2, budget=32),
}


class IndicesMismatch(RuntimeError):
    """Ours and the reference kept different tokens: the benchmark would compare two different computations."""


# --- model -----------------------------------------------------------------------------------------------------
def build_tower(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int, qk_gain: float):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    tower = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for layer in tower.encoder.layers:  # transformers >= 5.2x: no .vision_model level
            layer.self_attn.q_proj.weight.mul_(qk_gain)
            layer.self_attn.k_proj.weight.mul_(qk_gain)
    tower = tower.to(device=device, dtype=dtype)
    if tower.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected the tower under SDPA, got {tower.config._attn_implementation!r}")
    return tower


def make_pixels(shape: Shape, batch_size: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(batch_size, 3, shape.image_size, shape.image_size, generator=g)
    return pixels.to(device=device, dtype=dtype)


# --- the three variants ----------------------------------------------------------------------------------------
class Variant:
    """One way to get LLaVA's visual features (and, for pruning variants, the kept indices) from pixels.

    ``setup``/``teardown`` run outside the timed region (they model a load-time choice: the official code loads
    the tower in eager mode once); ``__call__`` is what is timed.
    """

    name: str
    description: str

    def __init__(self, tower, shape: Shape):
        self.tower = tower
        self.shape = shape

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _forward(self, pixels: torch.Tensor, **kwargs) -> tuple[Any, torch.Tensor]:
        k = self.shape.vision_feature_layer
        # transformers' LLaVA get_image_features: output_hidden_states=vision_feature_layer selects that state only.
        out = self.tower(pixel_values=pixels, output_hidden_states=k, **kwargs)
        return out, out.hidden_states[k][:, 1:]  # vision_feature_select_strategy "default": drop CLS


class Plain(Variant):
    name = "plain"
    description = "SDPA tower, hidden_states[feature layer] only (what LLaVA runs without pruning)"

    def __call__(self, pixels):
        _, features = self._forward(pixels)
        return {"features": features}


class Ours(Variant):
    name = "ours"
    description = "SDPA tower + AttentionScores on the object and deep layers + select_hiprune"

    def __call__(self, pixels):
        from hiprune.capture import AttentionScores
        from hiprune.methods.hiprune import select_hiprune

        layers = self.tower.encoder.layers
        modules = {
            "object": layers[self.shape.object_layer - 1].self_attn,
            "deep": layers[self.shape.deep_layer - 1].self_attn,
        }
        with AttentionScores(modules) as capture:
            _, features = self._forward(pixels)
            scores = capture.collect()
        object_scores, deep_scores = scores["object"][:, 1:], scores["deep"][:, 1:]  # drop the CLS key column
        indices = select_hiprune(object_scores, deep_scores, self.shape.grid, self.shape.budget)
        return {"features": features, "indices": indices, "object": object_scores, "deep": deep_scores}


class Reference(Variant):
    name = "reference"
    description = "eager tower with output_attentions=True (all layers) + global_attention + select_hiprune"

    def setup(self):
        self.tower.set_attn_implementation("eager")
        if self.tower.encoder.layers[0].self_attn.config._attn_implementation != "eager":
            raise RuntimeError("could not switch the tower's layers to eager attention")

    def teardown(self):
        self.tower.set_attn_implementation("sdpa")

    def __call__(self, pixels):
        from hiprune.methods.hiprune import select_hiprune
        from hiprune.scores import global_attention

        out, features = self._forward(pixels, output_attentions=True)
        if len(out.attentions) != self.shape.num_layers:
            raise RuntimeError(f"expected {self.shape.num_layers} attention maps, got {len(out.attentions)}")
        object_scores = global_attention(out.attentions[self.shape.object_layer - 1], skip_cls=True)
        deep_scores = global_attention(out.attentions[self.shape.deep_layer - 1], skip_cls=True)
        indices = select_hiprune(object_scores, deep_scores, self.shape.grid, self.shape.budget)
        return {"features": features, "indices": indices, "object": object_scores, "deep": deep_scores}


def make_variants(tower, shape: Shape) -> dict[str, Variant]:
    return {cls.name: cls(tower, shape) for cls in (Plain, Ours, Reference)}


# --- timing ----------------------------------------------------------------------------------------------------
def timed_call(variant: Variant, pixels: torch.Tensor, device: torch.device) -> tuple[float, dict]:
    """Seconds for one call of the variant, and its outputs. GC is off while timing (as in timeit)."""
    variant.setup()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.inference_mode():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                out = variant(pixels)
                end.record()
                torch.cuda.synchronize(device)
                seconds = start.elapsed_time(end) / 1000.0
            else:
                t0 = time.perf_counter()
                out = variant(pixels)
                seconds = time.perf_counter() - t0
    finally:
        if gc_was_enabled:
            gc.enable()
        variant.teardown()
    return seconds, out


class Checker:
    """Compares the outputs of one round; raises IndicesMismatch when ours and reference keep different tokens."""

    def __init__(self) -> None:
        self.calls = 0
        self.features_identical = True
        self.max_score_diff = {"object": 0.0, "deep": 0.0}
        self.kept = None

    def check(self, outs: dict[str, dict]) -> None:
        ours, ref, plain = outs["ours"], outs["reference"], outs["plain"]
        for name in ("object", "deep"):
            diff = float((ours[name].float() - ref[name].float()).abs().max())
            self.max_score_diff[name] = max(self.max_score_diff[name], diff)
        if not torch.equal(ours["indices"], ref["indices"]):
            raise IndicesMismatch(_mismatch_report(ours, ref))
        self.features_identical &= torch.equal(ours["features"], plain["features"])
        self.kept = ours["indices"]
        self.calls += 1

    def summary(self) -> dict:
        return {
            "indices_identical": True,  # a mismatch raises
            "checked_rounds": self.calls,
            "kept_per_image": None if self.kept is None else int(self.kept.shape[1]),
            "max_abs_score_diff_ours_vs_reference": self.max_score_diff,
            "features_bitwise_identical_plain_vs_ours": bool(self.features_identical),
        }


def _mismatch_report(ours: dict, ref: dict) -> str:
    lines = ["ours and reference kept different token indices; the benchmark would compare different computations."]
    for row in range(ours["indices"].shape[0]):
        a, b = set(ours["indices"][row].tolist()), set(ref["indices"][row].tolist())
        if a != b:
            lines.append(f"  image {row}: only ours {sorted(a - b)[:10]}, only reference {sorted(b - a)[:10]}")
    for name in ("object", "deep"):
        diff = (ours[name].float() - ref[name].float()).abs()
        scale = ref[name].float().abs().max()
        lines.append(f"  {name} scores: max |diff| {float(diff.max()):.3e} (max score {float(scale):.3e})")
    lines.append(
        "  Near-tied scores at the budget boundary flip under low precision; try --dtype float32 or a larger --qk-gain."
    )
    return "\n".join(lines)


def _quartiles(values: list[float]) -> dict:
    if len(values) == 1:
        q1 = med = q3 = values[0]
    else:
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "values": values}


def run_timing(variants: dict[str, Variant], pixels, device, repeats: int, warmup: int, checker: Checker) -> dict:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(warmup + repeats):
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]  # rotate: every variant runs first in turn
        outs = {}
        for name in order:
            seconds, outs[name] = timed_call(variants[name], pixels, device)
            if round_ >= warmup:
                times[name].append(seconds)
        checker.check(outs)  # outside the timed region; also during warm-up
        del outs
    return times


# --- memory ----------------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def probe_cpu_memory(variant: Variant, pixels: torch.Tensor) -> dict:
    """In this (fresh) process: peak RSS the variant's call adds, after one warm-up call. Linux only."""
    device = torch.device("cpu")
    _, out = timed_call(variant, pixels, device)  # warm-up: lazy inits, thread pools, kernel caches
    del out
    gc.collect()
    _malloc_trim()
    before_kb = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    _, out = timed_call(variant, pixels, device)
    peak_kb = _proc_status_kb("VmHWM")
    del out
    return {
        "baseline_rss_bytes": before_kb * 1024,
        "peak_rss_bytes": peak_kb * 1024,
        "peak_extra_bytes": (peak_kb - before_kb) * 1024,
    }


def measure_cpu_memory(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    # A fixed threshold (which also disables glibc's dynamic one) keeps every large tensor in its own mmap, handed
    # back to the OS on free, so RSS follows live memory instead of glibc's free lists.
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for name in VARIANTS:
        cmd = [
            sys.executable,
            "-m",
            "eval.bench_scoring",
            "--_memory-probe",
            name,
            "--device",
            "cpu",
            "--dtype",
            args.dtype,
            "--shape",
            args.shape,
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
            "--qk-gain",
            str(args.qk_gain),
        ]
        if args.budget is not None:
            cmd += ["--budget", str(args.budget)]
        repo = Path(__file__).resolve().parents[1]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PROBE_MARKER)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory probe for {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len(_PROBE_MARKER) :])
    return {
        "method": "CPU: peak RSS growth (VmHWM after reset minus VmRSS before) over one call, fresh subprocess per "
        "variant, after one warm-up call and malloc_trim, MALLOC_MMAP_THRESHOLD_=131072",
        "variants": results,
    }


def measure_cuda_memory(variants: dict[str, Variant], pixels: torch.Tensor, device: torch.device) -> dict:
    results = {}
    for name in VARIANTS:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _, out = timed_call(variants[name], pixels, device)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        results[name] = {
            "baseline_allocated_bytes": before,
            "peak_allocated_bytes": peak,
            "peak_extra_bytes": peak - before,
        }
    return {
        "method": "CUDA: torch.cuda.max_memory_allocated over one call after reset_peak_memory_stats; "
        "peak_extra = peak minus memory_allocated before the call (weights + input)",
        "variants": results,
    }


# --- driver ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.bench_scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 7 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="clip-l-336")
    p.add_argument(
        "--budget", type=int, default=None, help="tokens kept per image (default: the shape's, 192 for CLIP-L)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--qk-gain",
        type=float,
        default=DEFAULT_QK_GAIN,
        help="scale of the random query/key projections (peaked attention, see the module docstring)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", type=Path, default=None, help="write the results here (temp file + rename)")
    p.add_argument("--_memory-probe", dest="memory_probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    on_cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if on_cpu else "float16")
    args.repeats = args.repeats if args.repeats is not None else (7 if on_cpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 5)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    return args


def resolve_shape(args: argparse.Namespace) -> Shape:
    shape = SHAPES[args.shape]
    if args.budget is not None:
        shape = Shape(**{**asdict(shape), "budget": args.budget})
    shape.validate()
    return shape


def _environment(device: torch.device) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other processes competing for the cores show up as noise (wide IQR); the load average flags it.
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def print_report(results: dict, out=None) -> None:
    cfg = results["config"]
    out = out if out is not None else sys.stdout

    def w(line: str = "") -> None:
        print(line, file=out)

    w(
        f"scoring overhead: {cfg['shape']} ({cfg['num_layers']} layers, {cfg['tokens']} tokens), batch {cfg['batch_size']}, "
        f"{cfg['dtype']} on {cfg['device']} ({results['environment']['device_name']}, "
        f"{results['environment']['torch_threads']} threads), {cfg['repeats']} rounds after {cfg['warmup']} warm-up"
    )
    w(f"object layer {cfg['object_layer']}, deep layer {cfg['deep_layer']}, budget {cfg['budget']}")
    env = results["environment"]
    if env.get("load_average_at_start") and env.get("load_average_at_end"):
        w(
            f"load average (1 min) at start {env['load_average_at_start'][0]:.2f}, at end "
            f"{env['load_average_at_end'][0]:.2f} on {env['cpu_count']} CPUs (others competing for cores = noise)"
        )
    w()
    w(f"{'variant':<10} {'median':>10} {'q1':>10} {'q3':>10}   description")
    for name in VARIANTS:
        v = results["variants"][name]
        t = v["time_s"]
        w(f"{name:<10} {t['median'] * 1e3:8.1f}ms {t['q1'] * 1e3:8.1f}ms {t['q3'] * 1e3:8.1f}ms   {v['description']}")
    w()
    for key, r in results["ratios"].items():
        w(f"{key:<16} median {r['median']:.4f}   IQR [{r['q1']:.4f}, {r['q3']:.4f}]")
    goal = results["goal"]
    w(f"goal: {goal['metric']} <= {goal['threshold']}: {'MET' if goal['met'] else 'NOT MET'}")
    mem = results.get("memory")
    if mem:
        w()
        w(f"peak memory ({mem['method']}):")
        for name in VARIANTS:
            m = mem["variants"][name]
            peak = m.get("peak_allocated_bytes", m.get("peak_rss_bytes"))
            w(f"  {name:<10} extra {_mib(m['peak_extra_bytes'])}   peak {_mib(peak)}")
    c = results["correctness"]
    w()
    w(
        f"correctness: kept indices of ours and reference identical in all {c['checked_rounds']} rounds; "
        f"max |score diff| object {c['max_abs_score_diff_ours_vs_reference']['object']:.2e}, "
        f"deep {c['max_abs_score_diff_ours_vs_reference']['deep']:.2e}; features of ours bitwise equal to plain: "
        f"{c['features_bitwise_identical_plain_vs_ours']}"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = resolve_shape(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tower = build_tower(shape, dtype, device, args.seed, args.qk_gain)
    pixels = make_pixels(shape, args.batch_size, dtype, device, args.seed)
    variants = make_variants(tower, shape)

    if args.memory_probe is not None:  # child process of measure_cpu_memory
        result = probe_cpu_memory(variants[args.memory_probe], pixels)
        print(_PROBE_MARKER + json.dumps(result), flush=True)
        return result

    environment = _environment(device)
    checker = Checker()
    times = run_timing(variants, pixels, device, args.repeats, args.warmup, checker)
    ratios = {
        f"{name}/plain": _quartiles([t / p for t, p in zip(times[name], times["plain"])])
        for name in ("ours", "reference")
    }
    results: dict[str, Any] = {
        "benchmark": "scoring_overhead",
        "config": {
            "shape": args.shape,
            **asdict(shape),
            "deep_layer": shape.deep_layer,
            "grid": list(shape.grid),
            "tokens": shape.num_patches + 1,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": args.device,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "qk_gain": args.qk_gain,
            "timer": "cuda events + synchronize" if device.type == "cuda" else "time.perf_counter",
            "interleaving": "one call per variant per round, order rotated every round; ratios are per round",
        },
        "environment": environment,
        "variants": {
            name: {"description": variants[name].description, "time_s": _quartiles(times[name])} for name in VARIANTS
        },
        "ratios": ratios,
        "goal": {
            "metric": "ours/plain median",
            "threshold": GOAL_RATIO,
            "met": ratios["ours/plain"]["median"] <= GOAL_RATIO,
        },
        "correctness": checker.summary(),
        "memory": None,
    }
    if not args.no_memory:
        if device.type == "cuda":
            results["memory"] = measure_cuda_memory(variants, pixels, device)
        else:
            del tower, variants, pixels
            gc.collect()
            results["memory"] = measure_cpu_memory(args)
    results["environment"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print_report(results)
    if args.json is not None:
        _write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
