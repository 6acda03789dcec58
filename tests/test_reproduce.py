"""Paper-shaped tables: experiment configs, sweep commands, skipped baselines, rendering from a smoke-filled store."""

import io
import re
from contextlib import redirect_stdout

import pandas as pd
import pytest
from omegaconf import OmegaConf

import hiprune
from eval.config import CONFIG_DIR, compose_config
from eval.report import reproduce as R
from eval.running import run as run_module
from eval.running.callbacks import format_summary, planned_jobs
from eval.running.methods import is_implemented, not_implemented_notice, unsupported_reason
from eval.running.store import iter_records


def _cfg(*overrides):
    return compose_config(overrides)


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, tiny_llava_dir, smoke_task_dir):
    """A store filled like `make reproduce-table TABLE=smoke` would, in-process and with limit=2 to stay fast."""
    store = tmp_path_factory.mktemp("smoke_store")
    for method, budget in (("none", 192), ("random", 64), ("hiprune", 64), ("tome", 64)):
        run_module.run(_cfg("+experiment=table_smoke", f"store={store}", "limit=2", "batch_size=2",
                            f"method={method}", f"budget={budget}"))
    return store


def test_every_table_config_composes_and_names_existing_configs():
    tables = R.list_tables()
    for table in ("2", "3", "4", "5", "7", "8", "10", "6a", "6b", "6c", "11", "object_layer", "alpha", "smoke", "scene"):
        assert table in tables
    for experiment in set(tables.values()):
        cfg = _cfg(f"+experiment={experiment}")
        block = cfg.paper
        for model in block.models:
            assert (CONFIG_DIR / "model" / f"{model.config}.yaml").is_file()
        for row in block.rows:
            assert (CONFIG_DIR / "method" / f"{row.method}.yaml").is_file(), row.method
        for bench in block.get("benchmarks") or []:
            config = (block.get("benchmark_configs") or {}).get(bench) or R.P.BENCHMARK_CONFIGS[bench]
            assert (CONFIG_DIR / "benchmark" / f"{config}.yaml").is_file()


def test_sweep_commands_vanilla_first_rows_with_options_apart():
    spec = R.load_spec("2")
    commands = [" ".join(c) for c in R.sweep_commands(spec, ["limit=10"])]
    assert len(commands) == 2
    assert "method=none " in commands[0] and "budget=" not in commands[0]
    assert "method=tome,fastv,hired,trim,pdrop,visionzip,sparsevlm,random,hiprune,hiprune_pp" in commands[1]
    assert "budget=192,128,64" in commands[1]
    assert all("benchmark=gqa,mmbench,mmbench_cn,mme,pope,sqa_img,vqav2,textvqa,vizwiz" in c for c in commands)
    assert all(c.endswith("limit=10") and "hydra.sweeper.params=null" in c for c in commands)

    buffers = [" ".join(c) for c in R.sweep_commands(R.load_spec("6c"))]
    assert any("method=hiprune method.options.buffer=square" in c for c in buffers)
    assert any("method=hiprune method.options.buffer=rot_cross" in c for c in buffers)

    two_models = [" ".join(c) for c in R.sweep_commands(R.load_spec("7"))]
    assert any("model=llava15_13b" in c and "budget=192,128,64" in c for c in two_models)
    assert any("model=llava_next_13b" in c and "budget=640,320,160" in c for c in two_models)
    assert R.sweep_commands(R.load_spec("5")) == []


def test_unimplemented_method_or_model_is_skipped_with_a_notice(tmp_path, monkeypatch):
    def no_planning(cfg):
        raise AssertionError("a skipped run must not be planned")

    monkeypatch.setattr(run_module, "plan_run", no_planning)
    # a method config whose name no registered class has (a baseline listed before its implementation lands)
    listed = ["method=divprune", "method.name=future_baseline"]
    for overrides, what in ((listed, "method future_baseline"), (["++model.implemented=false"], "model llava15_7b")):
        out = io.StringIO()
        with redirect_stdout(out):
            assert run_module.run(_cfg(f"store={tmp_path}", *overrides)) is None
        assert f"{what} is not implemented in the harness; skipped" in out.getvalue()
        assert "the table shows the paper's numbers marked 'not run'" in out.getvalue()
        assert run_module.last_outcome()["status"] == "not implemented"
    assert not any(tmp_path.iterdir())


def test_render_table2_without_runs_shows_paper_numbers_and_misprint(tmp_path):
    paths = R.render("2", [f"store={tmp_path / 'empty'}"], out_dir=tmp_path, plots=False)
    md = paths["md"].read_text()
    assert "| ToMe | pending (54.3) | pending (60.5) | pending |" in md  # ToMe has no MMB-CN in the paper
    sparsevlm = "pending" if is_implemented("sparsevlm") else "not run"  # registered methods are pending, others not run
    assert f"| SparseVLM | {sparsevlm} (59.5) |" in md
    assert "| HiPrune | pending (59.2) |" in md
    assert re.search(r"(not run|pending) \(98\.5%†\)", md) and "prints 98.8% for HiPrune++ at 128" in md
    assert "VizWiz" in md.splitlines()[-1] or any("VizWiz:" in line for line in md.splitlines())
    frame = pd.read_csv(paths["csv"])
    assert list(frame.columns) == ["Method", "GQA", "MMB", "MMB-CN", "MME", "POPE", "SQA-IMG", "VQAv2", "TextVQA",
                                   "VizWiz", "Avg", "Avg w/o VizWiz"]
    tex = paths["tex"].read_text()
    assert "\\toprule" in tex and "Retain 192 Tokens (33.3\\%)" in tex and "\\bottomrule" in tex


@pytest.mark.slow
def test_render_from_a_smoke_filled_store(smoke_store, tmp_path):
    paths = R.render("smoke", [f"store={smoke_store}", "limit=2"], out_dir=tmp_path, plots=False)
    cells = pd.read_csv(paths["cells"], dtype={"budget_label": str})
    records = {(r["identity"]["method"]["name"], r["identity"]["budget"]): r for _, r in iter_records(smoke_store)}
    assert len(records) == 4

    def cell(row, budget):
        hit = cells[(cells["row"] == row) & (cells["budget_label"] == str(budget))]
        assert len(hit) == 1
        return hit.iloc[0]

    vanilla = cell("Vanilla", 576)
    f1 = records[("none", None)]["metrics"]["hiprune_smoke_pope"]["pope_f1_score"]
    assert vanilla["ours"] == pytest.approx(100 * f1) and vanilla["paper"] == 85.9 and vanilla["status"] == "ok"
    hp = cell("HiPrune", 64)
    assert hp["status"] == "ok" and hp["paper"] == 73.0
    assert hp["delta"] == pytest.approx(hp["ours"] - 73.0)
    tome = cell("ToMe", 64)
    assert tome["status"] == "ok" and tome["paper"] == 52.5 and tome["delta"] == pytest.approx(tome["ours"] - 52.5)
    assert cell("Random", 128)["status"] == "pending" and pd.isna(cell("Random", 128)["paper"])
    assert cell("HiPrune++", 192)["status"] == ("pending" if is_implemented("hiprune_pp") else "not run")

    md = paths["md"].read_text()
    ours, paper = hp["ours"], hp["paper"]
    assert f"| HiPrune | {ours:.1f} ({paper:.1f}, {ours - paper:+.1f}) |" in md
    assert f"| Vanilla (tiny_llava) | {vanilla['ours']:.1f} (85.9, " in md
    assert f"| ToMe | {tome['ours']:.1f} (52.5, {tome['ours'] - 52.5:+.1f}) |" in md
    assert "limit=[2]" in md  # subset runs are flagged

    spec = R.load_spec("smoke", [f"store={smoke_store}", "limit=2"])
    averages = R.row_averages(spec, R.collect_cells(spec)).set_index(["row", "budget_label"])
    if vanilla["ours"]:
        expected = hp["ours"] / vanilla["ours"] * 100
        assert averages.loc[("HiPrune", "64"), "avg_ours"] == pytest.approx(expected)
    assert averages.loc[("HiPrune", "64"), "avg_paper"] == pytest.approx(73.0 / 85.9 * 100)
    assert averages.loc[("Vanilla", "576"), "avg_paper"] == pytest.approx(100.0)


@pytest.mark.slow
def test_records_with_other_model_settings_do_not_fill_cells(smoke_store, tmp_path):
    spec = R.load_spec("smoke", [f"store={smoke_store}", "limit=2", "model.prompt_style=hf_chat"])
    cells = R.collect_cells(spec)
    assert (cells["status"] != "ok").all()


def test_sweep_summary_counts_and_planned_jobs():
    statuses = [
        {"status": "ran", "num": 0}, {"status": "skipped", "num": 1},
        {"status": "not implemented", "num": 2, "message": "method tome is not implemented in the harness; skipped"},
        {"status": "failed", "num": 3, "overrides": ["method=hiprune"], "message": "GenerationError: boom"},
    ]
    text = format_summary(statuses, planned=6)
    assert text.startswith("[hiprune] sweep summary: 1 ran, 1 skipped, 1 not implemented, 1 failed (of 6 planned)")
    assert "FAILED job 3: method=hiprune: GenerationError: boom" in text
    assert "2 planned job(s) did not finish" in text

    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": {"method": "none,hiprune", "budget": "192,128,64"}},
                                      "overrides": {"task": ["budget=64", "benchmark=pope,gqa"]}}})
    assert planned_jobs(cfg) == 2 * 1 * 2  # the command line wins over the sweeper params per key


def test_a_method_the_family_cannot_run_is_not_run_and_skipped_with_a_notice(tmp_path):
    # ToMe merges inside a CLIP tower: Qwen2.5-VL cannot run it; the in-LLM methods run on every family
    assert unsupported_reason("hiprune_qwen2_5_vl", "tome") is not None
    assert unsupported_reason("hiprune_qwen2_5_vl", "fastv") is None
    assert unsupported_reason("hiprune_llava", "fastv") is None
    assert unsupported_reason("hiprune_qwen2_5_vl", "hiprune") is None
    notice = not_implemented_notice(_cfg("model=qwen25vl_3b", "method=tome", "budget=0.334"))
    assert "merges inside the vision encoder" in notice and "qwen2_5_vl" in notice
    assert not_implemented_notice(_cfg("model=qwen25vl_3b", "method=fastv", "budget=0.334")) is None
    spec = R.load_spec("4", [f"store={tmp_path / 'empty'}"])
    cells = R.collect_cells(spec)
    fastv = cells[cells["method"] == "fastv"]
    assert len(fastv) and set(fastv["status"]) == {"pending"}  # runs now: no record yet
    assert set(cells[cells["method"] == "hiprune"]["status"]) <= {"pending", "ok"}


def test_recorded_paths_are_relative_to_the_repository():
    from eval.config import REPO_ROOT, repo_relative

    assert repo_relative(REPO_ROOT / "results" / "runs" / "a.json") == "results/runs/a.json"
    assert repo_relative(f"{REPO_ROOT}/eval/efficiency/bench.py model=x out_dir={REPO_ROOT}") == (
        "eval/efficiency/bench.py model=x out_dir=."
    )
    assert repo_relative("/elsewhere/file") == "/elsewhere/file"  # outside the repository: unchanged


def test_scene_table_runs_every_method_and_llm_schedules_fit_the_3_layer_llm():
    spec = R.load_spec("scene")
    runnable = {r.method for r in spec.rows}
    # every implemented method except the prompt-aware ones (no paired CLIP text tower: explained in the notes)
    assert runnable | {"hiprune_pp", "trim", "none"} == set(hiprune.METHODS)
    assert any("HiPrune++ and TRIM" in note for note in spec.notes)
    decoder_layers = 3  # models/scene-llava: text_config.num_hidden_layers
    model = spec.models[0]
    for row in spec.rows:
        for label, budget in model.budgets.items():
            method = R._build_method(row, label, budget, spec, model)
            assert method is not None, (row.label, label)
            if method.stage != "llm":
                continue
            stages = method.drop_schedule(64, decoder_layers)
            # the budget N' is the mean over the layers after the first drop (1 and 2): the table's notes say so
            visual = [64] + [s.keep + getattr(s, "added", 0) for s in stages]
            visual += [visual[-1]] * (decoder_layers - len(visual))
            assert stages[0].layer == 1 and abs(sum(visual[1:]) / 2 - int(label)) <= 2, (row.label, label, visual)
    commands = [" ".join(c) for c in R.sweep_commands(spec)]
    assert any("method=pdrop method.options.layers=[1,2] method.options.ratios=[0.359375,0.140625] budget=null" in c
               for c in commands)
    assert any("method=sparsevlm method.options.layers=[0,1] method.options.schedule=[13,3] budget=null" in c
               for c in commands)
    assert any("method=fastv method.options.layer=1 method.options.budget_mode=keep_after budget=32,16,8" in c
               for c in commands)
    rendered = R.build_table(spec, R.collect_cells(spec, R.load_results(spec.store / "no-such-store")))
    # a LLaVA-1.5 table has no Layout column; no VizWiz: no "Avg w/o VizWiz" column
    assert rendered.header == ["Method", "Scene-POPE", "Scene-QA", "Avg"]
    assert rendered.notes[0].startswith("Cells: ours (the model is not in the paper")


def test_llava_next_rows_say_which_layout_they_ran(tmp_path):
    spec = R.load_spec("3", [f"store={tmp_path / 'empty'}"])
    model = spec.models[0]
    vanilla_settings = R.run_settings(model, hiprune.build_method("none"))
    assert vanilla_settings["layout"] == "native" and model.settings["layout"] == "auto"
    record = {"model": model.settings["name"], "benchmark": "pope", "task": "pope",
              "method": hiprune.build_method("none").describe(), "budget": None, "limit": None,
              "settings": {"layout": "native", "prompt_style": model.settings["prompt_style"]},
              "value": 86.0, "n_samples": 10, "kept_per_image": 2880.0, "timestamp": "t", "record": "r.json"}
    results = pd.DataFrame([record])
    cells = R.collect_cells(spec, results)
    vanilla = cells[cells["vanilla"] & (cells["benchmark"] == "POPE")].iloc[0]
    assert vanilla["status"] == "ok" and vanilla["layout"] == "native"  # layout=auto resolved before matching
    rendered = R.build_table(spec, cells)
    assert rendered.header[:2] == ["Method", "Layout"]
    rows = [cells_ for kind, cells_ in rendered.lines if kind == "row"]
    assert rows[0][1] == "native" and {r[1] for r in rows[1:]} == {"official"}
    assert any(note.startswith("Layout (LLaVA-NeXT)") for note in rendered.notes)
