"""GPU-hour estimates of a table's sweep (eval/efficiency/estimate.py) from a measured samples/s file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from eval.efficiency import estimate
from eval.efficiency.throughput import ANSWER_TOKENS


def _cell(method, budget, batch, tokens, per_s, mode="eager"):
    return {"mode": mode, "method": method, "budget": budget, "batch_size": batch, "new_tokens": tokens,
            "samples_per_s_generate": per_s}


def _measurement(tmp_path, device="cuda", model="llava15_7b"):
    # seconds per sample = 0.1 + 0.05 x tokens for none at bs 8; hiprune 64 is twice as fast
    cells = [_cell("none", None, 8, t, 1 / (0.1 + 0.05 * t)) for t in (2, 4)]
    cells += [_cell("hiprune", 64, 8, t, 2 / (0.1 + 0.05 * t)) for t in (2, 4)]
    cells += [_cell("hiprune", 192, 8, t, 1.5 / (0.1 + 0.05 * t)) for t in (2, 4)]
    data = {"model": {"model": model, "device": device, "dtype": "float16"}, "device_name": "X", "cells": cells}
    path = tmp_path / f"eval_throughput_{model}-{device}-float16.json"
    path.write_text(json.dumps(data))
    return path


def test_fit_and_stand_ins(tmp_path):
    _measurement(tmp_path)
    m = estimate.find_measurement("llava15_7b", tmp_path)
    assert m is not None and m.on_gpu and "GPU" in m.label and "NO GPU" not in m.label
    seconds, used = estimate.seconds_per_sample(m, "none", None, 8, 3)
    assert seconds == pytest.approx(0.25) and used == "none bs=8"
    seconds, used = estimate.seconds_per_sample(m, "divprune", 70, 32, 2)  # vision-side: hiprune, nearest budget
    assert seconds == pytest.approx(0.1) and used == "hiprune 64 bs=8"
    _, used = estimate.seconds_per_sample(m, "fastv", 64, 8, 2)  # in the LLM: the full prefill stands in
    assert used == "none bs=8"


def test_cpu_measurement_is_labelled_and_runs_add_up(tmp_path):
    _measurement(tmp_path, device="cpu", model="llava15_mid_cpu")
    m = estimate.find_measurement("llava15_7b", tmp_path)
    assert "NO GPU MEASUREMENT" in m.label and "another architecture" in m.label
    spec = SimpleNamespace(
        models=[SimpleNamespace(config="llava15_7b", vanilla="576", budgets={"64": 64})],
        rows=[SimpleNamespace(method="hiprune")], benchmarks=["POPE", "GQA"],
        benchmark_configs={"POPE": "pope", "GQA": "gqa"}, limit=None)
    result = estimate.estimate_runs(spec, 8, measurement=m, sizes={"pope": 9000, "gqa": 12578})
    assert [(r["method"], r["benchmark"]) for r in result["runs"]] == [
        ("none", "POPE"), ("hiprune", "POPE"), ("none", "GQA"), ("hiprune", "GQA")]
    pope = (0.1 + 0.05 * ANSWER_TOKENS["pope"]) * 9000 / 3600
    assert result["runs"][0]["hours"] == pytest.approx(pope)
    assert result["runs"][1]["hours"] == pytest.approx(pope / 2)
    assert result["total_hours"] == pytest.approx(sum(r["hours"] for r in result["runs"]))
    text = estimate.report(result)
    assert "NO GPU MEASUREMENT" in text and "total:" in text


def test_committed_task_sizes_cover_the_paper_benchmarks():
    sizes = estimate.task_sizes()
    for benchmark in ("pope", "gqa", "mme", "mmbench", "mmbench_cn", "sqa_img", "textvqa", "vizwiz", "vqav2"):
        tasks = estimate.benchmark_tasks(benchmark)
        assert all(sizes[t] > 0 for t in tasks), benchmark
        assert benchmark in ANSWER_TOKENS
