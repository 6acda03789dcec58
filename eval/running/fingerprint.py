"""Content fingerprints of local inputs, for run identities.

A run of a local model folder (``model.local``: the tiny and scene models built by scripts/) or of a local
lmms-eval task (parquet files next to a task YAML under ``benchmark.include_path``) depends on those files' bytes, not
only on their names. Their sha256 goes into the run's identity, so a rebuilt model or task gets new records instead of
silently reusing the old ones. Hub checkpoints and hub datasets are identified by name and revision as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

_SKIPPED_PARTS = {"__pycache__"}
_cache: dict[tuple, str] = {}


def _files_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part in _SKIPPED_PARTS or part.startswith(".") for part in p.relative_to(folder).parts)
    )


def files_sha256(files: Iterable[Path], root: Path) -> str:
    """sha256 over (path relative to ``root``, size, bytes) of every file, in sorted order. Cached per process on
    (path, size, mtime) so a sweep hashes each input once."""
    files = sorted({Path(f).resolve() for f in files})
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files) + (str(root.resolve()),)
    if stamp not in _cache:
        digest = hashlib.sha256()
        for f in files:
            name = os.path.relpath(f, root.resolve())  # relative, so clones in other places agree
            digest.update(f"{name}\0{f.stat().st_size}\0".encode())
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _cache[stamp] = digest.hexdigest()
    return _cache[stamp]


def folder_sha256(folder: Path) -> str:
    """Fingerprint of every file in a folder (hidden files and __pycache__ left out)."""
    folder = Path(folder)
    return files_sha256(_files_under(folder), folder)


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval task YAMLs without importing their ``!function`` targets."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _data_file_values(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _data_file_values(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _data_file_values(item)]
    return []


def local_task_files(tasks: Iterable[str], include_path: Path) -> list[Path]:
    """The YAML of every named task found under ``include_path`` and the local data files it names
    (``dataset_kwargs.data_files``, relative to the YAML's folder, as lmms-eval resolves them)."""
    wanted = set(tasks)
    found: list[Path] = []
    for config in sorted(Path(include_path).rglob("*.yaml")):
        try:
            spec = yaml.load(config.read_text(), Loader=_TaskLoader)
        except yaml.YAMLError:
            continue
        if not isinstance(spec, dict) or spec.get("task") not in wanted:
            continue
        found.append(config)
        data_files = (spec.get("dataset_kwargs") or {}).get("data_files")
        for value in _data_file_values(data_files):
            path = (config.parent / value).resolve()
            if path.is_file():
                found.append(path)
    return found


def local_inputs(model_folder: Path | None, text_tower: Path | None, tasks: list[str],
                 include_path: Path | None) -> dict[str, str]:
    """sha256 of each local input of a run: {"model": ..., "text_tower": ..., "tasks": ...}; only those that are
    local appear, so runs of hub models on hub tasks keep the identity they always had."""
    out = {}
    if model_folder is not None:
        out["model"] = folder_sha256(model_folder)
    if text_tower is not None and Path(text_tower).is_dir():
        out["text_tower"] = folder_sha256(Path(text_tower))
    if include_path is not None:
        files = local_task_files(tasks, include_path)
        if files:
            out["tasks"] = files_sha256(files, Path(include_path))
    return out
