"""Result store: one JSON record per run, keyed by everything that changes the number.

A record is written to a unique temporary file in the target folder and renamed into place, so a killed run leaves
no partial record and two writers of the same record cannot interleave (the last complete one wins); records get the
permissions of an ordinary file under the process's umask (0644 under 022), so teammates sharing a store can read
them. Reading a record that does not parse is an error naming the file, never a silent skip (``iter_records`` can
instead collect such files, for a renderer that marks them). A run claims its record with ``claim`` (a lock file
beside it), so a second identical run waits for the first and then finds its record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

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


def _budget_slug(method: str, budget: Any) -> str:
    """The budget part of a record name; no budget reads 'full' for the unpruned model and 'schedule' for a method
    whose own options set the counts (e.g. PyramidDrop ratios)."""
    if budget is None:
        return "full" if method == "none" else "schedule"
    return _slug(budget)


def record_path(root: Path, identity: dict[str, Any]) -> Path:
    """results/runs/<model>/<benchmark>/<method>-<budget>-<key>.json"""
    stem = record_stem(identity["model"], identity["benchmark"], identity["method"]["name"], identity.get("budget"))
    return Path(root) / f"{stem}{record_key(identity)}{RECORD_SUFFIX}"


def record_stem(model: str, benchmark: str, method: str, budget: Any) -> str:
    """The path, relative to the store, that starts the name of every record of this model, benchmark, method and
    budget (a corrupt record's cell is found by it)."""
    return f"{_slug(model)}/{_slug(benchmark)}/{_slug(method)}-{_budget_slug(method, budget)}-"


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: give the record an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def lock_path(path: Path) -> Path:
    """The lock file beside a record (hidden, not a record)."""
    return Path(path).with_name(f".{Path(path).name}.lock")


def claim(path: Path) -> FileLock:
    """A lock on the record at ``path`` (``with claim(path): ...``): one run computes it at a time; an identical run
    started meanwhile waits, then sees the record and skips."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path(path)))


def read_record(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"corrupt result record {path}: {exc}") from exc
    if not isinstance(record, dict) or "identity" not in record or "metrics" not in record:
        raise StoreError(f"result record {path} lacks 'identity' or 'metrics'")
    return record


def iter_records(root: Path, corrupt: list[tuple[Path, str]] | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every complete record under root (temporary files of running writers are not records). A record that does not
    parse raises StoreError, or, given a ``corrupt`` list, is appended to it as (path, reason) and skipped."""
    for path in sorted(Path(root).rglob(f"*{RECORD_SUFFIX}")):
        if path.name.startswith("."):
            continue
        try:
            record = read_record(path)
        except StoreError as exc:
            if corrupt is None:
                raise
            corrupt.append((path, str(exc)))
            continue
        yield path, record
