"""Local inputs (model folders, task data) are part of a run's identity by content (eval/running/fingerprint.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from eval.config import compose_config
from eval.running import run as run_module
from eval.running.fingerprint import folder_sha256, local_inputs, local_task_files

TASK_YAML = """\
task: my_task
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: ../data/test.parquet
doc_to_visual: !function some.module.fn
"""


def _task_tree(root: Path) -> Path:
    (root / "tasks" / "my_task").mkdir(parents=True)
    (root / "tasks" / "my_task" / "my_task.yaml").write_text(TASK_YAML)
    (root / "tasks" / "other.yaml").write_text("task: other\n")
    (root / "tasks" / "data").mkdir()
    (root / "tasks" / "data" / "test.parquet").write_bytes(b"rows v1")
    return root / "tasks"


def test_task_files_are_the_yaml_and_its_local_data(tmp_path):
    include = _task_tree(tmp_path)
    files = local_task_files(["my_task"], include)
    assert [f.name for f in files] == ["my_task.yaml", "test.parquet"]
    assert local_task_files(["pope"], include) == []  # a hub task: nothing local


def test_digests_follow_the_bytes_and_ignore_caches(tmp_path):
    include = _task_tree(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights v1")
    before = local_inputs(model, None, ["my_task"], include)
    assert set(before) == {"model", "tasks"}
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert folder_sha256(model) == before["model"]
    (model / "model.safetensors").write_bytes(b"weights v2")
    (include / "data" / "test.parquet").write_bytes(b"rows v2")
    after = local_inputs(model, None, ["my_task"], include)
    assert after["model"] != before["model"] and after["tasks"] != before["tasks"]
    assert local_inputs(None, None, ["pope"], include) == {}


def test_a_rebuilt_local_model_gets_a_new_record(tmp_path, tiny_llava_dir, smoke_task_dir):
    copy = tmp_path / "tiny-llava"
    shutil.copytree(tiny_llava_dir, copy)

    def plan():
        cfg = compose_config(["model=tiny_llava", f"model.pretrained={copy}", "benchmark=smoke_pope", "method=none",
                              f"store={tmp_path / 'store'}"])
        return run_module.plan_run(cfg)

    first = plan()
    assert set(first.identity["local_inputs_sha256"]) >= {"model", "tasks"}
    config = copy / "config.json"
    config.write_text(config.read_text() + "\n")  # same config, other bytes: a rebuild
    second = plan()
    assert second.identity["local_inputs_sha256"]["model"] != first.identity["local_inputs_sha256"]["model"]
    assert second.record != first.record
    assert second.identity["local_inputs_sha256"]["tasks"] == first.identity["local_inputs_sha256"]["tasks"]
