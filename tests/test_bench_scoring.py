"""Smoke check of the scoring-overhead benchmark's code path on the tiny shape. No timing asserts."""

import json
import math

import pytest
import torch

from eval import bench_scoring
from eval.bench_scoring import SHAPES, VARIANTS, IndicesMismatch, main


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_run_structure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = main(["--shape", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--json", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["benchmark"] == "scoring_overhead"
    cfg = results["config"]
    assert (cfg["object_layer"], cfg["deep_layer"], cfg["budget"]) == (3, 5, 32)
    assert cfg["tokens"] == SHAPES["tiny"].num_patches + 1

    for name in VARIANTS:
        times = results["variants"][name]["time_s"]
        assert len(times["values"]) == 1 and times["median"] > 0
    for key in ("ours/plain", "reference/plain"):
        ratio = results["ratios"][key]
        assert len(ratio["values"]) == 1
        assert math.isfinite(ratio["median"]) and ratio["median"] > 0
        assert ratio["q1"] <= ratio["median"] <= ratio["q3"]
    assert isinstance(results["goal"]["met"], bool) and results["goal"]["threshold"] == 1.05

    correctness = results["correctness"]
    assert correctness["indices_identical"] is True
    assert correctness["checked_rounds"] == 1
    assert correctness["kept_per_image"] == 32
    assert correctness["features_bitwise_identical_plain_vs_ours"] is True

    memory = results["memory"]
    assert memory is not None and "CPU" in memory["method"]
    for name in VARIANTS:
        m = memory["variants"][name]
        assert m["peak_rss_bytes"] >= m["baseline_rss_bytes"] > 0
        assert m["peak_extra_bytes"] >= 0

    printed = capsys.readouterr().out
    assert "ours/plain" in printed and "reference/plain" in printed


def test_index_mismatch_raises(monkeypatch):
    """A reference that keeps other tokens must stop the benchmark, not be timed against ours."""
    original = bench_scoring.Reference.__call__

    def shifted(self, pixels):
        out = original(self, pixels)
        out["indices"] = torch.roll(out["indices"], 1, dims=1)
        return out

    monkeypatch.setattr(bench_scoring.Reference, "__call__", shifted)
    with pytest.raises(IndicesMismatch, match="different token indices"):
        main(["--shape", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--no-memory"])


def test_shapes_are_consistent():
    clip = SHAPES["clip-l-336"]
    assert clip.grid == (24, 24) and clip.object_layer == 9 and clip.deep_layer == 23 and clip.budget == 192
    for shape in SHAPES.values():
        shape.validate()
