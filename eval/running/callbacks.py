"""Hydra callback for sweeps: a progress line per job and a final summary of what ran, was skipped or failed.

Registered in configs/config.yaml (``hydra.callbacks.sweep_summary``). Each finished job writes a small status file
(``hiprune_job.json``) into its own Hydra output folder; the summary reads those of the current sweep, so it also
works when jobs run elsewhere (SLURM / Ray launchers write to the same shared sweep folder). The summary is printed
when the sweep ends, and also when it stops early (a failed job makes Hydra raise after its batch; a configuration
error exits at once): then it names how many planned jobs never finished.

Before the first job starts, every job of the sweep is validated as a single run would be before loading (method
options, budgets, tasks, store ...): one bad point stops the sweep with every bad job listed, and nothing runs. A job
that fails at run time is reported and the sweep goes on; the summary lists the failures and the command exits 1.

Statuses: ran (a new record), skipped (the record existed), not implemented (a method the harness does not implement,
a model marked ``implemented: false``, or a method the model family cannot run), failed (an exception; its message is
shown).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from eval.config import ConfigError
from eval.running.launchers import check_launcher
from eval.running.run import preflight

STATUS_FILE = "hiprune_job.json"
ORDER = ("ran", "skipped", "not implemented", "failed")


def _sweep_overrides(config: DictConfig) -> list[str]:
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(config, "hydra.overrides.task") or [])


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of every job a basic-sweeper multirun launches, in launch order."""
    parsed = OverridesParser.create().parse_overrides(_sweep_overrides(config))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def validate_sweep(config: DictConfig) -> list[str]:
    """One line per job of the sweep that would fail its configuration check (empty: every job can start)."""
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
    here = launcher.endswith("BasicLauncher")  # jobs elsewhere (SLURM, Ray): their devices are not this machine's
    loader = GlobalHydra.instance().config_loader()
    errors = []
    for num, overrides in enumerate(job_overrides(config)):
        job = loader.load_sweep_config(config, overrides)
        with open_dict(job):
            del job["hydra"]
        error = preflight(job, devices_here=here)
        if error:
            errors.append(f"  job {num}: {' '.join(overrides)}: {error}")
    return errors


def planned_jobs(config: DictConfig) -> int | None:
    """Number of jobs a basic-sweeper multirun will launch (sweeper params merged with the command line, which
    wins per key, as hydra's BasicSweeper does); None if it cannot be told (e.g. another sweeper)."""
    try:
        strings = _sweep_overrides(config)
        per_key: OrderedDict[str, int] = OrderedDict()
        for override in OverridesParser.create().parse_overrides(strings):
            key = override.get_key_element()
            per_key[key] = len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
        return math.prod(per_key.values()) if per_key else 1
    except Exception:  # noqa: BLE001 -- glob sweeps, other sweepers: no count, no total in the progress line
        return None


def is_main_process() -> bool:
    """False in the other ranks of a data-parallel run (`accelerate launch` / torchrun set RANK): they run every job
    in step with rank 0, which alone reports progress and writes the job statuses."""
    return int(os.environ.get("RANK", "0")) == 0


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else 0
    return "█" * filled + "░" * (width - filled)


def collect(sweep_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """Status records of the jobs of one sweep folder written at or after ``since`` (a time.time())."""
    out = []
    for path in sorted(Path(sweep_dir).glob(f"**/{STATUS_FILE}")):
        try:
            if path.stat().st_mtime + 1e-3 < since:
                continue
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda s: s.get("num", 0))


def format_summary(statuses: list[dict[str, Any]], planned: int | None = None) -> str:
    counts = Counter(s["status"] for s in statuses)
    head = ", ".join(f"{counts[k]} {k}" for k in ORDER if counts[k]) or "no job finished"
    lines = [f"[hiprune] sweep summary: {head}" + (f" (of {planned} planned)" if planned else "")]
    skipped_by_reason = Counter(s.get("message", "") for s in statuses if s["status"] == "not implemented")
    for reason, n in skipped_by_reason.items():
        lines.append(f"  not implemented x{n}: {reason.split(';')[0]}")
    for s in statuses:
        if s["status"] == "failed":
            lines.append(f"  FAILED job {s.get('num')}: {' '.join(s.get('overrides', []))}: {s.get('message', '')}")
    if planned is not None and len(statuses) < planned:
        lines.append(f"  {planned - len(statuses)} planned job(s) did not finish: the sweep stopped early "
                     f"(see the error above); rerun the same command to resume, finished records are skipped")
    return "\n".join(lines)


class SweepSummary(Callback):
    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.sweep_dir: Path | None = None
        self.started = 0.0
        self.planned: int | None = None
        self.printed = False

    # --- multirun (the launching process) --------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process():
            return
        if str(OmegaConf.select(config, "hydra.sweeper._target_") or "").endswith("BasicSweeper"):
            errors = validate_sweep(config)
            if errors:
                print(f"[hiprune] configuration error in {len(errors)} job(s) of the sweep; no job was started:",
                      file=sys.stderr)
                print("\n".join(errors), file=sys.stderr, flush=True)
                sys.exit(2)
        try:
            check_launcher(config)
        except ConfigError as exc:
            print(f"[hiprune] launcher: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.started = time.time()
        self.planned = planned_jobs(config)
        self.printed = False
        if self.verbose and self.planned:
            print(f"[hiprune] sweep: {self.planned} job(s) planned -> {self.sweep_dir}", flush=True)
        atexit.register(self._print_summary)  # also when the sweep stops early

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._print_summary()
        if self.sweep_dir is not None and any(s["status"] == "failed" for s in collect(self.sweep_dir, self.started)):
            sys.exit(1)  # the summary above lists the failed jobs

    # --- every job (wherever it runs) -------------------------------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.verbose or not is_main_process() or OmegaConf.select(config, "hydra.mode") is None:
            return
        if str(OmegaConf.select(config, "hydra.mode")) != "RunMode.MULTIRUN":
            return
        num = int(OmegaConf.select(config, "hydra.job.num", default=0))
        overrides = " ".join(OmegaConf.select(config, "hydra.overrides.task") or [])
        if self.planned:
            progress = f"{num + 1}/{self.planned} {_bar(num, self.planned)} {100 * num / self.planned:3.0f}%"
        else:
            progress = f"{num + 1}"
        print(f"[hiprune] sweep job {progress}: {overrides}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_main_process():
            return
        status = self._status(job_return)
        status["num"] = int(OmegaConf.select(config, "hydra.job.num", default=0) or 0)
        status["overrides"] = list(job_return.overrides or [])
        output_dir = OmegaConf.select(config, "hydra.runtime.output_dir")
        if output_dir:
            path = Path(str(output_dir)) / STATUS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(status))

    @staticmethod
    def _status(job_return: JobReturn) -> dict[str, Any]:
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # reading .return_value would re-raise
            return {"status": "failed", "message": f"{type(error).__name__}: {error}", "record": None}
        value = job_return._return_value
        if isinstance(value, dict) and value.get("status") in ORDER:
            return {"status": value["status"], "message": value.get("message", ""), "record": value.get("record")}
        return {"status": "ran", "message": "", "record": None}

    def _print_summary(self) -> None:
        if self.printed or self.sweep_dir is None:
            return
        self.printed = True
        print(format_summary(collect(self.sweep_dir, self.started), self.planned), file=sys.stdout, flush=True)
