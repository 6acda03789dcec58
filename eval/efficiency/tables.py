"""Efficiency tables from an eval.efficiency.bench result: the paper's Table 5 with our numbers beside it, and the
roofline comparison (issue 8, deliverables 3 and 5).

    python -m eval.efficiency.tables results/efficiency/llava15_mid_cpu-cpu-bfloat16/bench.json [--out DIR]

Writes into the bench.json's folder (or --out):

  table5.csv / table5.md      one row per method x budget (the paper's rows included, also where we did not run
                              them): our TFLOPs (paper convention, exact, FastV, measured), prefill, decode,
                              throughput and peak memory, each with its ratio to our full model; the paper's
                              numbers (results/reference/paper_efficiency.csv, LLaVA-1.5-7B on an A100-40G) with
                              their ratio to the paper's vanilla row. Device, dtype and attention backend are
                              columns of the CSV and the caption of the Markdown.
  roofline.csv / roofline.md  per budget: measured prefill ratio (pruned / full) next to the FLOPs ratio and the
                              roofline-bound ratio; measured prefill next to its bound max(FLOPs / peak FLOP/s,
                              bytes / bandwidth) with the peaks measured in the same run, and whether it is within
                              the goal (measured <= 1.3 x bound, a GPU goal); the same for one decode step.
  measurements.csv            every measurement (vision, prefill, ttft, decode, generate): median, quartiles, IQR,
                              mean, std, n, peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from eval.report.paper import load_efficiency

# paper method name -> harness method name
PAPER_METHODS = {"vanilla": "none", "HiPrune": "hiprune", "HiPrune++": "hiprune_pp", "Random": "random"}
OUR_TO_PAPER = {v: k for k, v in PAPER_METHODS.items()}
METHOD_ORDER = ["none", "hiprune", "hiprune_pp", "random"]
PAPER_SETUP = ("paper: LLaVA-1.5-7B, one ~600-token example, A100-40G, 11 runs with the first dropped (mean and "
               "std), CUDA events; TFLOPs by calflops (linear layers of one full forward: attention scores missed "
               "under SDPA); VRAM = torch.cuda.max_memory_allocated")
GB = 1e9


def load_paper(root: Path | None = None, model: str = "llava-1.5-7b") -> pd.DataFrame:
    """The paper's Table 5 rows of ``model`` (results/reference/paper_efficiency.csv), in harness method names."""
    frame = load_efficiency(root)
    frame = frame[frame["model"] == model].copy()
    frame["method"] = frame["method"].map(lambda m: PAPER_METHODS.get(m, m.lower()))
    frame["budget"] = frame["budget"].astype(int)
    return frame


def _ratio(value, full) -> float:
    if value is None or full is None or pd.isna(value) or pd.isna(full) or full == 0:
        return math.nan
    return value / full


def _budget(case: dict, full_tokens: int | None) -> int | float:
    """The case's budget (an int count, or a float ratio of every image / crop / tile); method none: the full count
    (``full_tokens``, or the case's own visual tokens where the count depends on the image)."""
    if case.get("budget") is not None:
        budget = case["budget"]
        return budget if isinstance(budget, float) else int(budget)
    return full_tokens if full_tokens is not None else int(case.get("visual_tokens") or 0)


def _full_tokens(meta: dict) -> int | None:
    value = meta.get("tokens_per_image_full")
    return None if value is None else int(value)


def _budget_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) and not float(value).is_integer() else str(int(value))


def _paper_for(meta: dict, paper: pd.DataFrame | None) -> pd.DataFrame:
    """The paper's Table 5 (LLaVA-1.5-7B) beside LLaVA-1.5 runs only; other families have no paper rows."""
    if meta.get("family", "llava") != "llava":
        return pd.DataFrame(columns=["method", "budget", "tflops", "prefill_ms", "prefill_ms_std", "decode_ms",
                                     "decode_ms_std", "throughput_tok_s", "throughput_std", "vram_gb"])
    return load_paper() if paper is None else paper


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def attention_label(meta: dict) -> str:
    return meta.get("attention_backend") or meta.get("attn_implementation", "?")


def table5(bench: dict, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table-5-shaped frame: ours beside the paper's, ratios against each side's own full model."""
    meta = bench["meta"]
    full_tokens = _full_tokens(meta)
    paper = _paper_for(meta, paper)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for case in bench["cases"]:
        if case.get("budget") is None and case["status"] != "ran" and case["method"] != "none":
            # a method that did not run at any budget: one row per paper budget below, marked with the reason
            for budget in sorted(paper.loc[paper["method"] == case["method"], "budget"], reverse=True) or [None]:
                if budget is not None:
                    rows[(case["method"], budget)] = {"method": case["method"], "budget": budget,
                                                      "status": f"not run: {case['reason']}"}
            continue
        key = (case["method"], _budget(case, full_tokens))
        row = {"method": case["method"], "budget": key[1], "status": case["status"]}
        if case["status"] != "ran":
            row["status"] = f"not run: {case['reason']}"
            rows[key] = row
            continue
        t, f = case["timings"], case["flops"]
        row.update({
            "visual_tokens": case["visual_tokens"],
            "tokens_label": _tokens_label(case),
            "tflops_paper_convention": f["tflops_paper_convention"],
            "tflops_exact": f["tflops_exact"],
            "tflops_fastv": f["tflops_fastv"],
            "tflops_measured": f.get("tflops_measured", math.nan),
            "vision_ms": t["vision"]["median"] * 1e3,
            "prefill_ms": t["prefill"]["median"] * 1e3,
            "prefill_iqr_ms": t["prefill"]["iqr"] * 1e3,
            "ttft_ms": t["ttft"]["median"] * 1e3,
            "decode_ms": t["decode"]["median"] * 1e3,
            "decode_iqr_ms": t["decode"]["iqr"] * 1e3,
            "throughput_tok_s": case["throughput_tok_s"]["median"],
            "throughput_iqr": case["throughput_tok_s"]["iqr"],
            "memory_gb": case["memory"]["generate"]["peak_bytes"] / GB,
        })
        rows[key] = row
    for _, p in paper.iterrows():
        key = (p["method"], int(p["budget"]))
        row = rows.setdefault(key, {"method": p["method"], "budget": int(p["budget"]), "status": "not run"})
        row.update({
            "paper_tflops": p["tflops"], "paper_prefill_ms": p["prefill_ms"], "paper_prefill_std": p["prefill_ms_std"],
            "paper_decode_ms": p["decode_ms"], "paper_decode_std": p["decode_ms_std"],
            "paper_throughput_tok_s": p["throughput_tok_s"], "paper_throughput_std": p["throughput_std"],
            "paper_vram_gb": p["vram_gb"],
        })
    frame = pd.DataFrame(list(rows.values()))
    ours_cols = ["visual_tokens", "tokens_label", "tflops_paper_convention", "tflops_exact", "tflops_fastv", "tflops_measured",
                 "vision_ms", "prefill_ms", "prefill_iqr_ms", "ttft_ms", "decode_ms", "decode_iqr_ms",
                 "throughput_tok_s", "throughput_iqr", "memory_gb"]
    paper_cols = ["paper_tflops", "paper_prefill_ms", "paper_prefill_std", "paper_decode_ms", "paper_decode_std",
                  "paper_throughput_tok_s", "paper_throughput_std", "paper_vram_gb"]
    for col in ours_cols + paper_cols:
        if col not in frame:
            frame[col] = math.nan
    frame["paper_method"] = frame["method"].map(lambda m: OUR_TO_PAPER.get(m, ""))

    def full_of(column: str):
        full = full_tokens if full_tokens is not None else frame.loc[frame["method"] == "none", "budget"].max()
        sel = frame.loc[(frame["method"] == "none") & (frame["budget"] == full), column]
        return sel.iloc[0] if len(sel) else math.nan

    ratios = {
        "tflops_ratio": "tflops_paper_convention", "tflops_exact_ratio": "tflops_exact",
        "tflops_measured_ratio": "tflops_measured", "prefill_ratio": "prefill_ms",
        "ttft_ratio": "ttft_ms", "decode_ratio": "decode_ms", "throughput_ratio": "throughput_tok_s",
        "memory_ratio": "memory_gb",
        "paper_tflops_ratio": "paper_tflops", "paper_prefill_ratio": "paper_prefill_ms",
        "paper_decode_ratio": "paper_decode_ms", "paper_throughput_ratio": "paper_throughput_tok_s",
        "paper_vram_ratio": "paper_vram_gb",
    }
    for name, column in ratios.items():
        full = full_of(column)
        frame[name] = [_ratio(v, full) for v in frame[column]]
    frame["model"] = meta["model"]
    frame["device"] = meta["device_name"]
    frame["dtype"] = meta["dtype"]
    frame["attention"] = attention_label(meta)
    frame["batch_size"] = meta["batch_size"]
    frame["_order"] = frame["method"].map(_order)
    frame = frame.sort_values(["_order", "method", "budget"], ascending=[True, True, False]).drop(columns="_order")
    columns = (["method", "paper_method", "budget", "status"] + ours_cols
               + ["tflops_ratio", "tflops_exact_ratio", "prefill_ratio", "ttft_ratio", "decode_ratio",
                  "throughput_ratio", "memory_ratio"]
               + (["tflops_measured_ratio"] if meta.get("inputs") else [])
               + paper_cols
               + ["paper_tflops_ratio", "paper_prefill_ratio", "paper_decode_ratio", "paper_throughput_ratio",
                  "paper_vram_ratio"]
               + ["model", "device", "dtype", "attention", "batch_size"])
    return frame[columns].reset_index(drop=True)


def roofline_table(bench: dict) -> pd.DataFrame:
    """Deliverable 5: measured prefill ratio vs FLOPs ratio, measured prefill vs its roofline bound."""
    meta = bench["meta"]
    goal = float(bench["peaks"].get("goal", 1.3))
    full_tokens = _full_tokens(meta)
    ran = [c for c in bench["cases"] if c["status"] == "ran"]
    full = next((c for c in ran if c["method"] == "none"), None)
    rows = []
    for case in ran:
        pre, dec = case["roofline"]["prefill"], case["roofline"]["decode"]
        measured = case["timings"]["prefill"]["median"]
        decode = case["timings"]["decode"]["median"]
        rows.append({
            "method": case["method"],
            "budget": _budget(case, full_tokens),
            "visual_tokens": case["visual_tokens"],
            "llm_tokens": case["n_text"] + case["visual_tokens"],
            "prefill_ms": measured * 1e3,
            "prefill_iqr_ms": case["timings"]["prefill"]["iqr"] * 1e3,
            "prefill_ratio_measured": _ratio(measured, full["timings"]["prefill"]["median"]) if full else math.nan,
            "prefill_flops_ratio": _ratio(case["flops"]["llm_prefill_flops"], full["flops"]["llm_prefill_flops"]) if full else math.nan,
            "prefill_bound_ratio": _ratio(pre["seconds"], full["roofline"]["prefill"]["seconds"]) if full else math.nan,
            "prefill_tflops": pre["flops"] / 1e12,
            "prefill_gbytes": pre["bytes"]["total"] / GB,
            "prefill_intensity_flop_per_byte": pre["intensity"],
            "prefill_bound_ms": pre["seconds"] * 1e3,
            "prefill_bound_by": pre["bound_by"],
            "prefill_measured_over_bound": measured / pre["seconds"],
            f"prefill_within_{goal:g}x_bound": measured <= goal * pre["seconds"],
            "decode_ms": decode * 1e3,
            "decode_bound_ms": dec["seconds"] * 1e3,
            "decode_bound_by": dec["bound_by"],
            "decode_measured_over_bound": decode / dec["seconds"],
            **_graph_columns(case, pre["seconds"], dec["seconds"], goal),
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["_order"] = frame["method"].map(_order)
    frame = frame.sort_values(["_order", "method", "budget"], ascending=[True, True, False]).drop(columns="_order")
    used = bench["peaks"]["used"]
    frame["peak_tflop_s"] = used["flops_per_s"] / 1e12
    frame["peak_gb_s"] = used["bytes_per_s"] / GB
    frame["device"] = meta["device_name"]
    frame["dtype"] = meta["dtype"]
    frame["attention"] = attention_label(meta)
    return frame.reset_index(drop=True)


def token_drops(visual_per_layer: list[int]) -> list[tuple[int, int]]:
    """(first decoder layer with a new count, 0-based as FastV's K; that count) for every stage at which an LLM-side
    method drops visual tokens inside the decoder; empty when every layer sees the same count."""
    return [(i, v) for i, v in enumerate(visual_per_layer) if i and v != visual_per_layer[i - 1]]


def _tokens_label(case: dict) -> str:
    """Visual tokens the LLM processed: "576" for vision-side methods, "576→64 from layer 2" for FastV (one drop),
    "576→288@2→144@8" for a drop schedule of several stages."""
    per_layer = case.get("visual_tokens_per_layer") or [case["visual_tokens"]]
    drops = token_drops(per_layer)
    if not drops:
        return str(case["visual_tokens"])
    if len(drops) == 1:
        [(layer, after)] = drops
        return f"{per_layer[0]}→{after} from layer {layer}"
    return str(per_layer[0]) + "".join(f"→{after}@{layer}" for layer, after in drops)


def _graph_columns(case: dict, prefill_bound: float, decode_bound: float, goal: float) -> dict:
    """CUDA-graph replays (bench cuda_graphs=true): the same prefill / decode kernels without HF's Python and
    launch overhead, against the same bounds; NaN when the run has none."""
    timings = case["timings"]
    if "prefill_graph" not in timings:
        return {}
    prefill, decode = timings["prefill_graph"]["median"], timings["decode_graph"]["median"]
    return {"prefill_graph_ms": prefill * 1e3, "prefill_graph_over_bound": prefill / prefill_bound,
            f"prefill_graph_within_{goal:g}x_bound": prefill <= goal * prefill_bound,
            "decode_graph_ms": decode * 1e3, "decode_graph_over_bound": decode / decode_bound}


def measurements_table(bench: dict) -> pd.DataFrame:
    full_tokens = _full_tokens(bench["meta"])
    rows = []
    for case in bench["cases"]:
        if case["status"] != "ran":
            continue
        for name, stats in case["timings"].items():
            mem = case["memory"].get(name, {})  # CUDA-graph replays have no memory pass of their own
            rows.append({"method": case["method"], "budget": _budget(case, full_tokens), "measurement": name,
                         **{f"{k}_ms": stats[k] * 1e3 for k in ("median", "q1", "q3", "iqr", "mean", "std", "min", "max")},
                         "n": stats["n"], "peak_memory_bytes": mem.get("peak_bytes"),
                         "added_memory_bytes": mem.get("added_bytes")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------------
def _num(value, digits: int = 2) -> str:
    return "—" if value is None or pd.isna(value) else _fixed(value, digits)


def _yes_no(value) -> str:
    """A goal check; "—" where the case has no such measurement (NaN would read as true)."""
    return "—" if value is None or pd.isna(value) else ("yes" if value else "no")


def _fixed(value: float, digits: int) -> str:
    """Fixed point, or 3 significant digits for values too small to show (tiny test models)."""
    return f"{value:.3g}" if value and abs(value) < 10 ** -digits else f"{value:.{digits}f}"


def _with_ratio(value, ratio, digits: int = 2, spread=None) -> str:
    if value is None or pd.isna(value):
        return "—"
    text = _fixed(value, digits)
    if spread is not None and not pd.isna(spread):
        text += f" ±{spread:.{digits}f}"
    if ratio is not None and not pd.isna(ratio):
        text += f" ({ratio:.2f}×)"
    return text


def _load(values) -> str:
    return "?" if not values else "/".join(f"{v:.1f}" for v in values)


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def caption(bench: dict) -> list[str]:
    m = bench["meta"]
    p = bench["peaks"]["used"]
    mem = {"cuda_max_memory_allocated": "torch.cuda.max_memory_allocated (reset per call) during generate",
           "cpu_peak_rss": "peak resident set size of the whole process (VmHWM, reset per call) during generate: "
                           "weights + activations + Python/libraries; not comparable with max_memory_allocated",
           "cpu_ru_maxrss_since_start": "process peak RSS since start (the kernel counter could not be reset)"}
    return [
        (f"**ours**: model `{m['model']}` ({_params(m['parameters'])} parameters incl. any prompt encoder, {m['weights']}; LLM "
        f"{m['llm']['layers']} layers × {m['llm']['hidden']}), device **{m['device_name']}**, dtype **{m['dtype']}**, "
        f"attention **{attention_label(m)}**, batch {m['batch_size']}, {m['text_tokens']} text tokens + visual "
        f"tokens, {m['warmup']} warm-up + {m['repeats']} timed calls per measurement ({m['timer']}), throughput = "
        f"{m['new_tokens']} forced new tokens / wall time of generate. Times are medians; ± is the IQR."),
        f"Memory: {mem.get(m['memory'], m['memory'])}.",
        (f"Peaks measured in this run: {p['flops_per_s'] / 1e12:.3f} TFLOP/s (matmul), {p['bytes_per_s'] / GB:.1f} GB/s "
        f"(copy). Load average (1/5/15 min) at start / end: {_load(m.get('load_average_start'))} / "
         f"{_load(m.get('load_average_end'))}."),
        ((f"**{PAPER_SETUP}**. Ratios (×) are against each side's own full model: ours vs our `none`, the paper's vs "
          "its vanilla row.") if m.get("family", "llava") == "llava" else
         "No paper rows (the paper measures LLaVA-1.5-7B only). Ratios (×) are against our `none`."),
    ]


def family_notes(bench: dict) -> list[str]:
    """Caption lines of a family fed by eval.efficiency.inputs (Qwen3-VL, LLaVA-OneVision, InternVL): its inputs,
    budgets, prefill path and why the analytic whole-model TFLOPs are n/a."""
    inputs = bench["meta"].get("inputs")
    if not inputs:
        return []
    height, width = inputs["image_size"]
    return [
        (f"Inputs: one random {height} x {width} RGB image through the family's {inputs['image_processor']} "
         f"({inputs['image_processor_source']}); visual tokens = what the processor emits under each method (the "
         "none row: the full count for this image); the family's image start / end markers, where it has them, count "
         "as text tokens. Budgets are ratios of every image / crop / tile where fractional."),
        f"Prefill: {inputs['prefill']}.",
        f"TFLOPs ours / exact: {inputs['flops_analytic']}. FastV's formula (LLM prefill only) is analytic.",
    ]


def table5_markdown(frame: pd.DataFrame, bench: dict) -> str:
    lines = [f"# Efficiency (Table 5 shape): {bench['meta']['model']} on {bench['meta']['device_name']}", ""]
    lines += [f"- {c}" for c in caption(bench)] + [
        ("- TFLOPs ours = the paper's convention (linear layers of one full forward, as calflops counts under SDPA); "
        "exact = 2×MACs of generate's prefill incl. attention, vision, scoring; FastV = the FastV/VisionZip formula "
        "(LLM prefill).")] + [f"- {line}" for line in family_notes(bench)] + [""]
    header = ["Method", "Budget", "Tokens", "TFLOPs ours (×)", "TFLOPs paper (×)", "TFLOPs exact", "TFLOPs FastV",
              "Vision+select ms", "Prefill ms ours (×)", "Prefill ms paper (×)", "TTFT ms (×)", "Decode ms ours (×)",
              "Decode ms paper (×)", "Throughput tok/s ours (×)", "Throughput paper (×)", "Memory GB ours (×)",
              "VRAM GB paper (×)", "Status"]
    measured_column = bool(bench["meta"].get("inputs"))  # no analytic whole-model count: the measured one beside
    if measured_column:
        header.insert(header.index("TFLOPs FastV") + 1, "TFLOPs measured (×)")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for _, r in frame.iterrows():
        name = r["paper_method"] or r["method"]
        cells = [
            f"{name} (`{r['method']}`)" if r["paper_method"] else f"`{r['method']}`",
            _budget_text(r["budget"]),
            r["tokens_label"] if isinstance(r["tokens_label"], str) else _num(r["visual_tokens"], 0),
            _with_ratio(r["tflops_paper_convention"], r["tflops_ratio"], 3),
            _with_ratio(r["paper_tflops"], r["paper_tflops_ratio"]),
            _num(r["tflops_exact"], 3),
            _num(r["tflops_fastv"], 3),
            _num(r["vision_ms"], 1),
            _with_ratio(r["prefill_ms"], r["prefill_ratio"], 1, r["prefill_iqr_ms"]),
            _with_ratio(r["paper_prefill_ms"], r["paper_prefill_ratio"], 2, r["paper_prefill_std"]),
            _with_ratio(r["ttft_ms"], r["ttft_ratio"], 1),
            _with_ratio(r["decode_ms"], r["decode_ratio"], 1, r["decode_iqr_ms"]),
            _with_ratio(r["paper_decode_ms"], r["paper_decode_ratio"], 2, r["paper_decode_std"]),
            _with_ratio(r["throughput_tok_s"], r["throughput_ratio"], 2, r["throughput_iqr"]),
            _with_ratio(r["paper_throughput_tok_s"], r["paper_throughput_ratio"], 2, r["paper_throughput_std"]),
            _with_ratio(r["memory_gb"], r["memory_ratio"], 2),
            _with_ratio(r["paper_vram_gb"], r["paper_vram_ratio"], 2),
            r["status"],
        ]
        if measured_column:
            cells.insert(header.index("TFLOPs measured (×)"),
                         _with_ratio(r["tflops_measured"], r["tflops_measured_ratio"], 3))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Paper ± is its std over 10 runs; ours is the IQR over the timed calls.")
    return "\n".join(lines) + "\n"


def roofline_markdown(frame: pd.DataFrame, bench: dict) -> str:
    m = bench["meta"]
    peaks = bench["peaks"]
    goal = float(peaks.get("goal", 1.3))
    on_gpu = m["device"] == "cuda"
    lines = [f"# Prefill speed-up vs its limit: {m['model']} on {m['device_name']}", ""]
    lines += [f"- {c}" for c in caption(bench)[:3]]
    lines += [
        (f"- Peaks at start: {peaks['start']['flops_per_s'] / 1e12:.3f} TFLOP/s, {peaks['start']['bytes_per_s'] / GB:.1f}"
        f" GB/s; at end: {peaks['end']['flops_per_s'] / 1e12:.3f} TFLOP/s, {peaks['end']['bytes_per_s'] / GB:.1f} GB/s;"
        " the bound uses the higher of each (the tighter bound)."),
        ("- Bound = max(FLOPs / peak FLOP/s, bytes / bandwidth) of the LLM prefill (decoder + lm_head on the last "
        "position). FLOPs: eval.efficiency.flops.flops_exact with causal attention counted as a causal kernel "
        "needs it (n(n+1)/2 pairs). Bytes (eval.efficiency.roofline.prefill_bytes): every decoder weight and the "
        "lm_head read once, the KV cache written once, each projection GEMM's input and output and the attention "
        "kernel's q/k/v/output moved once (norms, rotary, activations and residual adds assumed fused: a lower "
        "estimate)."),
        f"- Goal (issue 8): on a GPU, measured ≤ {goal:g} × bound at every budget. "
        + ("This run is on a GPU." if on_gpu else "This run is on a CPU: the goal column is reported, the goal applies to GPUs."),
        "",
    ]
    header = ["Method", "Budget", "LLM tokens", "Prefill ms (IQR)", "Measured ratio", "FLOPs ratio", "Bound ratio",
              "TFLOPs", "GB moved", "FLOP/byte", "Bound ms", "Bound by", "Measured / bound",
              f"≤ {goal:g}× bound", "Decode ms", "Decode bound ms", "Decode / bound"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for _, r in frame.iterrows():
        cells = [f"`{r['method']}`", _budget_text(r["budget"]), str(int(r["llm_tokens"])),
                 f"{r['prefill_ms']:.1f} ({r['prefill_iqr_ms']:.1f})", _num(r["prefill_ratio_measured"], 3),
                 _num(r["prefill_flops_ratio"], 3), _num(r["prefill_bound_ratio"], 3), _num(r["prefill_tflops"], 3),
                 _num(r["prefill_gbytes"], 2), _num(r["prefill_intensity_flop_per_byte"], 0),
                 _num(r["prefill_bound_ms"], 2), r["prefill_bound_by"], _num(r["prefill_measured_over_bound"], 2),
                 "yes" if r[f"prefill_within_{goal:g}x_bound"] else "no", _num(r["decode_ms"], 2),
                 _num(r["decode_bound_ms"], 2), _num(r["decode_measured_over_bound"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if "prefill_graph_ms" in frame:
        lines += ["", "CUDA graphs (`cuda_graphs=true`): the same prefill and decode step replayed from a captured CUDA "
                  "graph, i.e. the kernels without HF's Python and launch overhead, against the same bounds.", ""]
        header = ["Method", "Budget", "Prefill graph ms", "Bound ms", "Graph / bound", f"≤ {goal:g}× bound",
                  "Decode graph ms", "Decode bound ms", "Decode graph / bound"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for _, r in frame.iterrows():
            cells = [f"`{r['method']}`", _budget_text(r["budget"]), _num(r["prefill_graph_ms"], 2),
                     _num(r["prefill_bound_ms"], 2), _num(r["prefill_graph_over_bound"], 2),
                     _yes_no(r[f"prefill_graph_within_{goal:g}x_bound"]), _num(r["decode_graph_ms"], 2),
                     _num(r["decode_bound_ms"], 2), _num(r["decode_graph_over_bound"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(bench: dict, out_dir: Path, paper: pd.DataFrame | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t5 = table5(bench, paper)
    roof = roofline_table(bench)
    meas = measurements_table(bench)
    written = []
    for frame, stem in ((t5, "table5"), (roof, "roofline"), (meas, "measurements")):
        path = out_dir / f"{stem}.csv"
        frame.to_csv(path, index=False, float_format="%.6g")
        written.append(path)
    for text, stem in ((table5_markdown(t5, bench), "table5"), (roofline_markdown(roof, bench), "roofline")):
        path = out_dir / f"{stem}.md"
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_json", type=Path, help="bench.json written by python -m eval.efficiency.bench")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the bench.json's folder)")
    args = parser.parse_args(argv)
    bench = json.loads(args.bench_json.read_text())
    for path in write_tables(bench, args.out or args.bench_json.parent):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
