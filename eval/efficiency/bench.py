"""Latency, memory, FLOPs and roofline benchmark of every method x budget (issue 8, deliverables 2, 3 and 5).

    python -m eval.efficiency.bench                                     # CPU default: mid-size random LLaVA, bfloat16
    python -m eval.efficiency.bench model=llava15_7b bench_profile=gpu  # LLaVA-1.5-7B, the paper's protocol, on a GPU
    python -m eval.efficiency.bench only=[none,hiprune] budgets=[64] repeats=5 new_tokens=16

The model is built with random weights from its architecture config (``model.arch``, a folder under
configs/arch holding the Hub config.json, plus optional ``model.arch_overrides``; a ``model.local`` folder's own
config.json otherwise), directly on the device and in the model's dtype. Its weight bytes are checked against free
memory on a weightless (meta) copy first. Inputs are synthetic: ``text_tokens_before_image`` random text ids,
N' image placeholders (N' = the method's tokens per image, what the adapter makes the vision side return),
``text_tokens_after_image`` ids; random pixels. Families whose token count depends on the image (Qwen3-VL,
Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT, InternVL; eval/efficiency/inputs.py): one random RGB image of ``image_size``
through the family's real image processor, N' per case from ``adapter.placeholder_counts(method)`` on its outputs
(with the family's start / end markers), every grid's (crop's, tile's) kept count checked; their prefill takes
input_ids + the precomputed image features (``mm_encoder_outputs``), and their FLOPs are analytic for the LLM parts
only (the whole model measured; the analytic whole-model counts n/a, with the reason). Video-LLaVA is refused.

Per (method, budget) -- a "case" -- inside ``hiprune.apply(model, method)`` (installed around each case's calls):

  vision    vision tower + projector + the method's scoring and selection (``get_image_features``)
  prefill   LLM forward only (decoder + lm_head on the last position, building the KV cache, as generate's prefill
            does) on precomputed input embeddings: what the paper times. LLM-side methods (FastV) must see where the
            image tokens are: their prefill takes input_ids and the precomputed image features (HF's
            ``mm_encoder_outputs``), so the token-embedding lookup and the feature scatter (a few MB of copies) are
            timed with it
  ttft      ``generate(max_new_tokens=1)`` end to end (vision, selection, prefill, first token)
  decode    one cached single-token step (the cache is cropped back after each call)
  generate  ``generate(max_new_tokens=K, min_new_tokens=K)``; throughput = batch x K / wall time

Schedule: per case ``warmup`` untimed calls of each measurement; then ``repeats`` rounds, each running one timed
call of every measurement of every case, the case order rotating by one per round (a slow phase of a shared
machine spreads over all cases instead of biasing one); median, quartiles, IQR, mean and std over the rounds.
Timing and peak memory as eval/efficiency/measure.py takes them: GPU CUDA events around the call, then synchronize;
CPU ``time.perf_counter``. Peak memory, in a final pass with one untimed call per measurement and nothing of other
cases held: GPU ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights + activations + cache;
the allocator's view); CPU the process's peak resident set size (VmHWM) during the call, after ``malloc_trim`` and a
reset of the kernel's counter (/proc/self/clear_refs): everything resident (weights, activations, Python, libraries,
allocator slack), plus the increase over the RSS before the call. Not comparable one to one with
max_memory_allocated.

FLOPs per case (eval/efficiency/flops.py): FastV convention (LLM prefill), exact (2 x MACs, whole model as
generate's prefill runs it: vision incl. the method's extra score maps, projector, LLM, lm_head on one position),
the paper's calflops convention (a full forward's linear layers only: what Table 5 prints), optionally
FlopCounterMode over one real forward. Roofline: peak FLOP/s (matmul) and bandwidth (copy) measured in this run
(eval/efficiency/roofline.py), at its start and its end; the bound of the prefill is max(FLOPs / peak, bytes /
bandwidth) with the faster of the two measurements of each peak (the tighter bound), FLOPs counted for a causal
kernel ("triangular") and bytes from :func:`eval.efficiency.roofline.prefill_bytes`. Every count takes the visual
tokens of each decoder layer: the kept ones in every layer for methods that prune before the LLM; for LLM-side
methods the counts their drop schedule leaves at each layer (FastV: all N visual tokens in layers 0..K-1 and the R
kept from layer K on), as recorded by every pruned prefill of the case (``session.layer_records``, checked against
the schedule). CUDA graphs
(``cuda_graphs=true``) are off for LLM-side methods, with the reason in the log and in bench.json (meta
``cuda_graphs_off``): their prefill finds the image tokens and kept positions with data-dependent shapes and
host-side checks, which a graph capture cannot hold.

Writes ``<out_dir>/<model>-<device>-<dtype>/bench.json`` and the tables of eval/efficiency/tables.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForImageTextToText, CLIPTextConfig, CLIPTextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

import hiprune
from eval.config import CONFIG_DIR, ConfigError, repo_path, repo_relative
from eval.efficiency.flops import (
    fastv_tokens_per_layer,
    flops_exact,
    flops_llm,
    flops_measured,
    llm_scoring_flops,
    tflops_fastv,
    vision_method_costs,
)
from eval.efficiency.inputs import FAMILIES, family_inputs, image_processor, special_id
from eval.efficiency.inputs import make_inputs as make_family_inputs
from eval.efficiency.measure import (
    DTYPES,
    MemoryProbe,
    device_name,
    load_average,
    summarize,
    time_call,
    timer_name,
    versions,
)
from eval.efficiency.roofline import decode_bytes, measure_peaks, prefill_bytes, roofline_bound
from eval.efficiency.tables import token_drops, write_tables
from eval.running.methods import build_from_config, is_implemented, stage_of
from hiprune.adapters.llm_pruning import resolve_schedule, visual_per_layer

MEASUREMENTS = ("vision", "prefill", "ttft", "decode", "generate")
# With cuda_graphs=true (GPU): the same prefill and decode step replayed from a captured CUDA graph, i.e. without
# the CPU cost of HF's Python and kernel launches; what the kernels alone take, next to the roofline bound.
GRAPH_MEASUREMENTS = ("prefill_graph", "decode_graph")


# ------------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    return device


def architecture_config(model_cfg: DictConfig):
    """The model's HF config: ``model.local`` folder's config.json, else ``model.arch`` (+ ``arch_overrides``)."""
    if model_cfg.get("local"):
        source = repo_path(model_cfg.pretrained)
        if not (source / "config.json").is_file():
            raise ConfigError(f"local model {source} not found (no config.json); build it first (make assets)")
    elif model_cfg.get("arch"):
        source = repo_path(model_cfg.arch)
        if not (source / "config.json").is_file():
            raise ConfigError(f"architecture folder {source} has no config.json")
    else:
        raise ConfigError(
            f"model {model_cfg.name!r} names no architecture: set model.arch to a folder under configs/arch "
            "(random weights are built from its config.json)"
        )
    config = AutoConfig.from_pretrained(source)
    node = model_cfg.get("arch_overrides")
    overrides = OmegaConf.to_container(node, resolve=True) if node else {}
    for section, values in overrides.items():
        target = getattr(config, section, None) if isinstance(values, dict) else config
        if target is None:
            raise ConfigError(f"arch_overrides: the config has no section {section!r}")
        items = values.items() if isinstance(values, dict) else [(section, values)]
        for key, value in items:
            if not hasattr(target, key):
                raise ConfigError(f"arch_overrides: {section}.{key} is not a field of the config")
            setattr(target, key, value)
    return config, str(source)


def method_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """[{name, options, source}] in run order: ``methods`` entries, then registered extras."""
    specs = []
    for key, node in (cfg.get("methods") or {}).items():
        node = OmegaConf.to_container(node, resolve=True)
        specs.append({"name": node.get("name", key), "options": node.get("options") or {},
                      "source": f"methods.{key}"})
    if cfg.get("include_registered", True):
        listed = {s["name"] for s in specs}
        for name in hiprune.METHODS:
            if name in listed:
                continue
            path = CONFIG_DIR / "method" / f"{name}.yaml"
            node = {"name": name, "options": {}}
            if path.is_file():
                merged = OmegaConf.merge({"seed": cfg.seed}, {"m": OmegaConf.load(path)})
                node = OmegaConf.to_container(merged.m, resolve=True)
            specs.append({"name": name, "options": node.get("options") or {}, "source": "hiprune.METHODS"})
    only = cfg.get("only")
    if only:
        unknown = sorted(set(only) - {s["name"] for s in specs})
        if unknown:
            raise ConfigError(f"only={list(only)}: no method config for {unknown}")
        specs = [s for s in specs if s["name"] in set(only)]
    return specs


def plan_cases(cfg: DictConfig, skeleton) -> list[dict[str, Any]]:
    """Every (method, budget) to run, validated against a weightless model; unrunnable ones carry a reason."""
    family = hiprune.adapter_for(skeleton).family
    described = family_inputs(family)
    n_layers = skeleton.config.text_config.num_hidden_layers
    budgets = list(cfg.budgets)
    cases = []
    for spec in method_specs(cfg):
        name = spec["name"]
        if not is_implemented(name):
            cases.append({**spec, "budget": None, "method": None, "status": "not implemented",
                          "reason": f"{name!r} is not registered in hiprune.METHODS"})
            continue
        for budget in [None] if stage_of(name) == "none" else budgets:
            try:
                method = build_from_config(spec, budget)
            except ConfigError as exc:
                raise ConfigError(f"method {name!r}: {exc}") from exc
            options = described.adapter_options(cfg.model, method) if described else {}
            adapter = hiprune.adapter_for(skeleton, **options)
            try:  # a prompt encoder is built for prompt-aware methods (build_prompt_encoder)
                adapter.check_supported(method, object() if method.needs_prompt else None)
            except (ValueError, TypeError) as exc:  # e.g. an LLM-side method on an adapter without LLM support
                cases.append({**spec, "budget": budget, "method": None, "status": "unsupported", "reason": str(exc)})
                continue
            try:
                adapter.resolve_layers(method)
                keep = adapter.tokens_per_image(method)  # families fed by eval.efficiency.inputs: from the inputs
                visual_per_layer = None if described else visual_tokens_per_layer(method, keep, n_layers)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"method {name!r} budget {budget}: {exc}") from exc
            cases.append({**spec, "budget": budget, "method": method, "keep": None if described else keep,
                          "visual_per_layer": visual_per_layer, "adapter_options": options, "status": "planned",
                          "reason": ""})
    if not any(c["status"] == "planned" for c in cases):
        raise ConfigError("nothing to run: " + "; ".join(f"{c['name']}: {c['reason']}" for c in cases))
    return cases


def visual_tokens_per_layer(method, keep: int, n_layers: int) -> list[int]:
    """Visual tokens of one sequence (one image) at each decoder layer: ``keep`` (the LLM's input) in every layer,
    except for LLM-side methods, which drop at the stages of their drop schedule (FastV: to R from layer K on)."""
    if method.stage != "llm":
        return [keep] * n_layers
    return visual_per_layer(resolve_schedule(method, keep, n_layers), keep, n_layers)


def tokens_label(keep: int, visual_per_layer: list[int]) -> str:
    """'64' for a method that prunes before the LLM; '576>64@2' (576 visual tokens, 64 from layer 2 on) for FastV;
    '576>288@2>144@8' for a drop schedule of two stages."""
    drops = token_drops([keep, *visual_per_layer])  # the LLM's input first, so layer i of the list is i - 1
    return str(keep) + "".join(f">{after}@{layer - 1}" for layer, after in drops)


def cuda_graphs_off_reason(method) -> str | None:
    """Why the CUDA-graph replays are not measured for ``method`` (None: they are)."""
    if method.stage == "llm":
        return (f"{method.name} prunes inside the LLM: its prefill finds the image tokens and the kept positions with "
                "data-dependent shapes (nonzero) and checks them on the host, which a CUDA graph capture cannot hold")
    return None


# ------------------------------------------------------------------------------------------------------------------
# model and inputs
# ------------------------------------------------------------------------------------------------------------------
def weightless(config):
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def parameter_count(model: torch.nn.Module) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def check_memory(n_params: int, dtype: torch.dtype, device: torch.device, fraction: float) -> dict[str, int]:
    need = n_params * torch.finfo(dtype).bits // 8
    free = free_memory(device)
    if need > fraction * free:
        raise ConfigError(
            f"the model's weights need {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} but only "
            f"{free / 2**30:.1f} GiB are free on {device} (limit {fraction:.0%}); use a smaller dtype, another "
            "device or model=llava15_mid_cpu"
        )
    return {"weights_bytes": need, "free_bytes_before_build": free}


def build_model(config, dtype: torch.dtype, device: torch.device, attn: str, seed: int):
    """Random weights (transformers' own init), allocated directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def text_ids(config, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random text token ids: not the image token, not padding, not BOS/EOS."""
    tc = config.text_config
    vocab = tc.vocab_size
    special = {config.image_token_id, getattr(config, "pad_token_id", None), tc.bos_token_id, tc.eos_token_id,
               getattr(tc, "pad_token_id", None)}
    allowed = torch.tensor([i for i in range(3, min(vocab, 32000)) if i not in special])
    return allowed[torch.randint(len(allowed), (n,), generator=generator)]


def make_inputs(config, keep: int, batch: int, before: int, after: int, seed: int, device, dtype) -> dict:
    """input_ids [B, before + keep + after] (BOS first), attention_mask, pixel_values [B, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    bos = config.text_config.bos_token_id
    rows = []
    for _ in range(batch):
        head = text_ids(config, before, g)
        if before and bos is not None:
            head[0] = bos
        rows.append(torch.cat([head, torch.full((keep,), config.image_token_id), text_ids(config, after, g)]))
    input_ids = torch.stack(rows)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixels.to(device, dtype),
    }


PROMPT = "Is there a red circle in the image?\nAnswer the question using a single word or phrase."


class FixedLengthTokenizer:
    """Stands in for CLIP's tokenizer (not available offline): every prompt becomes ``length`` random ids, BOS first
    and EOS last, no padding. The text tower's cost depends on the length only."""

    def __init__(self, length: int, vocab_size: int, bos_token_id: int, eos_token_id: int, seed: int = 0):
        self.length, self.vocab_size, self.bos, self.eos, self.seed = length, vocab_size, bos_token_id, eos_token_id, seed

    def __call__(self, prompts, padding=True, truncation=True, max_length=77, return_tensors="pt", **_):
        n = min(self.length, max_length)
        g = torch.Generator().manual_seed(self.seed)
        high = min(self.bos, self.eos)
        ids = torch.randint(high, (len(prompts), n), generator=g)
        ids[:, 0], ids[:, -1] = self.bos, self.eos
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_prompt_encoder(cfg: DictConfig, config, dtype: torch.dtype, device: torch.device):
    """Prompt encoder for prompt-aware methods (HiPrune++). ``model.text_tower`` if it is a local folder (e.g. the
    tiny CLIP of the test assets), else a random-weight CLIP text tower + text/visual projections built from
    ``prompt_encoder`` (default: the dimensions of openai/clip-vit-large-patch14-336) with a fixed-length stand-in
    tokenizer of ``prompt_encoder.prompt_tokens`` tokens."""
    pe = cfg.prompt_encoder
    local = cfg.model.get("text_tower")
    if local and (repo_path(local) / "config.json").is_file():
        load_on = torch.device("cpu") if device.type == "meta" else device
        return hiprune.ClipPromptEncoder.from_pretrained(str(repo_path(local)), device=load_on, dtype=dtype,
                                                         pooling=str(pe.pooling)), f"{repo_path(local)} (local)"
    text_config = CLIPTextConfig(**OmegaConf.to_container(pe.text_config, resolve=True))
    projection = int(pe.projection_dim)
    torch.manual_seed(int(cfg.seed) + 1)
    with torch.device(device):
        text = CLIPTextModel._from_config(text_config, dtype=dtype, attn_implementation=str(cfg.model.attn_implementation))
        text_projection = torch.nn.Linear(text_config.hidden_size, projection, bias=False, dtype=dtype)
        visual_projection = torch.nn.Linear(config.vision_config.hidden_size, projection, bias=False, dtype=dtype)
    tokenizer = FixedLengthTokenizer(int(pe.prompt_tokens), text_config.vocab_size, text_config.bos_token_id,
                                     text_config.eos_token_id, int(cfg.seed))
    encoder = hiprune.ClipPromptEncoder(text.eval(), text_projection, visual_projection, tokenizer, str(pe.pooling))
    return encoder, "random CLIP text tower from prompt_encoder.text_config"


def prompt_encoder_flops(encoder, n_patches: int, batch: int) -> dict[str, int]:
    """FLOPs (2 x MACs) of a ClipPromptEncoder call for one forward: text tower on the prompt (q,k,v,o, fc1, fc2
    and dense QK^T + AV per layer), text_projection (every token for mean pooling, one for eos) and
    visual_projection of every patch. Biases, norms and activations not counted (as eval.efficiency.flops)."""
    tc = encoder.text_model.config
    d, m, layers = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
    t = len(encoder.tokenizer([PROMPT], max_length=encoder.max_length)["input_ids"][0])
    e = encoder.text_projection.out_features
    linear = layers * 2 * t * (4 * d * d + 2 * d * m)
    attention = layers * 2 * 2 * t * t * d
    heads = 2 * (t if encoder.pooling == "mean" else 1) * d * e + 2 * n_patches * encoder.visual_projection.in_features * e
    return {"linear": batch * (linear + heads), "attention": batch * attention,
            "total": batch * (linear + heads + attention), "prompt_tokens": t}


def prompt_width(encoder) -> int | None:
    """Width of a prompt encoder's embeddings (what prompt-aware methods compare in), or None without one."""
    return None if encoder is None else int(encoder.visual_projection.out_features)


# ------------------------------------------------------------------------------------------------------------------
# CUDA graphs and calls
# ------------------------------------------------------------------------------------------------------------------
class CapturedCall:
    """``fn`` captured into a CUDA graph; ``replay()`` reruns its kernels on the captured inputs and returns the
    captured outputs. Warm-up runs on a side stream first (lazy initialisations must not happen during capture);
    ``after_warmup`` undoes a warm-up call's side effects (e.g. a cache that grew by one token)."""

    def __init__(self, fn: Callable[[], Any], warmup: int = 2, after_warmup: Callable[[], None] | None = None,
                 keep_alive: Any = None):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
                if after_warmup:
                    after_warmup()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        inputs = [t for layer in getattr(keep_alive, "layers", []) for t in (layer.keys, layer.values)]
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.out = fn()
        except Exception as exc:
            raise RuntimeError(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); run with "
                               "cuda_graphs=false to measure without graphs") from exc
        # The graph reads its inputs' memory at replay: keep everything it captured alive (fn's closure holds the
        # input tensors, e.g. the decode token; keep_alive the cache whose tensors were read during capture).
        self._alive = (fn, keep_alive, inputs)

    def replay(self):
        self.graph.replay()
        return self.out


class Call:
    """One measurable call: ``fn`` (timed), ``check`` of its output and ``after`` (both untimed)."""

    def __init__(self, fn: Callable[[], Any], check: Callable[[Any], None] | None = None,
                 after: Callable[[], None] | None = None):
        self.fn, self.check, self.after = fn, check, after

    def run(self, device: torch.device, timed: bool = True) -> float | None:
        elapsed, out = time_call(self.fn, device) if timed else (None, self.fn())
        if self.check:
            self.check(out)
        if self.after:
            self.after()
        return elapsed


# ------------------------------------------------------------------------------------------------------------------
# FLOPs and roofline per case
# ------------------------------------------------------------------------------------------------------------------
def case_flops(config, n_text: int, visual: int | Sequence[int], batch: int, score_layers: int, new_tokens: int,
               prompt: dict[str, int] | None = None, vision: dict[str, Any] | None = None) -> dict[str, Any]:
    """FLOPs of one case (whole batch), from eval.efficiency.flops; ``visual``: visual tokens per sequence, one count
    for every decoder layer or one per layer (LLM-side methods); ``prompt``: a prompt encoder's FLOPs
    (:func:`prompt_encoder_flops`), added to the whole-model counts (not to the LLM's); ``vision``: what the method adds
    to the vision side (:func:`eval.efficiency.flops.vision_method_costs`; then ``score_layers`` is unused)."""
    tc = config.text_config
    if isinstance(visual, Sequence):
        visual = [int(v) for v in visual]
        tokens = [n_text + v for v in visual]
    else:
        tokens = fastv_tokens_per_layer(tc.num_hidden_layers, n_text, visual)
    vision = vision if vision is not None else {"score_layers": score_layers}
    prefill = flops_exact(config, n_text, visual, logits_to_keep=1, **vision)
    prefill_tri = flops_exact(config, n_text, visual, logits_to_keep=1, attention="triangular", **vision)
    generate = flops_exact(config, n_text, visual, decode_tokens=max(new_tokens - 1, 0), logits_to_keep=1, **vision)
    one_step = flops_exact(config, n_text, visual, decode_tokens=1, logits_to_keep=1)["decode"]
    # logits at every position, no scoring: what calflops sees (merging is part of the encoder it counts)
    full_forward = flops_exact(config, n_text, visual, encoder_merges=vision.get("encoder_merges"),
                               projected_extra=vision.get("projected_extra", 0))
    fastv = tflops_fastv(tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size, tokens)
    extra, extra_linear = (prompt["total"], prompt["linear"]) if prompt else (0, 0)
    return {
        "tflops_fastv": batch * fastv,
        "tflops_exact": (batch * prefill["total"] + extra) / 1e12,
        "tflops_exact_generate": (batch * generate["total"] + extra) / 1e12,
        "tflops_paper_convention": (batch * (full_forward["total"] - full_forward["attention_scores"]) + extra_linear) / 1e12,
        "prompt_encoder_flops": extra,
        "exact_prefill_parts": {k: batch * v for k, v in prefill.items()},
        "llm_prefill_flops": batch * (prefill["llm_prefill"] + prefill["lm_head"]),
        "llm_prefill_flops_triangular": batch * (prefill_tri["llm_prefill"] + prefill_tri["lm_head"]),
        "decode_step_flops": batch * one_step,
    }


ANALYTIC_NA = ("n/a: eval.efficiency.flops counts CLIP vision towers only; this family's vision tower (and its "
               "projector, merger or pixel shuffle) has no tested analytic count, so the whole-model columns (exact, "
               "paper convention) are not given. The LLM parts (Llama-style decoder + lm_head) are analytic; the "
               "whole model is measured (FlopCounterMode over one forward, flops_measured=true)")


def llm_case_flops(config, n_text: int, visual: Sequence[int], batch: int, new_tokens: int,
                   llm_scoring: int = 0) -> dict[str, Any]:
    """FLOPs of one case (whole batch) for a family without an analytic vision count: the LLM parts as
    :func:`case_flops` gives them (eval.efficiency.flops.flops_llm), the whole-model counts None with the reason."""
    tc = config.text_config
    visual = [int(v) for v in visual]
    prefill = flops_llm(config, n_text, visual, logits_to_keep=1, llm_scoring=llm_scoring)
    prefill_tri = flops_llm(config, n_text, visual, logits_to_keep=1, attention="triangular", llm_scoring=llm_scoring)
    one_step = flops_llm(config, n_text, visual, decode_tokens=1, logits_to_keep=1)["decode"]
    generate = flops_llm(config, n_text, visual, decode_tokens=max(new_tokens - 1, 0), logits_to_keep=1,
                         llm_scoring=llm_scoring)
    return {
        "tflops_fastv": batch * tflops_fastv(tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size,
                                             [n_text + v for v in visual]),
        "tflops_exact": None,
        "tflops_exact_generate": None,
        "tflops_paper_convention": None,
        "analytic_na": ANALYTIC_NA,
        "prompt_encoder_flops": 0,
        "exact_prefill_parts": {"llm_prefill": batch * prefill["llm_prefill"], "lm_head": batch * prefill["lm_head"]},
        "llm_generate_flops": batch * (generate["llm_prefill"] + generate["lm_head"] + generate["decode"]),
        "llm_prefill_flops": batch * (prefill["llm_prefill"] + prefill["lm_head"]),
        "llm_prefill_flops_triangular": batch * (prefill_tri["llm_prefill"] + prefill_tri["lm_head"]),
        "decode_step_flops": batch * one_step,
    }


def adapter_patches(model) -> int:
    return hiprune.adapter_for(model).num_patches()


def case_roofline(config, n_tokens: int | Sequence[int], batch: int, dtype: torch.dtype, flops: dict,
                  peaks: dict) -> dict:
    """Roofline bounds of the prefill and of one decode step; ``n_tokens``: tokens per sequence, one count or one
    per decoder layer (LLM-side methods: each layer's KV cache and activations have that layer's length)."""
    width = torch.finfo(dtype).bits // 8
    pre_bytes = prefill_bytes(config, n_tokens, width, batch)
    dec_bytes = decode_bytes(config, n_tokens, width, batch)
    pre = roofline_bound(flops["llm_prefill_flops_triangular"], pre_bytes["total"], peaks["flops_per_s"],
                         peaks["bytes_per_s"])
    dec = roofline_bound(flops["decode_step_flops"], dec_bytes["total"], peaks["flops_per_s"], peaks["bytes_per_s"])
    return {"prefill": {**pre, "bytes": pre_bytes, "flops": flops["llm_prefill_flops_triangular"]},
            "decode": {**dec, "bytes": dec_bytes, "flops": flops["decode_step_flops"]}}


# ------------------------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------------------------
class Case:
    """One (method, budget) on the shared model: its inputs, precomputed LLM input embeddings (LLM-side methods: the
    precomputed image features), a KV cache for the decode step, and the five measured calls. The method is installed
    (``hiprune.apply``) only around calls, so cases can be interleaved."""

    def __init__(self, model, spec: dict, cfg: DictConfig, device: torch.device, dtype: torch.dtype,
                 prompt_encoder=None, processor=None):
        self.model, self.spec, self.device, self.dtype = model, spec, device, dtype
        self.method = spec["method"]
        self.encoder = prompt_encoder if self.method.needs_prompt else None
        self.config = model.config
        self.batch = int(cfg.batch_size)
        self.new_tokens = int(cfg.new_tokens)
        self.adapter_options = spec.get("adapter_options") or {}
        self.llm_scoring = 0  # LLM-side methods: the recorded prefill's scoring FLOPs per sequence (mean over rows)
        self.llm_side = self.method.stage == "llm"
        # families fed by eval.efficiency.inputs (token counts depend on the image): the family's processor output
        self.described = family_inputs(hiprune.adapter_for(model).family)
        before, after = int(cfg.text_tokens_before_image), int(cfg.text_tokens_after_image)
        if self.described is None:
            self.keep = spec["keep"]
            self.inputs = make_inputs(self.config, self.keep, self.batch, before, after, int(cfg.seed), device, dtype)
            self.expected_grids = [self.keep] * self.batch  # one grid per image
            # visual tokens per sequence at each decoder layer; LLM-side methods: checked against every pruned prefill
            self.visual_per_layer = list(spec["visual_per_layer"])
            self.n_text = before + after
        else:
            adapter = hiprune.adapter_for(model, **self.adapter_options)
            counts = adapter.placeholder_counts(self.method)["image"]
            inputs, self.keep, processed = make_family_inputs(self.config, adapter.family, processor, counts,
                                                              list(cfg.image_size), self.batch, before, after,
                                                              int(cfg.seed))
            grids = self.described.grids(adapter, self.method)
            self.expected_grids = [k for i in range(self.batch) for k in grids(processed, i)]
            self.processed = processed
            self.inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
            self.visual_per_layer = visual_tokens_per_layer(self.method, self.keep,
                                                            self.config.text_config.num_hidden_layers)
            # text: everything that is not an image token (the markers around the image included)
            self.n_text = self.inputs["input_ids"].shape[1] - self.keep
        self.seq_len = self.inputs["input_ids"].shape[1]
        self.rope_deltas = None  # M-RoPE families: the prefill's position offset, restored before each decode step
        self.gen_kwargs = {"do_sample": False, "num_beams": 1, "use_cache": True,
                           "pad_token_id": special_id(self.config, "pad_token_id") or 0,
                           "eos_token_id": special_id(self.config, "eos_token_id")}
        self.session = None
        self.embeds = self.image_outputs = self.cache = self.next_token = None
        graphs_asked = bool(cfg.get("cuda_graphs")) and device.type == "cuda"
        self.graphs_off = cuda_graphs_off_reason(self.method) if graphs_asked else None
        self.use_graphs = graphs_asked and self.graphs_off is None
        self.graphs: dict[str, CapturedCall] = {}
        names = MEASUREMENTS + (GRAPH_MEASUREMENTS if self.use_graphs else ())
        self.seconds: dict[str, list[float]] = {name: [] for name in names}
        self.memory: dict[str, dict[str, int]] = {}
        self.measured_flops: dict | None = None

    @property
    def label(self) -> str:
        return f"{self.method.name} {tokens_label(self.keep, self.visual_per_layer)}"

    @contextlib.contextmanager
    def installed(self):
        with torch.inference_mode(), hiprune.apply(self.model, self.method, prompt_encoder=self.encoder,
                                                   **self.adapter_options) as session:
            if self.described is None and session.tokens_per_image() != self.keep:
                raise RuntimeError(f"{self.label}: session keeps {session.tokens_per_image()} tokens per image")
            if self.described is not None:
                self.described.prepare(session.adapter, self.processed)
            self.session = session
            try:
                yield session
            finally:
                self.session = None

    # --- pieces -----------------------------------------------------------------------------------------------
    def _prompts(self) -> None:
        """Prompt-aware methods take the prompt of every image before each forward pass (a list copy inside the
        timing; the text tower itself runs during selection and is timed as part of it)."""
        if self.method.needs_prompt:
            self.session.set_prompts([PROMPT] * self.batch)

    def _check_records(self, _out=None, vision: bool = True, prefill: bool = False) -> None:
        """What the last call did: one vision pass (``vision``) or none, and, for LLM-side methods, one pruned
        prefill (``prefill``) or none, with this case's visual tokens per decoder layer."""
        records = self.session.pop_records()
        kept = [g.tokens_kept for forward in records for g in forward]
        if len(records) != int(vision) or kept != (self.expected_grids if vision else []):
            raise hiprune.PruningError(
                f"{self.label}: expected {'one vision pass' if vision else 'no vision pass'} of {self.batch} "
                f"image(s) keeping {self.expected_grids if vision else []} tokens per grid, got "
                f"{[[g.tokens_kept for g in f] for f in records]}"
            )
        layer_records = self.session.pop_layer_records()
        expected = int(prefill and self.llm_side)
        if len(layer_records) != expected or any(
            r.visual != self.visual_per_layer or r.indices is None or r.indices.shape[0] != self.batch
            for r in layer_records
        ):
            raise hiprune.PruningError(
                f"{self.label}: expected {expected} pruned prefill(s) with {self.visual_per_layer} visual tokens per "
                f"decoder layer for {self.batch} image(s), got {[r.visual for r in layer_records]}"
            )
        for record in layer_records:
            self.llm_scoring = sum(llm_scoring_flops(self.config, ops) for ops in record.scoring) // self.batch

    def _vision(self):
        self._prompts()
        if self.described is not None:  # the family's processor outputs and vision arguments
            return self.model.model.get_image_features(
                pixel_values=self.inputs["pixel_values"], **{k: self.inputs[k] for k in self.described.image_keys},
                **self.described.vision_kwargs(self.config))
        return self.model.model.get_image_features(
            pixel_values=self.inputs["pixel_values"], vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy)

    def _prefill(self):
        if self.described is not None:  # every family here: input_ids + the precomputed image features
            text = {k: v for k, v in self.inputs.items() if k != "pixel_values"}
            return self.model(**text, mm_encoder_outputs={"image": self.image_outputs}, use_cache=True,
                              logits_to_keep=1)
        if self.llm_side:
            # Pre-merged embeddings would hide the image tokens from the method: input_ids + the precomputed image
            # features instead, which HF scatters into the token embeddings (inside the timed call).
            return self.model(input_ids=self.inputs["input_ids"], attention_mask=self.inputs["attention_mask"],
                              mm_encoder_outputs={"image": self.image_outputs}, use_cache=True, logits_to_keep=1)
        return self.model(inputs_embeds=self.embeds, attention_mask=self.inputs["attention_mask"], use_cache=True,
                          logits_to_keep=1)

    def _check_prefill(self, _out=None) -> None:
        self._check_records(vision=False, prefill=True)

    def make_cache(self) -> None:
        """A prefill's KV cache and its next token, for the decode step (untimed)."""
        first = self._prefill()
        self._check_prefill()
        self.rope_deltas = getattr(self.model.model, "rope_deltas", None)
        self.cache, self.next_token = first.cache, first.logits[:, -1:].argmax(-1)
        self.step_mask = torch.ones(self.batch, self.seq_len + 1, dtype=self.inputs["attention_mask"].dtype,
                                    device=self.device)

    def drop_cache(self) -> None:
        self.cache = self.next_token = None
        self.graphs = {}  # frees the graphs' private memory pools (they would inflate other cases' peak memory)

    def capture_graphs(self) -> None:
        """CUDA graphs of the prefill (on this case's embeddings) and of one decode step after it (untimed).

        Captured without an attention mask: the inputs have no padding, and transformers then skips the mask the
        same way it does for an all-ones mask (SDPA's causal path), so the kernels are the eager calls' kernels.
        The replayed prefill's logits are checked against the eager prefill's."""
        embeds = self.embeds

        def prefill():
            return self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

        graph_prefill = CapturedCall(prefill)
        reference = self._prefill().logits
        replayed = graph_prefill.replay().logits
        if not torch.allclose(replayed.float(), reference.float(), rtol=1e-2, atol=1e-2):
            error = (replayed.float() - reference.float()).abs().max().item()
            raise RuntimeError(f"{self.label}: CUDA-graph prefill differs from the eager prefill (max |diff| {error:.3g})")
        first = self._prefill()
        cache, token = first.cache, first.logits[:, -1:].argmax(-1)

        def decode():
            return self.model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)

        def restore():
            cache.crop(self.seq_len - cache.get_seq_length())  # a negative count removes that many positions
            if cache.get_seq_length() != self.seq_len:
                raise RuntimeError(f"{self.label}: graph decode cache holds {cache.get_seq_length()} positions")

        # The graph reads the prefill cache's tensors as they are at capture time: keep them alive with it.
        graph_decode = CapturedCall(decode, after_warmup=restore, keep_alive=cache)
        self.graphs = {"prefill_graph": graph_prefill, "decode_graph": graph_decode}

    def setup(self) -> None:
        """Input embeddings with this method's kept visual tokens scattered in (LLM-side methods: the image features
        alone), and a decode cache (untimed)."""
        with self.installed():
            self.session.pop_records()
            self.session.pop_layer_records()
            image_outputs = self._vision()
            self._check_records()
            if self.described is not None:
                self.image_outputs = image_outputs  # as the family's get_image_features returned them
                self.make_cache()
                return
            if self.llm_side:
                self.image_outputs = BaseModelOutputWithPooling(pooler_output=list(image_outputs.pooler_output))
                self.make_cache()
                return
            features = torch.cat(list(image_outputs.pooler_output), dim=0)
            inner = self.model.model
            embeds = inner.get_input_embeddings()(self.inputs["input_ids"])
            mask = (self.inputs["input_ids"] == self.config.image_token_id).unsqueeze(-1)
            self.embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
            self.make_cache()
            if self.use_graphs:
                self.capture_graphs()

    def calls(self, graphs: bool = True) -> dict[str, Call]:
        def ttft():
            self._prompts()
            return self.model.generate(**self.inputs, max_new_tokens=1, **self.gen_kwargs)

        def generate():
            self._prompts()
            return self.model.generate(**self.inputs, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                       **self.gen_kwargs)

        def check_generated(n: int):
            def check(out):
                self._check_records(prefill=True)
                if out.shape != (self.batch, self.seq_len + n):
                    raise RuntimeError(f"{self.label}: generate made {out.shape[1] - self.seq_len} tokens, expected {n}")
            return check

        def decode():
            if self.rope_deltas is not None:
                # M-RoPE: this case's position offset (other cases' prefills overwrote it); no attention mask (all
                # ones, no padding: the same kernels), since HF's M-RoPE step builds positions from the whole mask
                self.model.model.rope_deltas = self.rope_deltas
                return self.model(input_ids=self.next_token, cache=self.cache, use_cache=True, logits_to_keep=1)
            return self.model(input_ids=self.next_token, attention_mask=self.step_mask, cache=self.cache,
                              use_cache=True, logits_to_keep=1)

        def crop():
            self.cache.crop(-1)
            if self.cache.get_seq_length() != self.seq_len:
                raise RuntimeError(f"{self.label}: decode cache holds {self.cache.get_seq_length()} positions")

        def check_decode(_out):
            self._check_records(vision=False, prefill=False)

        return {
            "vision": Call(self._vision, check=self._check_records),
            "prefill": Call(self._prefill, check=self._check_prefill),
            "ttft": Call(ttft, check=check_generated(1)),
            "decode": Call(decode, check=check_decode, after=crop),
            "generate": Call(generate, check=check_generated(self.new_tokens)),
            **({name: Call(graph.replay) for name, graph in self.graphs.items()} if graphs else {}),
        }

    # --- phases -----------------------------------------------------------------------------------------------
    def warm_up(self, n: int) -> None:
        with self.installed():
            for call in self.calls().values():
                for _ in range(n):
                    call.run(self.device, timed=False)

    def timed_round(self) -> None:
        with self.installed():
            for name, call in self.calls().items():
                self.seconds[name].append(call.run(self.device))

    def measure_memory(self, probe: MemoryProbe) -> None:
        """One call of each measurement with a peak-memory window; nothing of another case is held."""
        with self.installed():
            self.make_cache()
            for name, call in self.calls(graphs=False).items():
                probe.start()
                call.run(self.device, timed=False)
                self.memory[name] = probe.stop()
            self.drop_cache()

    def count_flops(self) -> None:
        with self.installed():
            self._prompts()
            self.measured_flops = flops_measured(self.model, {**self.inputs, "logits_to_keep": 1})
            self._check_records(prefill=True)

    def result(self, peaks: dict) -> dict[str, Any]:
        method = self.method
        visual = self.visual_per_layer  # LLM-side methods: what every pruned prefill of this case recorded
        if self.described is not None:
            flops = llm_case_flops(self.config, self.n_text, visual, self.batch, self.new_tokens, self.llm_scoring)
        else:
            score_layers = len(method.score_layers()) if method.stage == "vision" else 0
            prompt = (prompt_encoder_flops(self.encoder, adapter_patches(self.model), self.batch) if self.encoder
                      else None)
            costs = vision_method_costs(method, self.config, prompt_width(self.encoder))
            if self.llm_scoring:
                costs = {**costs, "llm_scoring": self.llm_scoring}
            flops = case_flops(self.config, self.n_text, visual, self.batch, score_layers, self.new_tokens, prompt,
                               costs)
        measured = self.measured_flops
        if measured is not None:
            flops["tflops_measured"] = measured["total"] / 1e12
            flops["measured_parts"] = {k: v for k, v in measured.items() if k != "by_op"}
            flops["sdpa_ops"] = sorted(op for op in measured["by_op"] if "scaled_dot_product" in op)
            if flops["tflops_exact"] is not None:
                flops["measured_vs_exact"] = measured["total"] / (flops["tflops_exact"] * 1e12) - 1
            else:  # the LLM parts only: FlopCounterMode's decoder + lm_head against the analytic LLM prefill
                flops["measured_vs_exact"] = None
                flops["measured_llm_vs_analytic"] = ((measured["language_model"] + measured["lm_head"])
                                                     / flops["llm_prefill_flops"] - 1)
        roofline = case_roofline(self.config, [self.n_text + v for v in visual], self.batch, self.dtype, flops, peaks)
        return {
            "visual_tokens": self.keep, "visual_tokens_per_layer": visual, "n_text": self.n_text,
            # kept tokens of every grid of the batch's images (crops, tiles), as every vision pass recorded them
            **({"visual_tokens_per_grid": self.expected_grids, "adapter_options": self.adapter_options}
               if self.described is not None else {}),
            "seq_len": self.seq_len,
            "tokens_per_s": tokens_per_s(self.batch, self.seq_len, self.seconds, roofline),
            **({"cuda_graphs_off": self.graphs_off} if self.graphs_off else {}),
            "timings": {k: summarize(v) for k, v in self.seconds.items()},
            "throughput_tok_s": summarize([self.batch * self.new_tokens / t for t in self.seconds["generate"]]),
            "memory": self.memory, "seconds": self.seconds, "flops": flops,
            "roofline": roofline,
        }


def tokens_per_s(batch: int, seq_len: int, seconds: dict[str, list[float]], roofline: dict) -> dict[str, float]:
    """Prefill tokens/s (batch x prompt tokens per eager prefill, and per replayed graph where measured) and generated
    tokens/s (batch per decode step), medians, next to the roofline's bound on each (issue 18)."""
    def median(name: str) -> float | None:
        values = sorted(seconds.get(name) or [])
        return values[len(values) // 2] if values else None

    out = {"prefill_tokens": batch * seq_len,
           "prefill_bound": batch * seq_len / roofline["prefill"]["seconds"],
           "prefill_bound_by": roofline["prefill"]["bound_by"],
           "decode_bound": batch / roofline["decode"]["seconds"],
           "decode_bound_by": roofline["decode"]["bound_by"]}
    for name, per_call in (("prefill", batch * seq_len), ("prefill_graph", batch * seq_len), ("decode", batch),
                           ("decode_graph", batch)):
        if median(name):
            out[name] = per_call / median(name)
    return out


def write_batch_table(benches: list[dict], out: Path) -> list[Path]:
    """One row per (batch size, case): prefill and generated tokens/s against their roofline bounds."""
    rows = []
    for bench in benches:
        meta = bench["meta"]
        for case in bench["cases"]:
            if case.get("status") != "ran":
                continue
            t = case["tokens_per_s"]
            rows.append({
                "batch_size": meta["batch_size"], "method": case["method"], "visual_tokens": case["visual_tokens"],
                "prefill_tok_s": t.get("prefill"), "prefill_graph_tok_s": t.get("prefill_graph"),
                "prefill_bound_tok_s": t["prefill_bound"], "prefill_bound_by": t["prefill_bound_by"],
                "prefill_of_bound": t.get("prefill_graph", t.get("prefill")) / t["prefill_bound"],
                "generated_tok_s": t.get("decode"), "generated_graph_tok_s": t.get("decode_graph"),
                "generated_bound_tok_s": t["decode_bound"], "generated_bound_by": t["decode_bound_by"],
                "generated_of_bound": t.get("decode_graph", t.get("decode")) / t["decode_bound"],
            })
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "tokens_per_s.csv", out / "tokens_per_s.md"
    keys = list(rows[0]) if rows else []
    csv_path.write_text("\n".join([",".join(keys)] + [",".join("" if r[k] is None else str(r[k]) for k in keys)
                                                      for r in rows]) + "\n")
    meta = benches[0]["meta"] if benches else {}

    def fmt(v):
        return "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [(f"# Prefill and generated tokens/s vs the roofline: {meta.get('model')} on {meta.get('device_name')} "
              f"({meta.get('dtype')})"), "",
             ("Medians; prefill = batch x prompt tokens per eager prefill call (graph: replayed from CUDA graphs); "
              "generated = batch tokens per decode step; bound = the roofline's (max of compute and memory time); "
              "of bound = best measured / bound."), "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def run_cases(cases: list[Case], cfg: DictConfig, probe: MemoryProbe, log: Callable[[str], None]) -> None:
    """Set-up and warm-up per case, then ``repeats`` rounds over all cases (the order rotates every round, so slow
    phases of a shared machine or clock changes spread over all cases instead of biasing one), then one memory
    pass per case with the decode caches of all other cases released, then FlopCounterMode per case."""
    for case in cases:
        case.setup()
        case.warm_up(int(cfg.warmup))
    repeats = int(cfg.repeats)
    for r in range(repeats):
        t0 = time.perf_counter()
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            case.timed_round()
        log(f"[bench] round {r + 1}/{repeats} done in {time.perf_counter() - t0:.1f} s")
    for case in cases:
        case.drop_cache()
    for case in cases:
        case.measure_memory(probe)
        if cfg.flops_measured:
            case.count_flops()
        case.embeds = case.image_outputs = None


# ------------------------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------------------------
def attention_backend(device: torch.device, attn: str, sdpa_ops: list[str]) -> str:
    """Human-readable attention backend: the HF implementation and, if observed, the SDPA kernel that ran."""
    text = attn
    if sdpa_ops:
        text += " (" + ", ".join(op.removeprefix("aten.") for op in sdpa_ops) + ")"
    if device.type == "cuda" and attn == "sdpa" and not sdpa_ops:
        text += f" (flash {torch.backends.cuda.flash_sdp_enabled()}, mem-efficient {torch.backends.cuda.mem_efficient_sdp_enabled()})"
    return text


def run(cfg: DictConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.time()
    device = resolve_device(str(cfg.device))
    dtype_name = str(cfg.model.dtype)
    if dtype_name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype_name!r}; choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    for key in ("warmup", "repeats", "new_tokens", "batch_size"):
        if int(cfg[key]) < (0 if key == "warmup" else 1):
            raise ConfigError(f"{key} must be >= {0 if key == 'warmup' else 1}, got {cfg[key]}")
    if cfg.get("cuda_graphs") and device.type != "cuda":
        raise ConfigError(f"cuda_graphs=true needs a CUDA device, got device={device}")
    if int(cfg.text_tokens_before_image) < 1 or int(cfg.text_tokens_after_image) < 0:
        raise ConfigError("text_tokens_before_image must be >= 1 (it holds BOS) and text_tokens_after_image >= 0")

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))  # CPU intra-op threads (also used by the peak benchmarks)
    config, source = architecture_config(cfg.model)
    attn = str(cfg.model.attn_implementation)
    skeleton = weightless(config)
    family = hiprune.adapter_for(skeleton).family
    described = family_inputs(family)
    if described is None and family != "llava":
        raise ConfigError(
            f"eval.efficiency.bench does not feed the {family} family (videos): it runs LLaVA-1.5 and the families "
            f"of eval/efficiency/inputs.py ({', '.join(sorted(FAMILIES))})")
    cases = plan_cases(cfg, skeleton)
    n_params = parameter_count(skeleton)
    if cfg.get("dry_run") and described is not None:
        family_token_counts(cfg, config, skeleton, cases)
    del skeleton
    needs_prompt = any(c["status"] == "planned" and c["method"].needs_prompt for c in cases)
    if needs_prompt:  # weightless first: its parameters count towards the memory check
        prompt_encoder, prompt_source = build_prompt_encoder(cfg, config, dtype, torch.device("meta"))
        n_params += sum(p.numel() for part in (prompt_encoder.text_model, prompt_encoder.text_projection,
                                               prompt_encoder.visual_projection) for p in part.parameters())
    if cfg.get("dry_run"):
        return dry_run(cfg, config, source, cases, n_params, dtype, device, log,
                       prompt_encoder if needs_prompt else None)
    memory_check = check_memory(n_params, dtype, device, float(cfg.memory_limit_fraction))
    tag = cfg.tag or f"{cfg.model.name}-{device.type}-{dtype_name}"
    if cfg.get("batch_sizes") and not cfg.tag:
        tag += f"-b{int(cfg.batch_size)}"
    out_dir = repo_path(cfg.out_dir) / tag

    log(f"[bench] {cfg.model.name} ({n_params / 1e9:.3f}B parameters, random weights from {source}) on "
        f"{device_name(device)}, {dtype_name}, attention {attn}")
    load_start = load_average()
    roof = cfg.roofline
    roof_args = {"sizes": list(roof.sizes) if roof.sizes else None,
                 "copy_bytes": int(roof.copy_mib) << 20 if roof.copy_mib else None, "repeats": int(roof.repeats)}
    peaks_start = measure_peaks(device, dtype, **roof_args).to_dict()
    log(f"[bench] peaks at start: {peaks_start['flops_per_s'] / 1e12:.3f} TFLOP/s, "
        f"{peaks_start['bytes_per_s'] / 1e9:.1f} GB/s")

    processor = image_processor(family, config, cfg.model) if described is not None else None
    t0 = time.perf_counter()
    model = build_model(config, dtype, device, attn, int(cfg.seed))
    prompt_encoder, prompt_source = build_prompt_encoder(cfg, config, dtype, device) if needs_prompt else (None, None)
    build_seconds = time.perf_counter() - t0
    probe = MemoryProbe(device)
    log(f"[bench] model built in {build_seconds:.1f} s; {len([c for c in cases if c['status'] == 'planned'])} cases, "
        f"{cfg.warmup} warm-up + {cfg.repeats} timed calls per measurement, {cfg.new_tokens} generated tokens")

    planned = [Case(model, c, cfg, device, dtype, prompt_encoder, processor) for c in cases
               if c["status"] == "planned"]
    graphs_off = {case.label: case.graphs_off for case in planned if case.graphs_off}
    for label, reason in graphs_off.items():
        log(f"[bench] {label}: CUDA graphs off ({reason})")
    run_cases(planned, cfg, probe, log)

    peaks_end = measure_peaks(device, dtype, **roof_args).to_dict()
    used = {"flops_per_s": max(peaks_start["flops_per_s"], peaks_end["flops_per_s"]),
            "bytes_per_s": max(peaks_start["bytes_per_s"], peaks_end["bytes_per_s"])}
    log(f"[bench] peaks at end: {peaks_end['flops_per_s'] / 1e12:.3f} TFLOP/s, {peaks_end['bytes_per_s'] / 1e9:.1f} GB/s;"
        f" bound uses {used['flops_per_s'] / 1e12:.3f} TFLOP/s, {used['bytes_per_s'] / 1e9:.1f} GB/s")
    by_spec = {id(c.spec): c for c in planned}
    full_tokens = (int(cfg.model.tokens_per_image) if described is None else
                   next((c.keep for c in planned if c.method.name == "none"), None))
    results = []
    for spec in cases:
        entry = {"method": spec["name"], "budget": spec["budget"], "options": spec["options"],
                 "source": spec["source"], "status": spec["status"], "reason": spec["reason"]}
        case = by_spec.get(id(spec))
        if case is None:
            log(f"  {spec['name']:>10} skipped: {spec['reason']}")
        else:
            entry.update(status="ran", method_settings=case.method.describe(), **case.result(used))
            t, bound = entry["timings"], entry["roofline"]["prefill"]["seconds"]
            tokens = tokens_label(case.keep, case.visual_per_layer)
            log(f"  {case.method.name:>10} {tokens:>4} tokens: vision {t['vision']['median'] * 1e3:8.1f} ms  "
                f"prefill {t['prefill']['median'] * 1e3:8.1f} ms (bound {bound * 1e3:.1f})  "
                f"ttft {t['ttft']['median'] * 1e3:8.1f} ms  decode {t['decode']['median'] * 1e3:7.1f} ms  "
                f"{entry['throughput_tok_s']['median']:.2f} tok/s  peak {entry['memory']['generate']['peak_bytes'] / 2**30:.2f} GiB"
                + (f"  | CUDA graph: prefill {t['prefill_graph']['median'] * 1e3:.2f} ms, decode "
                   f"{t['decode_graph']['median'] * 1e3:.2f} ms (bound {entry['roofline']['decode']['seconds'] * 1e3:.2f})"
                   if "prefill_graph" in t else ""))
        results.append(entry)
    del planned, model, prompt_encoder
    gc.collect()

    sdpa_ops = sorted({op for e in results if e["status"] == "ran" for op in e["flops"].get("sdpa_ops", [])})
    tc = config.text_config
    bench = {
        "meta": {
            "model": cfg.model.name,
            "architecture": repo_relative(source),
            "arch_overrides": (OmegaConf.to_container(cfg.model.arch_overrides, resolve=True)
                               if cfg.model.get("arch_overrides") else {}),
            "parameters": n_params,
            "llm": {"hidden": tc.hidden_size, "intermediate": tc.intermediate_size, "layers": tc.num_hidden_layers,
                    "heads": tc.num_attention_heads, "kv_heads": tc.num_key_value_heads, "vocab": tc.vocab_size},
            "weights": "random (transformers init), built on the device",
            "prompt_encoder": prompt_source,
            "device": device.type,
            "device_name": device_name(device),
            "dtype": dtype_name,
            "attn_implementation": attn,
            "attention_backend": attention_backend(device, attn, sdpa_ops),
            "batch_size": int(cfg.batch_size),
            "text_tokens": int(cfg.text_tokens_before_image) + int(cfg.text_tokens_after_image),
            "family": family,
            "tokens_per_image_full": full_tokens,  # families fed by eval.efficiency.inputs: method none's count
            **({"inputs": {
                "image_size": list(cfg.image_size), "image_processor": type(processor).__name__,
                "image_processor_source": ("the model folder's processor_config.json" if cfg.model.get("local")
                                           else "class defaults + the architecture and model configs"),
                "prefill": described.prefill, "flops_analytic": ANALYTIC_NA,
            }} if described is not None else {}),
            "new_tokens": int(cfg.new_tokens),
            "warmup": int(cfg.warmup),
            "repeats": int(cfg.repeats),
            "timer": timer_name(device),
            "cuda_graphs": bool(cfg.get("cuda_graphs")) and device.type == "cuda",
            "cuda_graphs_off": graphs_off,  # case -> why its graph replays were not measured
            "memory": probe.kind,
            "memory_check": memory_check,
            "build_seconds": build_seconds,
            "load_average_start": load_start,
            "load_average_end": load_average(),
            "torch_threads": torch.get_num_threads(),
            "versions": versions(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "command": repo_relative(" ".join(sys.argv)),
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - started, 1),
        },
        "peaks": {"start": peaks_start, "end": peaks_end, "used": used, "goal": float(roof.goal)},
        "cases": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(bench, indent=1, default=str) + "\n")
    written = write_tables(bench, out_dir)
    log(f"[bench] wrote {path}" + "".join(f"\n[bench] wrote {p}" for p in written))
    return bench


def family_token_counts(cfg: DictConfig, config, skeleton, cases: list[dict]) -> None:
    """Dry run of a family fed by eval.efficiency.inputs: every planned case's visual tokens (what the family's
    processor emits for the configured image under the method), text tokens and visual tokens per decoder layer, from
    the image processor and the weightless model's adapter (nothing is built)."""
    family = hiprune.adapter_for(skeleton).family
    processor = image_processor(family, config, cfg.model)
    before, after = int(cfg.text_tokens_before_image), int(cfg.text_tokens_after_image)
    for case in cases:
        if case["status"] != "planned":
            continue
        adapter = hiprune.adapter_for(skeleton, **case["adapter_options"])
        counts = adapter.placeholder_counts(case["method"])["image"]
        inputs, keep, _ = make_family_inputs(config, family, processor, counts, list(cfg.image_size),
                                             int(cfg.batch_size), before, after, int(cfg.seed))
        case["keep"] = keep
        case["n_text"] = inputs["input_ids"].shape[1] - keep
        case["visual_per_layer"] = visual_tokens_per_layer(case["method"], keep, config.text_config.num_hidden_layers)


def dry_run(cfg: DictConfig, config, source: str, cases: list[dict], n_params: int, dtype: torch.dtype,
            device: torch.device, log: Callable[[str], None], prompt_encoder=None) -> dict[str, Any]:
    """Plan, memory check and FLOPs on the weightless model only: nothing is built, timed or written."""
    try:
        memory = {"fits": True, **check_memory(n_params, dtype, device, float(cfg.memory_limit_fraction))}
    except ConfigError as exc:
        memory = {"fits": False, "message": str(exc)}
    n_text = int(cfg.text_tokens_before_image) + int(cfg.text_tokens_after_image)
    plan = []
    log(f"[bench] dry run: {cfg.model.name} ({n_params / 1e9:.3f}B parameters from {source}), "
        f"{str(dtype).removeprefix('torch.')} on {device}: " + ("fits" if memory["fits"] else memory["message"]))
    for case in cases:
        entry = {"method": case["name"], "budget": case["budget"], "status": case["status"], "reason": case["reason"]}
        if case["status"] == "planned":
            method = case["method"]
            score_layers = len(method.score_layers()) if method.stage == "vision" else 0
            entry["visual_tokens"] = case["keep"]
            entry["visual_tokens_per_layer"] = case["visual_per_layer"]
            tokens = tokens_label(case["keep"], case["visual_per_layer"])
            if "n_text" in case:  # a family fed by eval.efficiency.inputs: the LLM's FLOPs only (no vision count)
                entry["n_text"] = case["n_text"]
                entry["flops"] = llm_case_flops(config, case["n_text"], case["visual_per_layer"],
                                                int(cfg.batch_size), int(cfg.new_tokens))
                log(f"  {case['name']:>10} {tokens:>4} tokens: LLM prefill TFLOPs "
                    f"{entry['flops']['llm_prefill_flops'] / 1e12:.2f}, FastV {entry['flops']['tflops_fastv']:.2f} "
                    "(no analytic vision count)")
                plan.append(entry)
                continue
            patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
            prompt = (prompt_encoder_flops(prompt_encoder, patches, int(cfg.batch_size))
                      if method.needs_prompt and prompt_encoder is not None else None)
            costs = vision_method_costs(method, config, prompt_width(prompt_encoder) if prompt else None)
            entry["flops"] = case_flops(config, n_text, case["visual_per_layer"], int(cfg.batch_size), score_layers,
                                        int(cfg.new_tokens), prompt, costs)
            log(f"  {case['name']:>10} {tokens:>4} tokens: TFLOPs paper convention "
                f"{entry['flops']['tflops_paper_convention']:.2f}, exact {entry['flops']['tflops_exact']:.2f}, "
                f"FastV {entry['flops']['tflops_fastv']:.2f}")
        else:
            log(f"  {case['name']:>10} skipped: {case['reason']}")
        plan.append(entry)
    return {"dry_run": True, "parameters": n_params, "memory": memory, "cases": plan}


@hydra.main(config_path=str(CONFIG_DIR), config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.get("batch_sizes"):  # one run per batch size, then the tokens/s table over all of them
            benches = []
            for bs in cfg.batch_sizes:
                one = cfg.copy()
                one.batch_size = int(bs)
                one.tag = f"{cfg.tag}-b{bs}" if cfg.tag else None
                benches.append(run(one))
            benches = [b for b in benches if "meta" in b]
            if benches:
                m = benches[0]["meta"]
                out = repo_path(cfg.out_dir) / (f"{cfg.tag}-batches" if cfg.tag else
                                                 f"{m['model']}-{m['device']}-{m['dtype']}-batches")
                for path in write_batch_table(benches, out):
                    print(f"[bench] wrote {path}")
        else:
            run(cfg)
    except ConfigError as exc:
        print(f"[bench] configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
