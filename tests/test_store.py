"""Result store: atomic records, stable keys, loud failure on corrupt records."""

import json

import pytest

from eval.running.store import StoreError, iter_records, read_record, record_key, record_path, write_record

IDENTITY = {"model": "m", "benchmark": "pope", "method": {"name": "hiprune", "budget": 64}, "budget": 64}


def test_key_is_stable_and_order_independent():
    reordered = dict(reversed(list(IDENTITY.items())))
    assert record_key(IDENTITY) == record_key(reordered)
    assert record_key(IDENTITY) != record_key({**IDENTITY, "budget": 128})


def test_write_then_read_round_trip(tmp_path):
    path = record_path(tmp_path, IDENTITY)
    assert path.parent == tmp_path / "m" / "pope" and path.name.startswith("hiprune-64-")
    write_record(path, {"identity": IDENTITY, "metrics": {"pope": {"acc": 0.5}}})
    assert read_record(path)["metrics"]["pope"]["acc"] == 0.5
    assert [p for p, _ in iter_records(tmp_path)] == [path]
    assert list(path.parent.glob(".*")) == []  # no temporary file left behind


def test_failed_write_leaves_no_record(tmp_path):
    path = record_path(tmp_path, IDENTITY)
    with pytest.raises(TypeError):
        write_record(path, {"identity": IDENTITY, "metrics": {}, "bad": object.__new__(type("X", (), {"__str__": None}))})
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_corrupt_record_is_reported_not_skipped(tmp_path):
    path = record_path(tmp_path, IDENTITY)
    path.parent.mkdir(parents=True)
    path.write_text('{"identity": {"model": "m"}, "metr')
    with pytest.raises(StoreError, match="corrupt"):
        list(iter_records(tmp_path))
    path.write_text(json.dumps({"something": 1}))
    with pytest.raises(StoreError, match="lacks"):
        read_record(path)


def test_temporary_files_of_running_writers_are_ignored(tmp_path):
    path = record_path(tmp_path, IDENTITY)
    write_record(path, {"identity": IDENTITY, "metrics": {}})
    (path.parent / f".{path.name}.abc.tmp").write_text("{partial")
    assert [p for p, _ in iter_records(tmp_path)] == [path]


def test_record_names_say_full_or_schedule_when_there_is_no_budget(tmp_path):
    def name(method, budget):
        return record_path(tmp_path, {"model": "m", "benchmark": "b", "method": {"name": method}, "budget": budget}).name

    assert name("none", None).startswith("none-full-")
    assert name("pdrop", None).startswith("pdrop-schedule-")
    assert name("hiprune", 32).startswith("hiprune-32-") and name("hiprune", 0.25).startswith("hiprune-0.25-")
