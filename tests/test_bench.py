"""Efficiency benchmark (eval/efficiency/bench.py), roofline helpers, efficiency tables and evaluation throughput.

Code-path checks only: nothing here asserts a time (the machine may be shared and slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

import hiprune
from eval.config import REPO_ROOT, ConfigError, compose_config
from eval.efficiency import bench as bench_module
from eval.efficiency import throughput
from eval.efficiency.flops import fastv_layer_flops, flops_exact, llm_scoring_flops
from eval.efficiency.roofline import (
    decode_bytes,
    decoder_weight_elements,
    measure_peaks,
    prefill_bytes,
    roofline_bound,
)
from eval.efficiency.tables import roofline_markdown, roofline_table, table5, table5_markdown, write_tables


def _cfg(*overrides):
    return compose_config(overrides, config_name="bench")


# ------------------------------------------------------------------------------------------------------------------
# roofline
# ------------------------------------------------------------------------------------------------------------------
def test_roofline_peaks_are_positive():
    peaks = measure_peaks("cpu", torch.float32, sizes=[64, 128], copy_bytes=1 << 20, repeats=2)
    assert peaks.flops_per_s > 0 and peaks.bytes_per_s > 0 and peaks.matmul_size in (64, 128)
    assert peaks.copy_buffer_bytes == 1 << 20


def test_roofline_bound_and_bytes_by_hand():
    # 10 GFLOP at 1 TFLOP/s = 10 ms; 1 GB at 500 GB/s = 2 ms -> compute-bound, 10 ms
    bound = roofline_bound(10e9, 1e9, 1e12, 500e9)
    assert bound["seconds"] == pytest.approx(0.010) and bound["bound_by"] == "compute"
    assert roofline_bound(1e9, 1e9, 1e12, 500e9)["bound_by"] == "memory"
    with pytest.raises(ValueError):
        roofline_bound(1, 1, 0, 1)

    from transformers import LlamaConfig

    # Llama d=8, m=16, 2 layers, 2 heads (head_dim 4), 1 kv head, vocab 10
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=10)
    # per layer: q,o 8*8 each = 128; k,v 8*4 each = 64; gate/up/down 3*8*16 = 384; 2 norms 16 -> 592
    # 2 layers 1184 + final norm 8 + lm_head 80 = 1272
    assert decoder_weight_elements(cfg) == 1272
    # per token per layer: projections (8+8) + 2*(8+4) + (8+8) = 56; attention 8 + 8 + 8 = 24; mlp 2*(8+16) + 24 = 72
    # -> 152; 2 layers = 304, + embeds in / hidden out 16 = 320 per token; 5 tokens, 2 bytes: 3200
    b = prefill_bytes(cfg, 5, 2)
    assert b["weights"] == 2544 and b["kv_cache"] == 2 * 2 * 5 * 4 * 2 and b["activations"] == 3200
    assert b["total"] == 2544 + 160 + 3200
    assert decode_bytes(cfg, 5, 2)["kv_cache"] == 2 * 2 * 6 * 4 * 2
    # one count per decoder layer (LLM-side pruning: 5 tokens in layer 0, 3 from layer 1 on); equal counts are the int
    assert prefill_bytes(cfg, [5, 5], 2) == b
    per_layer = prefill_bytes(cfg, [5, 3], 2)
    # kv: 2 (k, v) * (5 + 3) positions * 4 (1 kv head x 4) * 2 bytes = 128; activations: (152 * (5 + 3) + 8 * (5 in
    # + 3 out)) * 2 bytes = 2560
    assert per_layer["kv_cache"] == 128 and per_layer["activations"] == 2560 and per_layer["weights"] == 2544
    assert decode_bytes(cfg, [5, 3], 2)["kv_cache"] == 2 * (6 + 4) * 4 * 2
    assert decode_bytes(cfg, [5, 5], 2) == decode_bytes(cfg, 5, 2)
    with pytest.raises(ValueError, match="2 decoder layers"):
        prefill_bytes(cfg, [5, 3, 1], 2)


# ------------------------------------------------------------------------------------------------------------------
# the benchmark command on the tiny model (smoke check of the code path)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_command_runs_on_tiny_model(tmp_path, tiny_llava_dir, tiny_clip_dir):
    command = [
        sys.executable, "-m", "eval.efficiency.bench", "model=tiny_llava", "threads=1", "warmup=1", "repeats=1",
        "new_tokens=2", "budgets=[64]", "roofline.sizes=[128]", "roofline.copy_mib=4", "roofline.repeats=1",
        f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra",
    ]
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    folder = tmp_path / "tiny_llava-cpu-float32"
    bench = json.loads((folder / "bench.json").read_text())
    ran = {(c["method"], c["budget"]): c for c in bench["cases"] if c["status"] == "ran"}
    assert {("none", None), ("random", 64), ("hiprune", 64)} <= set(ran)
    assert ran[("none", None)]["visual_tokens"] == 576 and ran[("hiprune", 64)]["visual_tokens"] == 64
    for case in ran.values():
        assert set(case["timings"]) == {"vision", "prefill", "ttft", "decode", "generate"}
        assert all(t["n"] == 1 and t["median"] > 0 for t in case["timings"].values())
        assert case["memory"]["generate"]["peak_bytes"] > 0
        assert case["seq_len"] == 49 + case["visual_tokens"]
        # FlopCounterMode over the real forward equals the analytic count (prompt encoder included)
        assert abs(case["flops"]["measured_vs_exact"]) < 0.01
        assert case["roofline"]["prefill"]["seconds"] > 0
        rates = case["tokens_per_s"]  # batch 1: prompt tokens per prefill, one token per decode step
        assert rates["prefill"] == pytest.approx(case["seq_len"] / case["timings"]["prefill"]["median"])
        assert rates["decode"] == pytest.approx(1 / case["timings"]["decode"]["median"])
        assert rates["prefill_bound"] == pytest.approx(case["seq_len"] / case["roofline"]["prefill"]["seconds"])
    if ("hiprune_pp", 64) in ran:  # registered once HiPrune++ exists: prompt encoder path
        assert ran[("hiprune_pp", 64)]["flops"]["prompt_encoder_flops"] > 0
    assert bench["meta"]["memory"] == "cpu_peak_rss" and bench["meta"]["device"] == "cpu"
    for name in ("table5.csv", "table5.md", "roofline.csv", "roofline.md", "measurements.csv"):
        assert (folder / name).is_file()
    assert "configuration error" not in done.stderr


@pytest.mark.slow
def test_bench_runs_fastv_with_per_layer_counts(tmp_path, tiny_llava_dir):
    # FastV at K = 1 on the 2-layer tiny model: 576 visual tokens in layer 0, 64 in layer 1
    command = [
        sys.executable, "-m", "eval.efficiency.bench", "model=tiny_llava", "only=[none,fastv]",
        "+method@methods.fastv=fastv", "methods.fastv.options.layer=1", "methods.fastv.options.budget_mode=keep_after",
        "threads=1", "warmup=1", "repeats=1", "new_tokens=2", "budgets=[64]",
        "roofline.sizes=[128]", "roofline.copy_mib=4", "roofline.repeats=1", f"out_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    bench = json.loads((tmp_path / "tiny_llava-cpu-float32" / "bench.json").read_text())
    ran = {c["method"]: c for c in bench["cases"] if c["status"] == "ran"}
    assert set(ran) == {"none", "fastv"} and ran["fastv"]["method_settings"] == {
        "name": "fastv", "budget": 64, "layer": 1, "budget_mode": "keep_after"}
    fastv, none = ran["fastv"], ran["none"]
    assert fastv["visual_tokens"] == 576 and fastv["seq_len"] == 49 + 576  # the LLM's input holds every token
    assert fastv["visual_tokens_per_layer"] == [576, 64] and none["visual_tokens_per_layer"] == [576, 576]
    assert "576>64@1 tokens" in done.stdout

    config = AutoConfig.from_pretrained(tiny_llava_dir)
    # the recorded prefill's scoring: the last token's row over the 625 tokens of layer 0 (K - 1)
    exact = flops_exact(config, 49, [576, 64], logits_to_keep=1,
                        llm_scoring=llm_scoring_flops(config, [("last", 1, 625)]))
    assert fastv["flops"]["tflops_exact"] == pytest.approx(exact["total"] / 1e12, rel=1e-12)
    assert fastv["flops"]["llm_prefill_flops"] == exact["llm_prefill"] + exact["lm_head"]
    d, m = config.text_config.hidden_size, config.text_config.intermediate_size
    assert fastv["flops"]["tflops_fastv"] == pytest.approx(
        sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in (625, 113)) / 1e12, rel=1e-12)
    # FlopCounterMode over a real FastV forward agrees, the last query's scores in layer 0 included
    assert abs(fastv["flops"]["measured_vs_exact"]) < 1e-12 and none["flops"]["measured_vs_exact"] == 0
    assert fastv["flops"]["tflops_exact"] < none["flops"]["tflops_exact"]
    assert fastv["roofline"]["prefill"]["bytes"] == prefill_bytes(config, [625, 113], 4)
    assert fastv["roofline"]["decode"]["bytes"] == decode_bytes(config, [625, 113], 4)
    assert set(fastv["timings"]) == {"vision", "prefill", "ttft", "decode", "generate"}
    assert bench["meta"]["cuda_graphs"] is False and bench["meta"]["cuda_graphs_off"] == {}


def test_bench_plans_fastv_where_the_adapter_supports_it(tiny_llava_dir):
    # LLaVA-1.5-7B, K = 2, budget_mode avg_layers (configs/method/fastv.yaml): [576] * 2 + [k] * 30 visual tokens with
    # k = 166 / 98 / 30 for an average of 192 / 128 / 64 over the 32 layers (spec §8), 49 text tokens
    plan = bench_module.run(_cfg("model=llava15_7b", "dry_run=true", "device=cpu", "only=[none,fastv]"),
                            log=lambda _: None)
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "arch" / "llava-1.5-7b-hf")
    cases = {(c["method"], c["budget"]): c for c in plan["cases"]}
    assert cases[("none", None)]["flops"]["tflops_exact"] == flops_exact(config, 49, 576, logits_to_keep=1)["total"] / 1e12
    for budget, keep in ((192, 166), (128, 98), (64, 30)):
        case = cases[("fastv", budget)]
        assert case["visual_tokens_per_layer"] == [576] * 2 + [keep] * 30
        by_hand = 2 * fastv_layer_flops(625, 4096, 11008) + 30 * fastv_layer_flops(49 + keep, 4096, 11008)
        assert case["flops"]["tflops_fastv"] == pytest.approx(by_hand / 1e12, rel=1e-12)
        per_layer = flops_exact(config, 49, [576] * 2 + [keep] * 30, logits_to_keep=1)["total"]
        assert case["flops"]["tflops_exact"] == per_layer / 1e12
        assert per_layer > flops_exact(config, 49, keep, logits_to_keep=1)["total"]  # layers 0, 1 hold all 576

    # the tiny model's LLM has 2 layers: K = 2 prunes nothing, so the adapter refuses and the case is skipped
    skeleton = bench_module.weightless(AutoConfig.from_pretrained(tiny_llava_dir))
    planned = bench_module.plan_cases(_cfg("model=tiny_llava", "only=[none,fastv]", "budgets=[64]"), skeleton)
    [skipped] = [c for c in planned if c["name"] == "fastv"]
    assert skipped["status"] == "unsupported" and "layer must lie in 1..1" in skipped["reason"]


def test_cuda_graphs_are_off_for_llm_side_methods_with_a_reason():
    assert bench_module.cuda_graphs_off_reason(hiprune.build_method("hiprune", budget=64)) is None
    assert "prunes inside the LLM" in bench_module.cuda_graphs_off_reason(hiprune.build_method("fastv", budget=64))
    assert bench_module.tokens_label(576, [576, 576, 576]) == "576"
    assert bench_module.tokens_label(576, [576, 576, 64]) == "576>64@2"


def test_bench_dry_run_real_7b_and_memory_refusal():
    cfg = _cfg("model=llava15_7b", "dry_run=true", "device=cpu", "only=[none,hiprune]")
    plan = bench_module.run(cfg, log=lambda _: None)
    assert plan["parameters"] == 7_063_427_072
    tflops = {c["visual_tokens"]: round(c["flops"]["tflops_paper_convention"], 2) for c in plan["cases"]}
    assert tflops == {576: 8.63, 192: 3.56, 128: 2.71, 64: 1.87}  # the paper's Table 5 (calflops convention)
    with pytest.raises(ConfigError, match="GiB"):
        bench_module.run(_cfg("model=llava15_13b", "device=cpu", "memory_limit_fraction=1e-6", "only=[none]"),
                         log=lambda _: None)
    with pytest.raises(ConfigError, match="no method config"):
        bench_module.run(_cfg("model=llava15_7b", "dry_run=true", "device=cpu", "only=[fastest]"), log=lambda _: None)
    with pytest.raises(ConfigError, match="cuda_graphs=true needs a CUDA device"):
        bench_module.run(_cfg("model=llava15_7b", "device=cpu", "cuda_graphs=true", "only=[none]"), log=lambda _: None)


# ------------------------------------------------------------------------------------------------------------------
# the efficiency table, on a synthetic result
# ------------------------------------------------------------------------------------------------------------------
def _stats(ms):
    s = ms / 1e3
    return {"median": s, "q1": s, "q3": s, "iqr": 0.0, "mean": s, "std": 0.0, "min": s, "max": s, "n": 1}


def _case(method, budget, tokens, prefill_ms, decode_ms=10.0, tflops=1.0):
    gen = 0.5
    return {
        "method": method, "budget": budget, "status": "ran", "reason": "", "options": {}, "visual_tokens": tokens,
        "n_text": 49, "seq_len": 49 + tokens,
        "timings": {"vision": _stats(20), "prefill": _stats(prefill_ms), "ttft": _stats(prefill_ms + 20),
                    "decode": _stats(decode_ms), "generate": _stats(gen * 1e3)},
        "throughput_tok_s": {**_stats(8 / gen * 1e3), "median": 8 / gen, "iqr": 0.0},
        "memory": {k: {"peak_bytes": 2e9, "added_bytes": 1e8} for k in ("vision", "prefill", "ttft", "decode", "generate")},
        "flops": {"tflops_paper_convention": tflops, "tflops_exact": tflops * 1.01, "tflops_fastv": tflops / 2,
                  "tflops_measured": tflops * 1.01, "llm_prefill_flops": tflops * 1e12,
                  "llm_prefill_flops_triangular": tflops * 1e12, "decode_step_flops": 1e10},
        "roofline": {"prefill": {"seconds": prefill_ms / 2e3, "flops": tflops * 1e12, "bytes": {"total": 1e9},
                                 "bound_by": "compute", "intensity": tflops * 1e3},
                     "decode": {"seconds": decode_ms / 1.2e3, "flops": 1e10, "bytes": {"total": 1e9},
                                "bound_by": "memory", "intensity": 10.0}},
    }


def _bench():
    return {
        "meta": {"model": "toy", "parameters": 1e9, "weights": "random", "llm": {"layers": 2, "hidden": 8},
                 "device": "cpu", "device_name": "Toy CPU", "dtype": "bfloat16", "attn_implementation": "sdpa",
                 "attention_backend": "sdpa (_scaled_dot_product_flash_attention_for_cpu)", "batch_size": 1,
                 "text_tokens": 49, "tokens_per_image_full": 576, "new_tokens": 8, "warmup": 1, "repeats": 1,
                 "timer": "time.perf_counter", "memory": "cpu_peak_rss"},
        "peaks": {"start": {"flops_per_s": 1e12, "bytes_per_s": 1e11}, "end": {"flops_per_s": 1e12, "bytes_per_s": 1e11},
                  "used": {"flops_per_s": 1e12, "bytes_per_s": 1e11}, "goal": 1.3},
        "cases": [
            _case("none", None, 576, 100.0, tflops=8.0),
            _case("hiprune", 192, 192, 40.0, tflops=3.0),
            _case("random", 64, 64, 20.0, tflops=1.5),
            {"method": "hiprune_pp", "budget": None, "status": "not implemented", "reason": "placeholder",
             "options": {}},
        ],
    }


def test_roofline_table_reports_cuda_graph_replays_against_the_same_bounds():
    bench = _bench()
    for case in bench["cases"][:3]:  # graph replays at 60% of the eager prefill, 80% of the eager decode step
        t = case["timings"]
        t["prefill_graph"] = _stats(t["prefill"]["median"] * 1e3 * 0.6)
        t["decode_graph"] = _stats(t["decode"]["median"] * 1e3 * 0.8)
    roof = roofline_table(bench).set_index("method")
    # bound = prefill_ms / 2 in _case: eager 2.0x the bound, graph 1.2x (within the 1.3x goal), decode 0.8 * 1.2
    assert roof.loc["hiprune", "prefill_measured_over_bound"] == pytest.approx(2.0)
    assert roof.loc["hiprune", "prefill_graph_over_bound"] == pytest.approx(1.2)
    assert not roof.loc["hiprune", "prefill_within_1.3x_bound"] and roof.loc["hiprune", "prefill_graph_within_1.3x_bound"]
    assert roof.loc["random", "decode_graph_over_bound"] == pytest.approx(0.96)
    md = roofline_markdown(roofline_table(bench), bench)
    assert "CUDA graphs" in md and "| `hiprune` | 192 | 24.00 | 20.00 | 1.20 | yes |" in md
    # an LLM-side case runs without graphs: its goal cell is empty, not "yes"
    del bench["cases"][2]["timings"]["prefill_graph"], bench["cases"][2]["timings"]["decode_graph"]
    md = roofline_markdown(roofline_table(bench), bench)
    assert "| `random` | 64 | — | 10.00 | — | — | — |" in md


def test_efficiency_table_has_paper_columns_and_ratios(tmp_path):
    bench = _bench()
    frame = table5(bench)
    row = frame.set_index(["method", "budget"])
    # ours vs our full model
    assert row.loc[("none", 576), "prefill_ratio"] == 1.0
    assert row.loc[("hiprune", 192), "prefill_ratio"] == pytest.approx(0.4)
    assert row.loc[("random", 64), "tflops_ratio"] == pytest.approx(1.5 / 8.0)
    # the paper's numbers beside ours, vs the paper's vanilla row
    assert row.loc[("hiprune", 192), "paper_prefill_ms"] == 28.56
    assert row.loc[("hiprune", 192), "paper_prefill_ratio"] == pytest.approx(28.56 / 54.31)
    assert row.loc[("random", 64), "paper_tflops_ratio"] == pytest.approx(1.87 / 8.63)
    assert row.loc[("none", 576), "paper_method"] == "vanilla"
    # paper rows we did not run are kept, marked
    assert row.loc[("hiprune_pp", 128), "paper_decode_ms"] == 21.59
    assert row.loc[("hiprune_pp", 128), "status"].startswith("not run")
    assert row.loc[("random", 192), "status"] == "not run" and math.isnan(row.loc[("random", 192), "prefill_ms"])
    assert {"device", "dtype", "attention"} <= set(frame.columns) and set(frame["dtype"]) == {"bfloat16"}
    md = table5_markdown(frame, bench)
    assert "Toy CPU" in md and "bfloat16" in md and "_scaled_dot_product_flash_attention_for_cpu" in md
    assert "| HiPrune (`hiprune`) | 192 |" in md and "28.56 ±0.30 (0.53×)" in md

    roof = roofline_table(bench).set_index("method")
    assert roof.loc["hiprune", "prefill_ratio_measured"] == pytest.approx(0.4)
    assert roof.loc["hiprune", "prefill_flops_ratio"] == pytest.approx(3.0 / 8.0)
    assert roof.loc["hiprune", "prefill_measured_over_bound"] == pytest.approx(2.0)
    assert not roof.loc["hiprune", "prefill_within_1.3x_bound"]
    assert "≤ 1.3× bound" in roofline_markdown(roofline_table(bench), bench)
    written = write_tables(bench, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["table5.csv", "roofline.csv", "measurements.csv", "table5.md", "roofline.md"])


# ------------------------------------------------------------------------------------------------------------------
# evaluation throughput: bs=1 vs bs=8 on one model, identical answers
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_throughput_identical_answers_across_batch_sizes(tiny_llava_dir, smoke_task_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = throughput.run(tiny_llava_dir, method="hiprune", budget=64, limit=8, batch_sizes=[1, 8],
                                warmup_limit=1)
    finally:
        torch.set_num_threads(threads)
    one, eight = result["runs"]
    assert (one["batch_size"], eight["batch_size"]) == (1, 8)
    assert one["samples"] == eight["samples"] == 8
    assert one["answers"] == eight["answers"] and one["selection_digests"] == eight["selection_digests"]
    assert len(one["selection_digests"]) == 8
    assert result["identical"] and eight["identical_to_first"]
    assert one["samples_per_s"] > 0 and eight["samples_per_s"] > 0
    paths = throughput.write(result, tmp_path / "tp")
    assert "identical answers and kept-token selections across batch sizes: **yes**" in throughput.markdown(result)
    assert all(p.is_file() for p in paths)


def test_table5_shows_where_an_llm_side_method_drops_tokens():
    bench = _bench()
    fastv = _case("fastv", 64, 576, 50.0, tflops=2.0)
    fastv["visual_tokens_per_layer"] = [576, 576] + [64] * 30
    bench["cases"].append(fastv)
    frame = table5(bench).set_index(["method", "budget"])
    assert frame.loc[("fastv", 64), "tokens_label"] == "576→64 from layer 2"
    assert frame.loc[("hiprune", 192), "tokens_label"] == "192"
    assert "| `fastv` | 64 | 576→64 from layer 2 |" in table5_markdown(table5(bench), bench)
