"""PyramidDrop through the evaluation pipeline (hiprune-eval -> lmms-eval -> the LLaVA plugin) on the trained scene
model: budget 32 as the average over its 3 decoder layers with boundaries [1, 2] solves lambda to counts 23 / 8
(average 31.67; lambda = 0.375 would give 24 / 9, an average of 32.33), the per-doc logs record those counts for every
doc, and batch size 3 (left-padded) logs exactly what batch size 1 does. The efficiency benchmark plans the default
schedule (layers [2, 8, 16], lambda solved) on LLaVA-1.5-7B's 32 layers."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from eval.efficiency import bench as bench_module
from eval.running import run as run_module
from eval.running.store import read_record


def _cfg(store, batch_size, *extra):
    with initialize_config_dir(config_dir=str(run_module.CONFIG_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "model=scene_llava",
                "benchmark=scene_qa",
                "device=cpu",
                f"store={store}",
                "method=pdrop",
                "method.options.layers=[1,2]",
                "limit=6",
                f"batch_size={batch_size}",
                *extra,
            ],
        )


@pytest.mark.slow
def test_pdrop_run_logs_the_solved_schedule_and_batching_does_not_change_it(tmp_path, scene_tasks_dir):
    record = read_record(run_module.run(_cfg(tmp_path / "bs3", 3, "budget=32")))
    key, docs = "hiprune_scene_qa/test", [str(d) for d in range(6)]
    assert record["identity"]["method"] == {
        "name": "pdrop",
        "budget": 32,
        "layers": [1, 2],
        "ratios": None,
        "positions": "compact",
    }
    assert record["llm_visual_per_layer_by_doc"][key] == {d: [64, 23, 8] for d in docs}
    assert record["kept_tokens_by_doc"][key] == {d: [8] for d in docs}
    assert record["flops"]["mean_visual_tokens_per_layer"] == [64, 23, 8]
    alone = read_record(run_module.run(_cfg(tmp_path / "bs1", 1, "budget=32")))
    for field in ("kept_tokens_by_doc", "kept_digest_by_doc", "llm_visual_per_layer_by_doc"):
        assert alone[field] == record[field], field
    assert alone["metrics"] == record["metrics"]


@pytest.mark.slow
def test_pdrop_with_explicit_ratios_and_no_budget(tmp_path):
    record = read_record(run_module.run(_cfg(tmp_path, 3, "budget=null", "method.options.ratios=[0.5,0.125]")))
    assert record["identity"]["method"]["ratios"] == [0.5, 0.125]
    per_layer = record["llm_visual_per_layer_by_doc"]["hiprune_scene_qa/test"]
    assert set(map(tuple, per_layer.values())) == {(64, 32, 8)}


def test_bench_plans_the_default_schedule_on_llava15_7b():
    with initialize_config_dir(config_dir=str(bench_module.CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["model=llava15_7b", "dry_run=true", "device=cpu", "only=[none,pdrop]"])
    plan = bench_module.run(cfg, log=lambda _: None)
    cases = {(c["method"], c["budget"]): c for c in plan["cases"]}
    for budget, (a, b, c) in ((192, (322, 180, 101)), (128, (242, 102, 42)), (64, (110, 21, 4))):
        per_layer = cases[("pdrop", budget)]["visual_tokens_per_layer"]
        assert per_layer == [576] * 2 + [a] * 6 + [b] * 8 + [c] * 16
        assert sum(per_layer) / 32 <= budget
