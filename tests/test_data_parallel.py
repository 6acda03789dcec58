"""Data parallelism inside one run: `accelerate launch` shards one eval.running.run over processes (here 2 CPU
processes, gloo). The main process alone writes one record, with every rank's per-doc logs merged; it equals a single-process
run of the same config. A failing rank fails the whole run, and no record is written."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from eval.config import REPO_ROOT, compose_config
from eval.running import run as run_module
from eval.running.store import read_record

TINY = ["model=tiny_llava", "benchmark=smoke_pope", "device=cpu", "budget=64", "batch_size=2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(*eval_args, processes=2):
    """eval.running.run under `accelerate launch` with `processes` CPU processes. `--multi_gpu` because it is the
    launcher that starts several processes (torchrun); `--cpu` starts one unless given an MPI hostfile. device=cpu
    makes the processes form a gloo group."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "eval.running.run", *eval_args,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                          check=False)


def _single_process_cfg(*overrides):
    return compose_config([*TINY, *overrides])


def _files(root):
    """The files a run left in a store, without the empty lock files that claim records (eval.running.store.claim)."""
    return (sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".json.lock"))
            if root.exists() else [])


@pytest.mark.slow
def test_sharded_run_writes_one_record_equal_to_a_single_process_run(tmp_path, tiny_llava_dir, smoke_task_dir):
    sharded_store, single_store = tmp_path / "sharded", tmp_path / "single"
    # 5 docs over 2 ranks: 3 and 2, so lmms-eval pads rank 1 with a repeated request
    overrides = ["limit=5", "log_samples=true"]
    single_path = run_module.run(_single_process_cfg("method=hiprune", f"store={single_store}", *overrides))
    existing = run_module.run(_single_process_cfg("method=none", f"store={sharded_store}", *overrides))
    existing_stamp = existing.stat().st_mtime_ns

    # a multirun: each job is sharded over both processes in turn; the `none` record exists, so every rank skips it
    launched = _launch("--multirun", *TINY, "method=none,hiprune", f"store={sharded_store}", *overrides,
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stdout.count("[hiprune] skip") == 1  # rank 0 alone reports
    assert launched.stdout.count("[hiprune] tiny_llava hiprune budget=64") == 1
    assert launched.stdout.count("[hiprune] sweep summary: 1 ran, 1 skipped") == 1
    assert existing.stat().st_mtime_ns == existing_stamp
    record_file = single_path.relative_to(single_store)  # same identity, same name
    # one record per run: no temporary or per-rank files
    assert _files(sharded_store) == sorted([existing, sharded_store / record_file])

    sharded, single = read_record(sharded_store / record_file), read_record(single_path)
    assert sharded["data_parallel"] == {"processes": 2, "docs_per_rank": [3, 2]}  # really sharded by rank
    assert single["data_parallel"] == {"processes": 1, "docs_per_rank": [5]}
    assert sharded["metrics"] == single["metrics"]
    assert sharded["n_samples"] == single["n_samples"] == {"hiprune_smoke_pope": 5}
    for field in ("kept_tokens_by_doc", "kept_digest_by_doc", "visual_tokens", "flops"):
        assert sharded[field] == single[field], field
    assert sorted(sharded["kept_digest_by_doc"]["hiprune_smoke_pope/test"]) == ["0", "1", "2", "3", "4"]

    def answers(record):
        return [(s["doc_id"], s["filtered_resps"]) for s in record["samples"]["hiprune_smoke_pope"]]

    assert answers(sharded) == answers(single)
    assert [doc for doc, _ in answers(sharded)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_and_writes_no_record(tmp_path, tiny_llava_dir, smoke_task_dir):
    # the smoke task, but the odd docs (rank 1's shard) give a video path where the model takes images
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "odd_docs_fail.py").write_text(textwrap.dedent("""
        from lmms_eval.tasks.pope.utils import pope_doc_to_visual

        def doc_to_visual(doc):
            return ["clip.mp4"] if int(doc["id"]) % 2 else pope_doc_to_visual(doc)
    """))
    smoke_yaml = (REPO_ROOT / "eval/tasks/hiprune_smoke_pope/hiprune_smoke_pope.yaml").read_text()
    edits = {
        "task: hiprune_smoke_pope": "task: dp_odd_docs_fail",
        "../../../assets/smoke_pope/test.parquet": str(smoke_task_dir / "test.parquet"),
        "!function lmms_eval.tasks.pope.utils.pope_doc_to_visual": "!function odd_docs_fail.doc_to_visual",
    }
    for old, new in edits.items():
        assert old in smoke_yaml, f"the smoke task yaml no longer has {old!r}"
        smoke_yaml = smoke_yaml.replace(old, new)
    (tasks / "dp_odd_docs_fail.yaml").write_text(smoke_yaml)
    store = tmp_path / "runs"
    failed = _launch(*TINY, "method=hiprune", f"store={store}", "limit=4", f"benchmark.include_path={tasks}",
                     "benchmark.tasks=[dp_odd_docs_fail]", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert failed.returncode != 0
    assert "[hiprune] rank 1 of 2 failed" in failed.stderr
    assert "takes images" in failed.stderr
    assert _files(store) == []

