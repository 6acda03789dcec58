"""Smoke checks of the scoring-overhead benchmark's code paths on the tiny CLIP and tiny Qwen2.5-VL shapes.
No timing asserts."""

import json
import math

import pytest
import torch

from eval.config import REPO_ROOT
from eval.efficiency import scoring
from eval.efficiency.scoring import SHAPES, VARIANTS, IndicesMismatch, main, timed_call


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
    assert cfg["family"] == "clip" and cfg["scored_tokens"] == 64

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

    # the selection alone, before vs after issue 18: same kept tokens, the device read-back gone, fewer operators
    selection = results["selection"]
    assert selection["indices_identical"] is True
    assert (selection["before"]["read_backs"], selection["after"]["read_backs"]) == (1, 0)
    assert selection["after"]["non_view_ops"] < selection["before"]["non_view_ops"]
    assert "selection alone" in printed


@pytest.mark.parametrize("shape, reference", [("tiny", "Reference"), ("qwen-tiny", "QwenReference")])
def test_index_mismatch_raises(monkeypatch, shape, reference):
    """A reference that keeps other tokens must stop the benchmark, not be timed against ours."""
    cls = getattr(scoring, reference)
    original = cls.__call__

    def shifted(self, inputs):
        out = original(self, inputs)
        out["indices"] = torch.roll(out["indices"], 1, dims=1)
        return out

    monkeypatch.setattr(cls, "__call__", shifted)
    with pytest.raises(IndicesMismatch, match="different token indices"):
        main(["--shape", shape, "--device", "cpu", "--repeats", "1", "--warmup", "0", "--no-memory"])


def test_qwen_tiny_run(tmp_path):
    """Qwen2.5-VL path end to end, two images per call (packed sequence, one chunk per image in full blocks)."""
    out = tmp_path / "bench_qwen.json"
    args = ["--shape", "qwen-tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--batch-size", "2"]
    results = main([*args, "--json", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    cfg = results["config"]
    assert cfg["family"] == "qwen2_5_vl"
    # 280 px -> 20 x 20 patches -> 10 x 10 merged tokens; round(100 * 0.334) = 33; blocks 2 and 4 are full attention
    assert (cfg["patch_grid"], cfg["grid"], cfg["tokens"], cfg["scored_tokens"]) == ([20, 20], [10, 10], 400, 100)
    assert (cfg["object_layer"], cfg["deep_layer"], cfg["budget"]) == (2, 4, 33)
    assert cfg["full_attention_layers"] == [2, 4]

    for key in ("ours/plain", "reference/plain"):
        assert math.isfinite(results["ratios"][key]["median"]) and results["ratios"][key]["median"] > 0
    correctness = results["correctness"]
    assert correctness["indices_identical"] is True and correctness["checked_rounds"] == 1
    assert correctness["kept_per_image"] == 33
    assert correctness["features_bitwise_identical_plain_vs_ours"] is True
    # Per-image means over the same queries: only float32 rounding apart (a wrong per-chunk normalisation of the
    # packed reference map would be off by the number of images, ~1e-2 here).
    for name in ("object", "deep"):
        assert correctness["max_abs_score_diff_ours_vs_reference"][name] < 1e-6

    memory = results["memory"]
    for name in VARIANTS:
        m = memory["variants"][name]
        assert m["peak_rss_bytes"] >= m["baseline_rss_bytes"] > 0 and m["peak_extra_bytes"] >= 0


def test_qwen_reference_masks_windows_like_the_model():
    """The reference's dense masked map per block must compute the same block outputs as the tower's own windowed
    SDPA (up to rounding): a wrong mask (e.g. ignoring windows, or images attending to each other) would not."""
    shape = SHAPES["qwen-tiny"]
    cpu = torch.device("cpu")
    tower = shape.build_tower(torch.float32, cpu, seed=0, qk_gain=1.0)
    inputs = shape.make_inputs(2, torch.float32, cpu, seed=0)
    variants = shape.make_variants(tower)
    _, plain = timed_call(variants["plain"], inputs, cpu)
    _, reference = timed_call(variants["reference"], inputs, cpu)
    assert torch.allclose(reference["features"], plain["features"], rtol=1e-4, atol=1e-5)
    assert reference["indices"].shape == (2, shape.budget)
    # the tower is left on SDPA for every block afterwards
    assert all(block.attn.config._attn_implementation == "sdpa" for block in tower.blocks)


def test_shapes_are_consistent():
    clip = SHAPES["clip-l-336"]
    assert clip.grid == (24, 24) and clip.object_layer == 9 and clip.deep_layer == 23 and clip.budget == 192
    qwen = SHAPES["qwen2.5-vl-3b"]
    # 448 px -> 32 x 32 patches -> 16 x 16 merged; round(256 * 0.334) = round(85.504) = 86
    assert (qwen.tokens, qwen.grid, qwen.budget) == (1024, (16, 16), 86)
    assert (qwen.object_layer, qwen.deep_layer) == (16, 32)
    assert {qwen.object_layer, qwen.deep_layer} <= set(qwen.full_attention_layers)
    for shape in SHAPES.values():
        shape.validate()


def test_qwen_shape_matches_the_3b_checkpoint_config():
    vision = json.loads((REPO_ROOT / "configs/arch/qwen2.5-vl-3b-instruct/config.json").read_text())["vision_config"]
    config = SHAPES["qwen2.5-vl-3b"].vision_config()
    for key in (
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "out_hidden_size",
        "patch_size",
        "spatial_merge_size",
        "window_size",
        "fullatt_block_indexes",
        "temporal_patch_size",
    ):
        assert getattr(config, key) == vision[key], key


def test_image_size_only_for_qwen():
    with pytest.raises(ValueError, match="Qwen2.5-VL shapes"):
        main(["--shape", "tiny", "--device", "cpu", "--image-size", "224", "--no-memory"])
    with pytest.raises(ValueError, match="multiple of"):
        main(["--shape", "qwen-tiny", "--device", "cpu", "--image-size", "300", "--no-memory"])
