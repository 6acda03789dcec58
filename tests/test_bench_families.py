"""eval.efficiency.bench on the families whose visual token count depends on the image (Qwen3-VL, LLaVA-OneVision,
InternVL): inputs from the family's image processor, kept counts per grid, analytic LLM FLOPs against FlopCounterMode,
tables without the paper's LLaVA rows. Code-path checks: nothing asserts a time."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import built
from transformers import AutoConfig

from eval.config import REPO_ROOT, ConfigError, compose_config
from eval.efficiency import bench as bench_module
from eval.efficiency.flops import flops_exact, flops_llm
from eval.efficiency.inputs import FAMILIES, image_processor, make_inputs, random_image

# (model config, tiny family, budget, {method: (visual tokens per sequence, kept tokens per grid)}) for the default
# 384 x 768 image: Qwen3-VL 12 x 24 merged tokens (patch 16, 2 x 2 merge) = 288, round(288 x 0.25) = 72; OneVision
# native base 729 + 2 crops of 729 (nothing to unpad, no anyres_max downsampling) + 27 newlines = 2214, pruned
# (official): base + 1 x 2 crops of round(729 x 0.25) = 182 each; InternVL 2 tiles + a thumbnail of 256 tokens,
# round(256 x 0.25) = 64 each. FastV at K = 1 sees every token of the image (OneVision: HF's native sequence, as
# layout=auto resolves it for LLM-side methods) in layer 0 and keeps round(n x 0.25) from layer 1 on.
CASES = {
    "qwen3_vl": ("tiny_qwen3vl", 0.25, {"none": (288, [288]), "hiprune": (72, [72]), "fastv": (288, [288])}),
    "llava_onevision": ("tiny_llava_onevision", 0.25,
                        {"none": (2214, [729] * 3), "random": (546, [182] * 3), "fastv": (2214, [729] * 3)}),
    "internvl": ("tiny_internvl3", 0.25, {"none": (768, [256] * 3), "hiprune": (192, [64] * 3),
                                          "fastv": (768, [256] * 3)}),
}
FASTV = ["+method@methods.fastv=fastv", "methods.fastv.options.layer=1", "methods.fastv.options.budget_mode=keep_after"]
MARKERS = {"qwen3_vl": 2, "llava_onevision": 0, "internvl": 2}  # <|vision_start|>/<|vision_end|>, <img>/</img>


def _cfg(*overrides):
    return compose_config(list(overrides), config_name="bench")


@pytest.mark.parametrize("family", sorted(CASES))
def test_bench_runs_every_family_with_per_grid_records(family, tmp_path):
    model, budget, expected = CASES[family]
    built(family)
    threads = torch.get_num_threads()
    try:
        bench = bench_module.run(_cfg(
            f"model={model}", f"only=[{','.join(expected)}]", *FASTV, f"budgets=[{budget}]", "device=cpu", "warmup=0",
            "repeats=1", "new_tokens=2", "flops_measured=true", "roofline.sizes=[64]", "roofline.copy_mib=1",
            "roofline.repeats=1", f"out_dir={tmp_path}"), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)  # the cpu profile sets threads=1
    ran = {c["method"]: c for c in bench["cases"] if c["status"] == "ran"}
    assert set(ran) == set(expected)
    for method, (tokens, grids) in expected.items():
        case = ran[method]
        assert case["visual_tokens"] == tokens and case["visual_tokens_per_grid"] == grids
        assert case["n_text"] == 49 + MARKERS[family] and case["seq_len"] == case["n_text"] + tokens
        assert set(case["timings"]) == {"vision", "prefill", "ttft", "decode", "generate"}
        assert all(t["n"] == 1 and t["median"] > 0 for t in case["timings"].values())
        flops = case["flops"]
        # no analytic vision count: the whole-model cells are n/a with the reason, the measured count is there
        assert flops["tflops_exact"] is None and flops["tflops_paper_convention"] is None and "n/a" in flops["analytic_na"]
        assert flops["tflops_measured"] > 0 and flops["measured_parts"]["vision"] > 0
        # FlopCounterMode's decoder + lm_head equal the analytic LLM count (Llama-style linears, SDPA dense)
        assert flops["measured_llm_vs_analytic"] == pytest.approx(0, abs=1e-9)
    config = AutoConfig.from_pretrained(built(family))
    n, layers = expected["fastv"][0], config.text_config.num_hidden_layers
    assert ran["fastv"]["visual_tokens_per_layer"] == [n] + [round(n * budget)] * (layers - 1)
    assert ran["none"]["visual_tokens_per_layer"] == [n] * layers
    none, pruned, fastv = (ran[m] for m in expected)
    assert fastv["flops"]["llm_prefill_flops"] < none["flops"]["llm_prefill_flops"]
    assert none["flops"]["llm_prefill_flops"] == sum(
        flops_llm(config, none["n_text"], none["visual_tokens"], logits_to_keep=1)[k] for k in ("llm_prefill", "lm_head"))
    assert pruned["flops"]["llm_prefill_flops"] < none["flops"]["llm_prefill_flops"]
    meta = bench["meta"]
    assert meta["family"] == family and meta["tokens_per_image_full"] == expected["none"][0]
    assert meta["inputs"]["image_size"] == [384, 768] and meta["inputs"]["image_processor"]
    folder = tmp_path / f"{model}-cpu-float32"
    assert json.loads((folder / "bench.json").read_text())["cases"][0]["method"] == "none"
    table = (folder / "table5.md").read_text()
    assert "No paper rows" in table and "TFLOPs measured" in table and "| 0.25 |" in table
    assert "vanilla (`none`) | 576" not in table  # the paper's LLaVA-1.5 rows are not mixed in
    assert (folder / "roofline.md").is_file() and (folder / "measurements.csv").is_file()


def test_bench_runs_an_llm_side_method_on_qwen2_5_vl(tmp_path):
    # FastV at K = 1 on the 2-layer tiny Qwen2.5-VL: the 384 x 768 image's 14 x 27 merged tokens (patch 14, factor 28:
    # 392 x 756) in layer 0, 64 from layer 1 on; the prefill runs input_ids + the precomputed image features
    built("qwen2_5_vl")
    threads = torch.get_num_threads()
    try:
        bench = bench_module.run(_cfg(
            "model=tiny_qwen25vl", "only=[none,fastv]", "+method@methods.fastv=fastv", "methods.fastv.options.layer=1",
            "methods.fastv.options.budget_mode=keep_after", "budgets=[64]", "device=cpu", "warmup=0", "repeats=1",
            "new_tokens=2", "roofline.sizes=[64]", "roofline.copy_mib=1", "roofline.repeats=1", f"out_dir={tmp_path}"),
            log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    ran = {c["method"]: c for c in bench["cases"] if c["status"] == "ran"}
    fastv = ran["fastv"]
    assert fastv["visual_tokens"] == 378 and fastv["visual_tokens_per_layer"] == [378, 64]
    assert fastv["visual_tokens_per_grid"] == [378] and ran["none"]["visual_tokens_per_layer"] == [378, 378]
    # the recorded scoring of the last query in layer 0 is in the analytic LLM count, as FlopCounterMode sees it
    assert fastv["flops"]["measured_llm_vs_analytic"] == pytest.approx(0, abs=1e-9)
    assert fastv["flops"]["llm_prefill_flops"] < ran["none"]["flops"]["llm_prefill_flops"]


def test_family_inputs_from_the_real_processors():
    # the architecture configs of the real checkpoints, processors built offline from class defaults + settings
    shapes = {}
    for model, family in (("qwen3vl_2b", "qwen3_vl"), ("llava_onevision_0_5b", "llava_onevision"),
                          ("internvl3_1b", "internvl")):
        cfg = _cfg(f"model={model}")
        config, _ = bench_module.architecture_config(cfg.model)
        processor = image_processor(family, config, cfg.model)
        inputs, keep, processed = make_inputs(config, family, processor, lambda out, i: 7, [384, 768], 2, 5, 3, 0)
        ids = inputs["input_ids"]
        assert ids.shape == (2, 5 + 7 + MARKERS[family] + 3) and (ids == config.image_token_id).sum() == 14
        assert keep == 7 and set(FAMILIES[family].image_keys) <= set(inputs)
        shapes[family] = {k: list(v.shape) for k, v in processed.items() if k != "batch_num_images"}
    assert shapes["qwen3_vl"]["image_grid_thw"] == [2, 3] and shapes["qwen3_vl"]["pixel_values"] == [2 * 24 * 48, 1536]
    assert shapes["llava_onevision"]["pixel_values"] == [2, 3, 3, 384, 384]  # base + 1 x 2 crops of 384 px
    assert shapes["internvl"]["pixel_values"] == [6, 3, 448, 448]  # 2 tiles + a thumbnail per image
    with pytest.raises(ConfigError, match="image_size"):
        random_image([0, 5], 0)


def test_flops_llm_is_flops_exact_without_vision(tiny_llava_dir):
    config = AutoConfig.from_pretrained(tiny_llava_dir)
    exact = flops_exact(config, 49, 64, decode_tokens=3, logits_to_keep=1)
    llm = flops_llm(config, 49, 64, decode_tokens=3, logits_to_keep=1)
    assert {k: exact[k] for k in ("llm_prefill", "lm_head", "decode")} == {k: llm[k] for k in ("llm_prefill", "lm_head", "decode")}


def test_unfed_families_are_refused_before_building():
    built("video_llava")
    with pytest.raises(ConfigError, match="does not feed the video_llava family"):
        bench_module.run(_cfg("model=tiny_video_llava", "device=cpu", "only=[none]"), log=lambda _: None)



def test_dry_run_counts_a_real_architectures_tokens_without_building_it():
    """Qwen3-VL-8B's architecture (meta weights): the 384 x 768 image's 12 x 24 merged tokens, round(288 x 0.112) = 32
    for HiPrune, FastV at K = 2 keeping 32; 49 text tokens + the two vision markers; the LLM's analytic FLOPs."""
    plan = bench_module.run(_cfg("model=qwen3vl_8b", "device=cpu", "dry_run=true", "only=[none,hiprune,fastv]",
                                 *FASTV[:1], "methods.fastv.options.budget_mode=keep_after", "budgets=[0.112]"),
                            log=lambda _: None)
    assert plan["dry_run"] and plan["parameters"] == 8_767_123_696
    cases = {c["method"]: c for c in plan["cases"]}
    layers = 36
    assert cases["none"]["visual_tokens_per_layer"] == [288] * layers
    assert cases["hiprune"]["visual_tokens_per_layer"] == [32] * layers
    assert cases["fastv"]["visual_tokens_per_layer"] == [288] * 2 + [32] * (layers - 2)
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs/arch/qwen3-vl-8b-instruct")
    for case in cases.values():
        assert case["n_text"] == 51 and case["flops"]["tflops_exact"] is None
        llm = flops_llm(config, 51, case["visual_tokens_per_layer"], logits_to_keep=1)
        assert case["flops"]["llm_prefill_flops"] == llm["llm_prefill"] + llm["lm_head"]
