"""Hydra entry point: one lmms-eval run in-process, one result record.

    hiprune-eval model=llava15_7b method=hiprune budget=192 benchmark=pope
    hiprune-eval --multirun method=none,random,hiprune budget=192,128,64
    hiprune-eval +experiment=smoke --multirun
    accelerate launch --num_processes 8 -m eval.run model=llava15_7b benchmark=pope   # one run, data parallel

Everything that can be checked without model weights (method options, budget against the model's grid, layers
against its encoder, task names, local paths) is checked before the model loads; a bad config exits non-zero and
writes nothing.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from eval.fingerprint import local_inputs
from eval.store import record_path, write_record

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model weights load."""


def repo_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


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
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order, on the main process; None elsewhere."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered


def current_ranks(device: str) -> Ranks:
    """Ranks of this process; under a multi-process launcher this joins the process group (before the model
    loads, so that the resume decision can be shared)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    from eval.lmms_model import data_parallel_state

    state = data_parallel_state(device)
    return Ranks(state.process_index, state.num_processes)


@dataclass
class RunPlan:
    cfg: DictConfig
    method: Any
    identity: dict[str, Any]
    pretrained: str
    tasks: list[str]
    include_path: str | None
    record: Path
    model_class: type
    loading: dict[str, Any]
    encoder: dict[str, Any]  # how the adapter presents visual tokens (recorded with the run)

    @property
    def model_args(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "pretrained": self.pretrained,
            "revision": m.revision,
            "device": self.cfg.device,
            "dtype": m.dtype,
            "batch_size": self.cfg.batch_size,
            "attn_implementation": m.attn_implementation,
            **self.loading,
            "method": self.method.name,
            **self.method_options,
        }

    @property
    def method_options(self) -> dict[str, Any]:
        options = {k: v for k, v in self.method.describe().items() if k != "name"}
        if self.method.stage == "none":
            options.pop("budget", None)
        return options


def plan_run(cfg: DictConfig) -> RunPlan:
    """Validate the composed config and resolve everything a run needs, without loading weights."""
    import hiprune

    m = cfg.model
    model_class = lmms_model_class(m.lmms_model)
    # family options (prompt style, image preprocessing ...) are the model config keys the class declares
    loading = {k: m[k] for k in model_class.loading_options if k in m}
    # repo-relative asset paths (e.g. the tiny model's text tower) become absolute for loading
    resolved_loading = {
        k: str(repo_path(v)) if isinstance(v, str) and not Path(v).is_absolute() and repo_path(v).exists() else v
        for k, v in loading.items()
    }
    options = OmegaConf.to_container(cfg.method.options, resolve=True) or {}
    budget = cfg.budget
    try:
        if cfg.method.name == "none":
            method = hiprune.build_method("none", **options)
        else:
            method = hiprune.build_method(cfg.method.name, budget=budget, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc

    pretrained = str(m.pretrained)
    if m.local:
        local = repo_path(pretrained)
        if not (local / "config.json").is_file():
            raise ConfigError(f"local model {local} not found (no config.json); build it first (make assets)")
        pretrained = str(local)
    if method.needs_prompt and "text_tower" in loading and not loading["text_tower"]:
        raise ConfigError(f"method {method.name!r} needs model.text_tower (a CLIP checkpoint paired with the tower)")
    if method.needs_prompt and m.local and "text_tower" in loading and not Path(resolved_loading["text_tower"]).exists():
        raise ConfigError(f"local text tower {loading['text_tower']} not found; build it first (make assets)")
    adapter_options = {k: loading[k] for k in model_class.adapter_option_names if k in loading}
    encoder = _check_against_architecture(pretrained, m.revision, method, "text_tower" in loading, adapter_options)

    include_path = str(repo_path(cfg.benchmark.include_path)) if cfg.benchmark.include_path else None
    tasks = list(cfg.benchmark.tasks)
    _check_tasks(tasks, include_path)
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")

    identity = {
        "model": m.name,
        "pretrained": str(m.pretrained),
        "revision": m.revision,
        "dtype": m.dtype,
        "attn_implementation": m.attn_implementation,
        "loading": loading,
        "method": method.describe(),
        "budget": method.budget,
        "benchmark": cfg.benchmark.name,
        "tasks": tasks,
        "limit": cfg.limit,
        "harness_version": hiprune.__version__,
        "lmms_eval_version": metadata.version("lmms-eval"),
    }
    # Local model folders and local task data are identified by their bytes too: a rebuilt asset gets new records.
    local = local_inputs(Path(pretrained) if m.local else None, resolved_loading.get("text_tower") if m.local else None,
                         tasks, Path(include_path) if include_path else None)
    if local:
        identity["local_inputs_sha256"] = local
    record = record_path(repo_path(cfg.store), identity)
    return RunPlan(cfg, method, identity, pretrained, tasks, include_path, record, model_class, resolved_loading, encoder)


def lmms_model_class(name: str) -> type:
    """The harness's lmms-eval model class registered under ``name`` (entry point ``lmms_eval.models``)."""
    from lmms_eval.models import get_model

    from eval.lmms_model import HiPruneLMM

    try:
        cls = get_model(name)
    except Exception as exc:
        raise ConfigError(f"unknown lmms-eval model {name!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, HiPruneLMM)):
        raise ConfigError(f"lmms-eval model {name!r} is not one of the harness's pruning models")
    return cls


def _check_against_architecture(
    pretrained: str, revision: str | None, method, has_prompt_encoder: bool, adapter_options: dict[str, Any]
) -> dict[str, Any]:
    """Budget vs grid and layers vs encoder, on a weightless (meta) instance of the real architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    import hiprune

    config = AutoConfig.from_pretrained(pretrained, revision=revision)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    try:
        adapter = hiprune.adapter_for(skeleton, **adapter_options)
        adapter.check_supported(method, prompt_encoder=True if has_prompt_encoder else None)
        adapter.resolve_layers(method)
        adapter.tokens_per_image(method)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc
    return adapter.describe_encoder()


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lmms-eval's task index (seconds to build): once per process, shared by every run of a sweep."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _check_tasks(tasks: list[str], include_path: str | None) -> None:
    manager = task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lmms-eval task(s) {unknown}" + (f" (include_path {include_path})" if include_path else ""))
    for task in tasks:
        _check_local_data(task, manager)


LOCAL_BUILDERS = {"parquet", "csv", "json", "arrow", "text", "imagefolder"}


def _check_local_data(task: str, manager) -> None:
    """A task reading local files must find them now, not after the model has loaded."""
    if manager.task_index[task]["type"] != "task":
        return  # groups and tags: their subtasks are checked when run
    config = manager._get_config(task)
    if config.get("dataset_path") not in LOCAL_BUILDERS:
        return
    yaml_dir = Path(manager.task_index[task]["yaml_path"]).parent
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    paths = files.values() if isinstance(files, dict) else [files]
    for entry in paths:
        for path in [entry] if isinstance(entry, str) else entry:
            if not (yaml_dir / path).exists():
                raise ConfigError(f"task {task!r}: dataset file {yaml_dir / path} is missing (build it first, e.g. make assets)")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "lmms-eval", "hiprune-harness", "hydra-core"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lmms-eval's per-task results, without its bookkeeping keys (e.g. 'pope_accuracy,none' -> 'pope_accuracy')."""
    metrics = {}
    for task, values in results.get("results", {}).items():
        clean = {}
        for key, value in values.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            clean[metric if filter_name in ("", "none") else f"{metric},{filter_name}"] = value
        metrics[task] = clean
    return metrics


def _flops_summary(model, config) -> dict[str, Any]:
    """Mean per-sample prefill FLOPs over the samples with one image, from the tokens the LLM actually got.

    tflops_fastv: the FastV/VisionZip convention (LLM prefill only); flops_exact: 2 x MACs of everything that ran
    (vision tower, projector, LLM prefill, lm_head at the last position as in generate), see eval/flops.py.
    Both count every decoder layer with the tokens it processed: the kept tokens in every layer for methods that
    prune before the LLM; for LLM-side methods the per-layer visual counts logged from the prefill (as the stages
    of the method's drop schedule left them; FastV: all visual tokens before layer K, the kept ones from K on).
    "mean_visual_tokens" is what the LLM's input held.
    """
    from eval.flops import flops_exact, tflops_fastv

    text = config.text_config
    n_layers = text.num_hidden_layers
    llm_side = model.method.stage == "llm"
    samples = []  # (text tokens, visual tokens at each decoder layer)
    for key, kept_by_doc in model.kept_tokens.items():
        for doc_id, kept in kept_by_doc.items():
            if len(kept) == 1:
                visual = list(model.llm_visual_per_layer[key][doc_id]) if llm_side else [kept[0]] * n_layers
                samples.append((model.prefill_tokens[key][doc_id] - visual[0], visual))
    if not samples:
        return {"note": "no single-image samples"}
    try:
        exact = [flops_exact(config, n_text, visual, logits_to_keep=1)["total"] for n_text, visual in samples]
    except NotImplementedError as exc:
        return {"note": f"not counted for this architecture: {exc}"}
    fastv = [
        tflops_fastv(n_layers, text.hidden_size, text.intermediate_size, [n_text + v for v in visual])
        for n_text, visual in samples
    ]
    summary = {
        "samples": len(samples),
        "mean_text_tokens": sum(t for t, _ in samples) / len(samples),
        "mean_visual_tokens": sum(v[0] for _, v in samples) / len(samples),
        "tflops_fastv": sum(fastv) / len(fastv),
        "tflops_exact": sum(exact) / len(exact) / 1e12,
    }
    if llm_side:
        per_layer = zip(*(visual for _, visual in samples))
        summary["mean_visual_tokens_per_layer"] = [sum(layer) / len(samples) for layer in per_layer]
    return summary


# the model's per-doc logs, {(task, split): {doc: ...}} (llm_visual_per_layer: LLM-side methods only, else empty)
DOC_LOGS = ("kept_tokens", "kept_digests", "prefill_tokens", "llm_visual_per_layer")


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


def _samples_in_doc_order(samples: dict[str, list[dict]] | None) -> dict[str, list[dict]] | None:
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


def execute(plan: RunPlan, ranks: Ranks = Ranks()) -> dict[str, Any] | None:
    """Run lmms-eval in-process and write the record; returns it (on the main process; None on the others,
    which shard the requests and write nothing)."""
    from lmms_eval.evaluator import simple_evaluate

    cfg = plan.cfg
    started = time.time()
    model = plan.model_class(**plan.model_args)
    config = model.model.config  # lmms-eval's clean() drops the model after evaluating
    try:
        results = simple_evaluate(
            model=model,
            tasks=plan.tasks,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            task_manager=task_manager(plan.include_path),
            log_samples=bool(cfg.log_samples),
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
            bootstrap_iters=0,
        )
    finally:
        model.close()
    docs_per_rank = merge_doc_logs(model, ranks)
    if not ranks.is_main:
        return None
    if results is None:
        raise RuntimeError("lmms-eval returned no results")
    record = {
        "identity": plan.identity,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metrics": _metrics(results),
        "n_samples": {task: v.get("effective", v.get("original")) for task, v in results.get("n-samples", {}).items()},
        "visual_tokens": model.kept_token_summary(),
        "encoder": plan.encoder,
        "kept_tokens_by_doc": {f"{t}/{s}": docs for (t, s), docs in model.kept_tokens.items()},
        "kept_digest_by_doc": {f"{t}/{s}": docs for (t, s), docs in model.kept_digests.items()},
        # LLM-side methods (FastV): visual tokens per decoder layer of each doc's prefill (absent for the others)
        **({"llm_visual_per_layer_by_doc": {f"{t}/{s}": docs for (t, s), docs in model.llm_visual_per_layer.items()}}
           if plan.method.stage == "llm" else {}),
        "flops": _flops_summary(model, config),
        # not part of the identity: a sharded run gives the same result
        "data_parallel": {"processes": ranks.world_size, "docs_per_rank": docs_per_rank},
        "versions": _versions(),
        "command": " ".join(sys.argv),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 3),
    }
    if cfg.log_samples:
        record["samples"] = _samples_in_doc_order(results.get("samples"))
    write_record(plan.record, record)
    return record


def not_implemented_notice(cfg: DictConfig) -> str | None:
    """A notice if the config names a model or method marked ``implemented: false`` (default true), or a method
    whose stage the model family's adapter cannot run (e.g. FastV on Qwen2.5-VL); else None."""
    for group in ("model", "method"):
        node = cfg.get(group)
        if node is not None and not node.get("implemented", True):
            return (f"{group} {node.get('name')} is not implemented in the harness; skipped — the table shows the "
                    f"paper's numbers marked 'not run'")
    reason = unsupported_reason(str(cfg.model.lmms_model), str(cfg.method.name))
    if reason:
        return f"{reason}; skipped — the table shows the paper's numbers marked 'not run'"
    return None


@functools.lru_cache(maxsize=None)  # asked per table cell by eval.reproduce; the answer depends on the names only
def unsupported_reason(lmms_model: str, method: str) -> str | None:
    """Why the family of ``lmms_model`` cannot run ``method`` at all (its pruning stage), or None."""
    import hiprune
    from hiprune.adapters.base import family_supports_stage, unsupported_stage_message

    if method not in hiprune.METHODS:
        return None  # an unknown method fails later, in plan_run, with its own message
    family = lmms_model_class(lmms_model).family
    if family_supports_stage(family, hiprune.METHODS[method].stage):
        return None
    return unsupported_stage_message(method, family)


# Summary hook for eval.callbacks.SweepSummary: what the last run() in this process did.
LAST_OUTCOME: dict[str, Any] = {}


def last_outcome() -> dict[str, Any]:
    """A copy of LAST_OUTCOME. A function, so that a task function shipped to another process by value (submitit
    pickles the undecorated main) still reads this module's state."""
    return dict(LAST_OUTCOME)


def run(cfg: DictConfig) -> Path | None:
    LAST_OUTCOME.clear()
    notice = not_implemented_notice(cfg)
    if notice:
        print(f"[hiprune] {notice}")
        LAST_OUTCOME.update(status="not implemented", record=None, message=notice)
        return None
    plan = plan_run(cfg)
    ranks = current_ranks(str(cfg.device))
    # the main process decides for all ranks: they must run (and take part in every collective) or skip together
    if ranks.broadcast(plan.record.exists() and not cfg.force):
        if ranks.is_main:
            print(f"[hiprune] skip {plan.record.relative_to(REPO_ROOT) if plan.record.is_relative_to(REPO_ROOT) else plan.record} (exists; force=true reruns)")
        LAST_OUTCOME.update(status="skipped", record=str(plan.record), message="record exists")
        return plan.record
    try:
        record = execute(plan, ranks)
    except Exception:
        if ranks.world_size == 1:
            raise
        # End this process, not just the job: a Hydra multirun would go on to the next job while the other ranks
        # wait in this one's collectives. The launcher then stops every rank; no record is written.
        print(f"[hiprune] rank {ranks.rank} of {ranks.world_size} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(1) from None
    LAST_OUTCOME.update(status="ran", record=str(plan.record), message="")
    if not ranks.is_main:
        return plan.record
    summary = ", ".join(
        f"{k}={v:.4g}" for m in record["metrics"].values() for k, v in m.items() if "_stderr" not in k
    )
    print(f"[hiprune] {plan.identity['model']} {plan.method.name} budget={plan.method.budget} "
          f"{plan.identity['benchmark']}: {summary} -> {plan.record}")
    return plan.record


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    try:
        run(cfg)
    except ConfigError as exc:
        print(f"[hiprune] configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    return last_outcome()  # the job's return value, read by eval.callbacks.SweepSummary


if __name__ == "__main__":
    main()
