"""Hydra entry point: one lmms-eval run in-process, one result record.

    hiprune-eval model=llava15_7b method=hiprune budget=192 benchmark=pope
    hiprune-eval --multirun method=none,random,hiprune budget=192,128,64
    hiprune-eval +experiment=smoke --multirun
    accelerate launch --num_processes 8 -m eval.running.run model=llava15_7b benchmark=pope   # data parallel

Everything that can be checked without model weights (method options, budget against the model's grid, layers
against its encoder, task names, local paths) is checked before the model loads; a bad config exits non-zero and
writes nothing.
"""

from __future__ import annotations

import datetime as dt
import functools
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForImageTextToText

import hiprune
from eval.config import CONFIG_DIR, REPO_ROOT, ConfigError, repo_path, repo_relative
from eval.efficiency.flops import encoder_merges, flops_exact, tflops_fastv
from eval.lmms.base import lmms_model_class
from eval.lmms.compiled import check_compile
from eval.running.fingerprint import local_inputs
from eval.running.methods import build_from_config, not_implemented_notice
from eval.running.parallel import Ranks, current_ranks, merge_doc_logs, samples_in_doc_order
from eval.running.store import record_path, write_record


@dataclass
class RunPlan:
    cfg: DictConfig
    method: hiprune.Method  # built and validated from cfg.method (eval.running.methods.build_from_config)
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
        """The lmms-eval model's arguments; the method goes in as built (and validated) by plan_run."""
        m = self.cfg.model
        return {
            "pretrained": self.pretrained,
            "revision": m.revision,
            "device": self.cfg.device,
            "dtype": m.dtype,
            "batch_size": self.cfg.batch_size,
            "attn_implementation": m.attn_implementation,
            **self.loading,
            **({"compile": True} if self.cfg.model.get("compile") else {}),
            "method": self.method,
        }


def plan_run(cfg: DictConfig) -> RunPlan:
    """Validate the composed config and resolve everything a run needs, without loading weights."""
    m = cfg.model
    model_class = lmms_model_class(m.lmms_model)
    # family options (prompt style, image preprocessing ...) are the model config keys the class declares
    loading = {k: m[k] for k in model_class.loading_options if k in m}
    # repo-relative asset paths (e.g. the tiny model's text tower) become absolute for loading
    resolved_loading = {
        k: str(repo_path(v)) if isinstance(v, str) and not Path(v).is_absolute() and repo_path(v).exists() else v
        for k, v in loading.items()
    }
    method = build_from_config(cfg.method, cfg.budget)
    if m.get("compile"):  # static cache + torch.compile (eval/lmms/compiled.py): refused before loading if impossible
        try:
            check_compile(method, model_class.family)
        except ValueError as exc:
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
    try:  # method-dependent options (LLaVA-NeXT's layout=auto): the encoder description records what runs
        adapter_options = model_class.resolve_adapter_options(adapter_options, method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    loading, resolved_loading = {**loading, **adapter_options}, {**resolved_loading, **adapter_options}
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
    if m.get("compile"):  # only when on: records of eager runs keep their names
        identity["compile"] = True
    # Local model folders and local task data are identified by their bytes too: a rebuilt asset gets new records.
    local = local_inputs(Path(pretrained) if m.local else None, resolved_loading.get("text_tower") if m.local else None,
                         tasks, Path(include_path) if include_path else None)
    if local:
        identity["local_inputs_sha256"] = local
    record = record_path(repo_path(cfg.store), identity)
    return RunPlan(cfg, method, identity, pretrained, tasks, include_path, record, model_class, resolved_loading, encoder)


def _check_against_architecture(
    pretrained: str, revision: str | None, method, has_prompt_encoder: bool, adapter_options: dict[str, Any]
) -> dict[str, Any]:
    """Budget vs grid and layers vs encoder, on a weightless (meta) instance of the real architecture."""
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
    from lmms_eval.tasks import TaskManager  # deferred on purpose: lmms_eval.tasks takes ~7 s to import

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


def flops_summary(model, config) -> dict[str, Any]:
    """Mean per-sample prefill FLOPs over the samples with one image, from the tokens the LLM actually got.

    tflops_fastv: the FastV/VisionZip convention (LLM prefill only); flops_exact: 2 x MACs of everything that ran
    (vision tower, projector, LLM prefill, lm_head at the last position as in generate), see eval/efficiency/flops.py.
    Both count every decoder layer with the tokens it processed: the kept tokens in every layer for methods that
    prune before the LLM; for LLM-side methods the per-layer visual counts logged from the prefill (as the stages
    of the method's drop schedule left them; FastV: all visual tokens before layer K, the kept ones from K on).
    "mean_visual_tokens" is what the LLM's input held.
    """
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
        merges = encoder_merges(model.method, config)  # encoder-stage methods: tokens merged inside the tower
        exact = [flops_exact(config, n_text, visual, logits_to_keep=1, encoder_merges=merges)["total"]
                 for n_text, visual in samples]
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


def execute(plan: RunPlan, ranks: Ranks = Ranks()) -> dict[str, Any] | None:
    """Run lmms-eval in-process and write the record; returns it (on the main process; None on the others,
    which shard the requests and write nothing)."""
    from lmms_eval.evaluator import simple_evaluate  # deferred on purpose: ~7 s to import, needed only to run

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
        "flops": flops_summary(model, config),
        # not part of the identity: a sharded run gives the same result
        "data_parallel": {"processes": ranks.world_size, "docs_per_rank": docs_per_rank},
        "versions": _versions(),
        "command": repo_relative(" ".join(sys.argv)),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 3),
    }
    if cfg.log_samples:
        record["samples"] = samples_in_doc_order(results.get("samples"))
    write_record(plan.record, record)
    return record


# Summary hook for eval.running.callbacks.SweepSummary: what the last run() in this process did.
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
    return last_outcome()  # the job's return value, read by eval.running.callbacks.SweepSummary


if __name__ == "__main__":
    main()
