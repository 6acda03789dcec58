"""A sweep killed with SIGKILL mid-run resumes: every record ends complete, none duplicated, finished runs not redone."""

import os
import signal
import subprocess
import sys
import time

import pytest

from eval.config import REPO_ROOT
from eval.running.store import iter_records

pytestmark = pytest.mark.slow

METHODS = ("none", "random", "hiprune")


def _sweep(store, hydra_dir):
    return [
        sys.executable, "-c", "from eval.running.run import main; main()", "--multirun",
        "model=tiny_llava", "benchmark=smoke_pope", "device=cpu", f"store={store}", "limit=2", "batch_size=2",
        f"method={','.join(METHODS)}", "budget=64", f"hydra.sweep.dir={hydra_dir}",
    ]


def _records(store):
    return list(iter_records(store)) if store.exists() else []


def test_sigkilled_sweep_resumes_without_duplicates(tmp_path, tiny_llava_dir, smoke_task_dir):
    store, hydra_dir = tmp_path / "runs", tmp_path / "hydra"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    # 1. start the sweep; SIGKILL its whole process group as soon as the first run's record is complete
    proc = subprocess.Popen(_sweep(store, hydra_dir), cwd=REPO_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not _records(store):
            assert proc.poll() is None, "the sweep ended before its first record appeared"
            assert time.time() < deadline, "no record within 240 s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the sweep was not killed mid-run (it had already finished)"

    first = {path: path.stat().st_mtime_ns for path, _ in _records(store)}  # parses: no half-written record
    assert 1 <= len(first) < len(METHODS)
    visible = [p for p in store.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert sorted(visible) == sorted(first), "only complete records (temporary files are dot-files)"

    # 2. the same command again finishes the sweep and skips what was done
    resumed = subprocess.run(_sweep(store, hydra_dir), cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    records = _records(store)
    names = sorted(record["identity"]["method"]["name"] for _, record in records)
    assert names == sorted(METHODS)  # every run, once
    keys = [path.name for path, _ in records]
    assert len(set(keys)) == len(keys)
    for path, record in records:
        assert record["n_samples"]["hiprune_smoke_pope"] == 2
        assert "pope_f1_score" in record["metrics"]["hiprune_smoke_pope"]
    for path, stamp in first.items():
        assert path.stat().st_mtime_ns == stamp, f"{path.name} was redone"
    assert f"{len(first)} skipped" in resumed.stdout
    assert f"{len(METHODS) - len(first)} ran" in resumed.stdout
    assert f"of {len(METHODS)} planned" in resumed.stdout
