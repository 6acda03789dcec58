"""Data parallelism of one run: `accelerate launch` / torchrun start one process per device, lmms-eval shards the
requests by rank, and the main process merges every rank's per-document logs into the one record it writes."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from eval.lmms.base import DOC_LOGS, data_parallel_state


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (`accelerate launch` / torchrun start one process per device and
    lmms-eval shards the requests by rank). A plain process is rank 0 of 1, where every collective is a no-op."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order, on the main process; None elsewhere."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered


def current_ranks(device: str) -> Ranks:
    """Ranks of this process; under a multi-process launcher this joins the process group (before the model
    loads, so that the resume decision can be shared)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    state = data_parallel_state(device)
    if dist.is_initialized():
        atexit.unregister(leave_process_group)  # once per process, however many runs (a sweep) join
        atexit.register(leave_process_group)
    return Ranks(state.process_index, state.num_processes)


def leave_process_group() -> None:
    """Leave the process group before the interpreter exits (registered at exit by :func:`current_ranks`): a rank that
    exits with the group alive can abort in the gloo threads' teardown ("terminate called without an active
    exception") after its work is done, which fails the whole launch."""
    if dist.is_initialized():
        dist.destroy_process_group()


def merge_doc_logs(model, ranks: Ranks) -> list[int] | None:
    """Replace the model's per-doc logs by those of every rank, merged in doc order, on the main process; returns
    the number of docs each rank answered (None on the other ranks).

    Collective: every rank must call it. Doc order also in a single process, so that a sharded run and a
    single-process run give the same record (the FLOPs means then sum in the same order too)."""
    gathered = ranks.gather({name: getattr(model, name) for name in DOC_LOGS})
    if gathered is None:
        return None
    for name in DOC_LOGS:
        merged: dict[tuple[str, str], dict[int, Any]] = {}
        for rank, logs in enumerate(gathered):
            for key, docs in logs[name].items():
                into = merged.setdefault(key, {})
                for doc_id, value in docs.items():
                    # lmms-eval shards by doc, so a doc seen twice (rank padding repeats a doc) must agree
                    if doc_id in into and into[doc_id] != value:
                        raise RuntimeError(f"{name} of {key[0]}/{key[1]} doc {doc_id} differ between ranks "
                                           f"({into[doc_id]!r} vs {value!r} on rank {rank})")
                    into[doc_id] = value
        setattr(model, name, {key: dict(sorted(docs.items())) for key, docs in sorted(merged.items())})
    return [sum(len(docs) for docs in logs["kept_tokens"].values()) for logs in gathered]


def samples_in_doc_order(samples: dict[str, list[dict]] | None) -> dict[str, list[dict]] | None:
    """lmms-eval's logged samples per task in single-process order: per filter (a doc's k-th row belongs to the k-th
    filter), then by doc id. A sharded run concatenates the ranks' shards instead."""
    if not samples:
        return samples
    ordered = {}
    for task, rows in samples.items():
        seen: dict[Any, int] = {}
        keyed = []
        for row in rows:
            occurrence = seen[row["doc_id"]] = seen.get(row["doc_id"], -1) + 1
            keyed.append(((occurrence, row["doc_id"]), row))
        ordered[task] = [row for _, row in sorted(keyed, key=lambda pair: pair[0])]
    return ordered
