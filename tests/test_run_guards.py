"""No compute lost to a late failure, no success claimed for a failure (issue 17): an unwritable store and bad run
options fail before loading, lmms-eval's CLI gets an honest exit status, broken images stop the run (or are skipped
and recorded), corrupt records are rerun and marked, sweeps validate every job first and go on past a failed one,
render refuses an empty store, records are 0644 under a 022 umask and a run claims its record."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lmms_eval.api.instance import Instance
from PIL import Image, ImageFile

from eval.config import REPO_ROOT, ConfigError, compose_config
from eval.lmms import cli
from eval.lmms.base import GenerationError
from eval.lmms.llava import HiPruneLlava
from eval.report import reproduce as R
from eval.running import run as run_module
from eval.running.store import claim, iter_records, write_record

SMOKE_YAML = REPO_ROOT / "eval" / "tasks" / "hiprune_smoke_pope" / "hiprune_smoke_pope.yaml"


def _cfg(store, *overrides):
    return compose_config(["model=tiny_llava", "benchmark=smoke_pope", "device=cpu", f"store={store}", *overrides])


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("eval.lmms.llava.HiPruneLlava.__init__", refuse)


def _truncated_png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    image = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]  # a file cut by a full disk or a broken download


@pytest.fixture(scope="module")
def broken_task(tmp_path_factory, smoke_task_dir) -> Path:
    """The smoke POPE task on its first 3 documents, doc 1's PNG cut in half (include_path folder)."""
    folder = tmp_path_factory.mktemp("broken_task")
    table = pq.read_table(smoke_task_dir / "test.parquet").slice(0, 3)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": _truncated_png(), "path": None}
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table, folder / "test.parquet")
    text = SMOKE_YAML.read_text().replace("task: hiprune_smoke_pope", "task: hiprune_broken_pope")
    text = text.replace("../../../assets/smoke_pope/test.parquet", "test.parquet")
    (folder / "hiprune_broken_pope.yaml").write_text(text)
    return folder


# --- 1 + 6: checked before any model loads ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_unwritable_store_fails_before_the_model_loads(tmp_path, tiny_llava_dir, smoke_task_dir, no_loading,
                                                          monkeypatch, where):
    if where == "under a file":
        (tmp_path / "file").write_text("x")
        store, message = tmp_path / "file" / "runs", "cannot be created"
    else:  # root may write anywhere; a read-only filesystem answers access(2) with EROFS
        store, message = tmp_path / "runs", "is not writable"
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(ConfigError, match=message):
        run_module.run(_cfg(store, "method=none"))
    assert not (tmp_path / "runs").exists()


# --- 2: the lmms-eval entry point's exit status -----------------------------------------------------------------
@pytest.mark.slow
def test_lmms_eval_entry_point_exits_non_zero_on_a_bad_model_arg(tiny_llava_dir, smoke_task_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    code = cli.main(["--model", "hiprune_llava", "--model_args",
                     f"pretrained={tiny_llava_dir},method=hiprune,colour=red,device=cpu",
                     "--tasks", "hiprune_smoke_pope", "--include_path", "eval/tasks", "--limit", "1",
                     "--output_path", str(tmp_path)])
    assert code == 1


# --- 3: images decode strictly ----------------------------------------------------------------------------------
def test_a_truncated_image_stops_the_run_naming_its_doc_or_is_skipped_and_listed(tiny_llava_dir, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as lmms-eval sets it for the whole process
    good = Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8))
    docs = [{"images": [good]}, {"images": [Image.open(io.BytesIO(_truncated_png()))]}, {"images": [good]}]
    model = HiPruneLlava(pretrained=str(tiny_llava_dir), method="none", device="cpu", batch_size=3)
    model.task_dict = {"probe": {"test": dict(enumerate(docs))}}
    gen = {"max_new_tokens": 2, "temperature": 0}
    requests = [Instance("generate_until", ("Is it red?", dict(gen), lambda d: d["images"], i, "probe", "test"),
                         idx=0, metadata={"task": "probe", "doc_id": i, "repeats": 1}) for i in range(3)]
    with pytest.raises(GenerationError, match=r"task 'probe' split 'test' doc id 1: the image does not decode"):
        model.generate_until(requests)
    model.broken_images = "skip"
    answers = model.generate_until(requests)
    assert answers[1] == "" and list(model.broken_docs) == [("probe", "test")]
    assert list(model.broken_docs[("probe", "test")]) == [1] and sorted(model.kept_tokens[("probe", "test")]) == [0, 2]
    model.close()


# --- 4: a corrupt record ----------------------------------------------------------------------------------------
def _fake_execute(calls):
    def execute(plan, ranks):
        calls.append(plan.record)
        time.sleep(0.5)
        record = {"identity": plan.identity, "metrics": {"t": {"acc": 1.0}}}
        write_record(plan.record, record)
        return record
    return execute


def test_a_corrupt_record_is_reported_and_rerun_into_its_place(tmp_path, tiny_llava_dir, smoke_task_dir,
                                                              monkeypatch, capsys):
    cfg = _cfg(tmp_path, "method=none")
    plan = run_module.plan_run(cfg)
    plan.record.parent.mkdir(parents=True)
    plan.record.write_text('{"identity": {"model": "tiny_l')  # cut by a full disk
    calls = []
    monkeypatch.setattr(run_module, "execute", _fake_execute(calls))
    assert run_module.run(cfg) == plan.record
    assert calls == [plan.record] and json.loads(plan.record.read_text())["metrics"] == {"t": {"acc": 1.0}}
    assert f"corrupt result record {plan.record}" in capsys.readouterr().err


def test_render_marks_a_corrupt_record_and_refuses_an_empty_or_missing_store(tmp_path, capsys):
    out = tmp_path / "tables"
    for store in (tmp_path / "no-such-store", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            R.main(["render", "smoke", f"store={store}", "--out", str(out), "--no-plots"])
        assert exit_info.value.code == 1 and not out.exists()
    assert "does not exist" in capsys.readouterr().err
    spec = R.load_spec("smoke", [f"store={tmp_path / 'empty'}"])
    budget = next(iter(spec.models[0].budgets.values()))
    corrupt = tmp_path / "empty" / f"tiny_llava/smoke_pope/hiprune-{budget}-0123456789ab.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text("{")
    cells = R.collect_cells(spec)
    marked = cells[cells["status"] == "corrupt record"]
    assert set(marked["method"]) == {"hiprune"} and set(marked["budget"]) == {budget}
    assert "corrupt result record" in capsys.readouterr().err
    assert "corrupt record" in R.format_cell(None, 85.0, "corrupt record", "POPE")


# --- 8: permissions and claims ----------------------------------------------------------------------------------
def test_records_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_record(tmp_path / "r.json", {"identity": {}, "metrics": {}})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_two_identical_runs_started_together_compute_once(tmp_path, tiny_llava_dir, smoke_task_dir, monkeypatch):
    cfg = _cfg(tmp_path, "method=none")
    calls = []
    monkeypatch.setattr(run_module, "execute", _fake_execute(calls))
    threads = [threading.Thread(target=run_module.run, args=(cfg,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(calls) == 1 and len(list(iter_records(tmp_path))) == 1
    with claim(calls[0]):  # released: the next run claims it at once
        pass


# --- 5: sweeps --------------------------------------------------------------------------------------------------
def _sweep(monkeypatch, *overrides) -> int:
    monkeypatch.setattr(sys, "argv", ["run", "--multirun", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        run_module.main()
    return exit_info.value.code


def test_a_sweep_with_one_invalid_point_is_refused_before_any_job(tmp_path, tiny_llava_dir, smoke_task_dir,
                                                                  monkeypatch, capsys):
    code = _sweep(monkeypatch, "model=tiny_llava", "benchmark=smoke_pope", "device=cpu", f"store={tmp_path}",
                  "method=random", "budget=32,1000", f"hydra.sweep.dir={tmp_path}/hydra")
    err = capsys.readouterr().err
    assert code == 2 and "job 1:" in err and "budget=1000" in err and "only 576" in err
    assert not (tmp_path / "tiny_llava").exists() and not (tmp_path / "hydra").exists()


@pytest.mark.slow
def test_a_job_failing_at_run_time_is_reported_and_the_others_go_on(tmp_path, tiny_llava_dir, broken_task,
                                                                     monkeypatch, capsys):
    code = _sweep(monkeypatch, "model=tiny_llava", "benchmark=smoke_pope", f"benchmark.include_path={broken_task}",
                  "benchmark.tasks=[hiprune_broken_pope]", "device=cpu", f"store={tmp_path}", "method=none",
                  "broken_images=error,skip", "batch_size=3", f"hydra.sweep.dir={tmp_path}/hydra")
    out = capsys.readouterr().out
    assert code == 1
    assert "1 ran, 1 failed" in out and "FAILED job 0" in out and "doc id 1: the image does not decode" in out
    [(_, record)] = list(iter_records(tmp_path / "tiny_llava"))
    assert record["identity"]["broken_images"] == "skip"
    assert list(record["broken_images"]["hiprune_broken_pope/test"]) == ["1"]
    assert record["n_samples"]["hiprune_broken_pope"] == 3


def test_render_all_keeps_tables_without_records_and_fails_only_on_a_missing_store(tmp_path, monkeypatch, capsys):
    rendered = []
    monkeypatch.setattr(R, "render", lambda table, overrides, out_dir=None, plots=True: rendered.append(table) or {})
    monkeypatch.setattr(R, "empty_store_problem",  # a store holding records of the smoke experiment only
                        lambda spec: None if spec.experiment == "table_smoke" else "holds no record")
    R.main(["render", "--all", f"store={tmp_path}", "--no-plots"])  # exits 0: the others are kept as they are
    assert rendered == ["table_smoke"]
    assert "holds no record; not rendered, the existing table is kept" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        R.main(["render", "--all", f"store={tmp_path / 'no-such-store'}", "--no-plots"])
    assert exit_info.value.code == 1
