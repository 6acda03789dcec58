"""Hydra entry point: one lmms-eval run in-process, one result record.

    hiprune-eval model=llava15_7b method=hiprune budget=192 benchmark=pope
    hiprune-eval --multirun method=none,random,hiprune budget=192,128,64
    hiprune-eval +experiment=smoke --multirun
    accelerate launch --num_processes 8 -m eval.running.run model=llava15_7b benchmark=pope   # data parallel

Everything that can be checked without model weights (method options, budget against the model's grid, layers
against its encoder, task names, local paths, hub models and datasets while offline, device, limit, batch size, that
the store can be written) is checked before the model loads; a bad config exits non-zero and writes nothing. A run
claims its record (a lock file beside it): an identical run started meanwhile waits, then skips. A record that does
not parse (e.g. cut by a full disk) is reported and rerun into its place. In a multirun every job is validated before
the first starts (eval.running.callbacks), and a job failing at run time is reported while the others go on.
"""

from __future__ import annotations

import contextlib
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
import torch
from datasets import config as datasets_config
from filelock import Timeout
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForImageTextToText

import hiprune
from eval.config import CONFIG_DIR, ConfigError, repo_path, repo_relative
from eval.efficiency.flops import encoder_merges, flops_exact, llm_scoring_flops, tflops_fastv
from eval.lmms.base import BROKEN_IMAGES, check_option_types, lmms_model_class
from eval.lmms.compiled import check_compile
from eval.running.fingerprint import local_inputs
from eval.running.methods import build_from_config, not_implemented_notice
from eval.running.parallel import Ranks, current_ranks, merge_doc_logs, samples_in_doc_order
from eval.running.store import StoreError, claim, read_record, record_path, write_record


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
            "broken_images": self.cfg.broken_images,
            **self.loading,
            **({"compile": True} if self.cfg.model.get("compile") else {}),
            "method": self.method,
        }


def plan_run(cfg: DictConfig, devices_here: bool = True) -> RunPlan:
    """Validate the composed config and resolve everything a run needs, without loading weights (``devices_here``:
    the run's device must exist on this machine; off for a job a launcher sends elsewhere)."""
    m = cfg.model
    check_device(cfg.device, present=devices_here)
    check_limit(cfg.limit)
    check_batch_size(cfg.batch_size)
    model_class = lmms_model_class(m.lmms_model)
    # family options (prompt style, image preprocessing ...) are the model config keys the class declares
    loading = {k: m[k] for k in model_class.loading_options if k in m}
    try:
        check_option_types(model_class, loading)
    except TypeError as exc:
        raise ConfigError(f"model.{exc}") from exc
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
        tower = str(loading["text_tower"])
        if tower.startswith(("assets/", "models/", "./", "/")):
            raise ConfigError(f"local text tower {tower} not found; build it first (make assets)")
        raise ConfigError(
            f"method {method.name!r} compares visual tokens with the prompt through a CLIP text tower paired with the "
            f"vision tower, and the local model {m.name!r} has none (model.text_tower={tower!r} is a hub model's "
            f"tower, not this model's): set model.text_tower to a local CLIP checkpoint paired with this model's "
            f"vision tower, or choose a method that does not read the prompt"
        )
    adapter_options = {k: loading[k] for k in model_class.adapter_option_names if k in loading}
    try:  # method-dependent options (LLaVA-NeXT's layout=auto): the encoder description records what runs
        adapter_options = model_class.resolve_adapter_options(adapter_options, method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    loading, resolved_loading = {**loading, **adapter_options}, {**resolved_loading, **adapter_options}
    encoder = _check_against_architecture(pretrained, m.revision, method, "text_tower" in loading, adapter_options)

    if cfg.broken_images not in BROKEN_IMAGES:
        raise ConfigError(f"broken_images={cfg.broken_images!r}: choose one of {', '.join(BROKEN_IMAGES)}")
    include_path = str(repo_path(cfg.benchmark.include_path)) if cfg.benchmark.include_path else None
    tasks = list(cfg.benchmark.tasks)
    _check_tasks(tasks, include_path, m.lmms_model)
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
    if cfg.broken_images != "error":  # skipping changes the number; the default keeps the records' names
        identity["broken_images"] = cfg.broken_images
    if m.get("compile"):  # only when on: records of eager runs keep their names
        identity["compile"] = True
    # Local model folders and local task data are identified by their bytes too: a rebuilt asset gets new records.
    local = local_inputs(Path(pretrained) if m.local else None, resolved_loading.get("text_tower") if m.local else None,
                         tasks, Path(include_path) if include_path else None)
    if local:
        identity["local_inputs_sha256"] = local
    record = record_path(repo_path(cfg.store), identity)
    check_writable(record.parent, "store")
    return RunPlan(cfg, method, identity, pretrained, tasks, include_path, record, model_class, resolved_loading, encoder)


def _check_against_architecture(
    pretrained: str, revision: str | None, method, has_prompt_encoder: bool, adapter_options: dict[str, Any]
) -> dict[str, Any]:
    """Budget vs grid and layers vs encoder, on a weightless (meta) instance of the real architecture."""
    try:
        config = AutoConfig.from_pretrained(pretrained, revision=revision)
    except OSError as exc:
        if hub_constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"model {pretrained!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it first "
                f"(hf download {pretrained}), unset HF_HUB_OFFLINE, or point model.pretrained at a local folder "
                f"(model.local=true)"
            ) from None
        raise ConfigError(f"cannot read the config of model {pretrained!r}: {str(exc).splitlines()[0]}") from None
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
def task_manager(include_path: str | None, model_name: str | None = None):
    """lmms-eval's task index (seconds to build): once per process, shared by every run of a sweep.

    ``model_name`` is the lmms-eval model's registered name: tasks resolve their model-specific prompt kwargs by it,
    as under lmms-eval's own CLI (e.g. hiprune_textvqa_val's OCR tokens for hiprune_llava)."""
    from lmms_eval.tasks import TaskManager  # deferred on purpose: lmms_eval.tasks takes ~7 s to import

    return TaskManager(include_path=include_path, model_name=model_name)


def _check_tasks(tasks: list[str], include_path: str | None, model_name: str | None = None) -> None:
    manager = task_manager(include_path, model_name)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lmms-eval task(s) {unknown}" + (f" (include_path {include_path})" if include_path else ""))
    for task in tasks:
        _check_local_data(task, manager)
        _check_hub_data(task, manager)


def _check_hub_data(task: str, manager) -> None:
    """While datasets are offline, a task reading a hub dataset must find it in the local cache now (lmms-eval would
    fail after the model loaded, with a tenacity.RetryError)."""
    if not datasets_config.HF_HUB_OFFLINE:
        return
    entry = manager.task_index[task]
    if entry["type"] == "group":
        for sub in manager._get_config(task).get("task") or []:
            if isinstance(sub, str) and sub in manager.task_index:
                _check_hub_data(sub, manager)
        return
    if entry["type"] != "task":
        return
    path = manager._get_config(task).get("dataset_path")
    if not isinstance(path, str) or path in LOCAL_BUILDERS or Path(path).exists() or path.count("/") != 1:
        return
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / path.replace("/", "___")
    if prepared.exists():
        return
    try:
        snapshot_download(path, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"task {task!r} reads the hub dataset {path!r}, which is not in the local cache, and datasets are offline "
            f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): download it first (hf download {path} --repo-type dataset) or "
            f"run with hub access"
        ) from None


def preflight(cfg: DictConfig, devices_here: bool = True) -> str | None:
    """The configuration error that would stop this run before loading, or None (a not-implemented point is not an
    error: it is reported as such when it runs)."""
    if not_implemented_notice(cfg):
        return None
    try:
        plan_run(cfg, devices_here)
    except ConfigError as exc:
        return str(exc)
    return None


def check_device(device: Any, present: bool = True) -> None:
    """device: auto, cpu, cuda, cuda:N or mps, and (``present``) on this machine."""
    text = str(device)
    if text == "auto":
        return
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={text!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not present:
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={text} but no CUDA GPU is visible here: use device=cpu (or auto), or run on a "
                              f"machine with a GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device={text} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={text} but MPS is not available here: use device=cpu (or auto)")


def check_limit(limit: Any) -> None:
    """limit: null (every document), an int >= 1 (documents per task), or a float in (0, 1): lmms-eval's fraction of
    each task's documents."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ConfigError(f"limit={limit!r}: give an int >= 1 (documents per task), a float in (0, 1) (a fraction of "
                          f"each task), or null (every document)")
    if isinstance(limit, int) and limit < 1:
        raise ConfigError(f"limit={limit} must be >= 1 (null runs every document)")
    if isinstance(limit, float) and not 0 < limit < 1:
        raise ConfigError(f"limit={limit}: a float is lmms-eval's fraction of each task's documents and must be in "
                          f"(0, 1); give an int for a number of documents")


def describe_limit(limit: Any) -> dict[str, Any]:
    """How a run's limit reads (recorded with it): every document, a count per task, or a fraction of each task."""
    if limit is None:
        return {"value": None, "meaning": "every document"}
    if isinstance(limit, float):
        return {"value": limit, "meaning": "fraction of each task's documents (lmms-eval: int(n * limit))"}
    return {"value": limit, "meaning": "documents per task (the first ones)"}


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1")


def check_writable(folder: Path, what: str) -> None:
    """``folder`` exists and is writable, or can be created: its nearest existing ancestor is a writable folder."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} folder {folder} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == Path(folder) else f" ({existing} is not writable)"
        raise ConfigError(f"{what} folder {folder} is not writable{where}: choose another {what}= or fix its "
                          f"permissions")


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
    """Mean per-sample prefill FLOPs over the samples with visual input, from the tokens the LLM actually got.

    A sample's grids (images, LLaVA-NeXT crops, video frames) each run through the whole vision tower; the LLM sees
    the sample's visual placeholders (its kept tokens plus a layout's extras, e.g. NeXT's newline tokens) and its
    other prompt tokens as text.

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
    samples = []  # (text tokens, visual tokens at each decoder layer, the LLM-side scoring's FLOPs, grids)
    for key, kept_by_doc in model.kept_tokens.items():
        for doc_id, kept in kept_by_doc.items():
            if not kept:
                continue  # no visual input
            if llm_side:
                visual = list(model.llm_visual_per_layer[key][doc_id])
            else:
                visual = [model.visual_input_tokens[key][doc_id]] * n_layers
            ops = getattr(model, "llm_scoring", {}).get(key, {}).get(doc_id, []) if llm_side else []
            samples.append((model.prefill_tokens[key][doc_id] - visual[0], visual, llm_scoring_flops(config, ops),
                            len(kept)))
    if not samples:
        return {"note": "no samples with visual input"}
    try:
        merges = encoder_merges(model.method, config)  # encoder-stage methods: tokens merged inside the tower
        exact = [flops_exact(config, n_text, visual, n_images=grids, logits_to_keep=1, encoder_merges=merges,
                             llm_scoring=scoring)["total"] for n_text, visual, scoring, grids in samples]
    except NotImplementedError as exc:
        return {"note": f"not counted for this architecture: {exc}"}
    fastv = [
        tflops_fastv(n_layers, text.hidden_size, text.intermediate_size, [n_text + v for v in visual])
        for n_text, visual, _, _ in samples
    ]
    summary = {
        "samples": len(samples),
        "mean_text_tokens": sum(sample[0] for sample in samples) / len(samples),
        "mean_visual_tokens": sum(sample[1][0] for sample in samples) / len(samples),
        "tflops_fastv": sum(fastv) / len(fastv),
        "tflops_exact": sum(exact) / len(exact) / 1e12,
    }
    if llm_side:
        per_layer = zip(*(sample[1] for sample in samples))
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
            task_manager=task_manager(plan.include_path, cfg.model.lmms_model),
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
        # samples whose max_new_tokens was capped to the context their prompt left (the official code runs them)
        "generation": model.capped_generation_summary(),
        # not part of the identity: a sharded run gives the same result
        "data_parallel": {"processes": ranks.world_size, "docs_per_rank": docs_per_rank},
        "versions": _versions(),
        "command": repo_relative(" ".join(sys.argv)),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 3),
        "limit": describe_limit(cfg.limit),
    }
    if cfg.broken_images == "skip":  # samples answered with "" because their image did not decode
        record["broken_images"] = {f"{t}/{s}": docs for (t, s), docs in model.broken_docs.items()}
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
    with _claimed(plan.record) if ranks.is_main else contextlib.nullcontext():
        # the main process decides for all ranks: they must run (and take part in every collective) or skip together
        if ranks.broadcast(ranks.is_main and _finished(plan.record, cfg.force)):
            if ranks.is_main:
                print(f"[hiprune] skip {repo_relative(plan.record)} (exists; force=true reruns)")
            LAST_OUTCOME.update(status="skipped", record=str(plan.record), message="record exists")
            return plan.record
        record = _execute(plan, ranks)
    LAST_OUTCOME.update(status="ran", record=str(plan.record), message="")
    if not ranks.is_main:
        return plan.record
    summary = ", ".join(
        f"{k}={v:.4g}" for m in record["metrics"].values() for k, v in m.items() if "_stderr" not in k
    )
    print(f"[hiprune] {plan.identity['model']} {plan.method.name} budget={plan.method.budget} "
          f"{plan.identity['benchmark']}: {summary} -> {plan.record}")
    return plan.record


@contextlib.contextmanager
def _claimed(record: Path):
    """Hold the record's lock for the run; an identical run holding it is waited for (it then finds the record)."""
    lock = claim(record)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[hiprune] waiting: an identical run is computing {repo_relative(record)}", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _finished(record: Path, force: bool) -> bool:
    """The record exists and parses (and force is off); a corrupt one is reported and rerun into its place."""
    if force or not record.exists():
        return False
    try:
        read_record(record)
    except StoreError as exc:
        print(f"[hiprune] {repo_relative(str(exc))}: rerunning into its place", file=sys.stderr, flush=True)
        return False
    return True


def _execute(plan: RunPlan, ranks: Ranks) -> dict[str, Any] | None:
    try:
        return execute(plan, ranks)
    except Exception:
        if ranks.world_size == 1:
            raise
        # End this process, not just the job: a Hydra multirun would go on to the next job while the other ranks
        # wait in this one's collectives. The launcher then stops every rank; no record is written.
        print(f"[hiprune] rank {ranks.rank} of {ranks.world_size} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(1) from None


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except ConfigError as exc:
        print(f"[hiprune] configuration error: {exc}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        LAST_OUTCOME.update(status="failed", record=None, message=f"configuration error: {exc}")
    except Exception as exc:
        if not multirun:
            raise
        # a sweep goes on with its other jobs; the summary lists this one and the command exits non-zero
        traceback.print_exc()
        LAST_OUTCOME.update(status="failed", record=None, message=f"{type(exc).__name__}: {exc}")
    return last_outcome()  # the job's return value, read by eval.running.callbacks.SweepSummary


if __name__ == "__main__":
    main()
