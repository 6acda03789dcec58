"""Result store: one JSON record per run, keyed by everything that changes the number.

A record is written to a unique temporary file in the target folder and renamed into place, so a killed run leaves
no partial record and two writers of the same record cannot interleave (the last complete one wins). Reading a
record that does not parse is an error naming the file, never a silent skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORD_SUFFIX = ".json"


class StoreError(RuntimeError):
    pass


def record_key(identity: dict[str, Any]) -> str:
    """Short stable hash of the identity dict (canonical JSON)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _slug(value: Any) -> str:
    text = str(value)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _budget_slug(identity: dict[str, Any]) -> str:
    """The budget part of a record name; no budget reads 'full' for the unpruned model and 'schedule' for a method
    whose own options set the counts (e.g. PyramidDrop ratios)."""
    budget = identity.get("budget")
    if budget is None:
        return "full" if identity["method"]["name"] == "none" else "schedule"
    return _slug(budget)


def record_path(root: Path, identity: dict[str, Any]) -> Path:
    """results/runs/<model>/<benchmark>/<method>-<budget>-<key>.json"""
    name = f"{_slug(identity['method']['name'])}-{_budget_slug(identity)}-{record_key(identity)}{RECORD_SUFFIX}"
    return Path(root) / _slug(identity["model"]) / _slug(identity["benchmark"]) / name


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            record = json.load(handle)
    except json.JSONDecodeError as exc:
        raise StoreError(f"corrupt result record {path}: {exc}") from exc
    if not isinstance(record, dict) or "identity" not in record or "metrics" not in record:
        raise StoreError(f"result record {path} lacks 'identity' or 'metrics'")
    return record


def iter_records(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every complete record under root (temporary files of running writers are not records)."""
    for path in sorted(Path(root).rglob(f"*{RECORD_SUFFIX}")):
        if path.name.startswith("."):
            continue
        yield path, read_record(path)
