"""Reproduce the paper's tables: run a table's sweep (Hydra multirun, resumable), then render it in the paper's shape.

    python -m eval.report.reproduce run 2 [OVERRIDES...]      # = make reproduce-table TABLE=2 [ARGS="limit=200 ..."]
    python -m eval.report.reproduce render 2 [OVERRIDES...]   # re-render one table from the store, nothing runs
    python -m eval.report.reproduce render --all              # = make tables
    python -m eval.report.reproduce plots 2 [OVERRIDES...]    # only the table's plots (render makes them too)
    python -m eval.report.reproduce list                      # the tables and their experiment configs
    python -m eval.report.reproduce run 2 --dry-run           # print the sweep commands and their estimated device-hours

A table is an experiment config (configs/experiment/*.yaml) with a ``paper:`` block naming the paper table, its
models (harness config, paper name, budgets as printed -> harness budget), its rows (label, harness method, method
options) and benchmark columns. TABLE is the block's ``table`` id (2, 3, 4, 5, 7, 8, 10, 6a, 6b, 11, object_layer,
alpha, smoke) or the experiment's name. OVERRIDES are Hydra overrides passed to every sweep and used to compose
the config the renderer reads (store=..., limit=..., batch_size=..., hydra/launcher=submitit_slurm, ...).

``run`` launches, per model, one multirun for the vanilla model (method=none, every benchmark) and one per group of
rows (methods without options together, each row with options on its own) over budgets x benchmarks. Finished
records are skipped, so an interrupted ``run`` resumes where it stopped; methods the harness does not implement
(not in ``hiprune.METHODS``) and models marked ``implemented: false`` are skipped by eval.running.run with a notice.

Every cell of the rendered table reads "ours (paper, delta)". Avg is the paper's relative score (eval.report.paper:
mean of method / baseline x 100 over the benchmarks present, raw MME, missing cells skipped), for ours against our
own vanilla run and for the paper against the paper's vanilla row, with and without VizWiz. Outputs, under
results/tables/: <experiment>.csv (the table as shown), <experiment>.md (title, table, notes), <experiment>.tex
(booktabs), <experiment>_cells.csv (one row per cell, numbers only); plots (eval.report.plots) under results/plots/.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from eval.config import CONFIG_DIR, REPO_ROOT, ConfigError, compose_config, repo_path, repo_relative
from eval.efficiency import estimate
from eval.efficiency.flops import flops_exact
from eval.lmms.base import lmms_model_class
from eval.report import paper as P
from eval.report import plots as plotting
from eval.running.methods import build_from_config, is_implemented, unsupported_reason
from eval.running.store import iter_records, record_stem

EXPERIMENT_DIR = CONFIG_DIR / "experiment"
TABLES_DIR = REPO_ROOT / "results" / "tables"
PLOTS_DIR = REPO_ROOT / "results" / "plots"

# Identity fields that are not model settings. Every other identity field (revision, dtype, attention backend, and
# the family's loading options, flat or under identity["loading"]) must equal the composed model config's value
# when both have it, for a record to fill a cell.
NOT_SETTINGS = {"model", "pretrained", "method", "budget", "benchmark", "tasks", "limit", "harness_version",
                "lmms_eval_version", "loading"}
LAYOUT_NOTE = ("Layout (LLaVA-NeXT): the layout each row ran, from its records (the one its run will use where none "
               "exists yet): native = the standard model (anyres with unpadding and newline tokens, the paper's vanilla "
               "rows); official = the official pruning code's 'spatial' layout (5 × 576, no unpadding or newlines).")
VIZWIZ_NOTE = ("VizWiz: the paper's HiPrune cells come from lmms-eval's val split while vanilla and most baselines "
               "were measured under another protocol, hence Avg is shown with and without VizWiz.")


# ------------------------------------------------------------------------------------------------------------------
# Table specs (experiment configs with a paper: block)
# ------------------------------------------------------------------------------------------------------------------
def list_tables() -> dict[str, str]:
    """table id -> experiment config name, for every experiment config with a ``paper:`` block."""
    out = {}
    for path in sorted(EXPERIMENT_DIR.glob("*.yaml")):
        raw = OmegaConf.load(path)
        block = raw.get("paper") if isinstance(raw, DictConfig) else None
        if block is not None and block.get("table") is not None:
            out[str(block.table)] = path.stem
            for alias in block.get("aliases") or []:
                out.setdefault(str(alias), path.stem)
    return out


def experiment_name(table: str) -> str:
    tables = list_tables()
    if str(table) in tables:
        return tables[str(table)]
    if str(table) in tables.values():
        return str(table)
    raise SystemExit(f"unknown table {table!r}; known: {', '.join(f'{k} ({v})' for k, v in tables.items())}")


def compose(experiment: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The run config of ``experiment`` with ``overrides``, as a sweep of the table composes it."""
    return compose_config([f"+experiment={experiment}", *overrides])


@dataclass
class Row:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    paper: str | None = None  # method name in the paper's data (None: a harness-only row)
    # budget label -> extra options: at that label the row runs with budget=null and these options (a method whose
    # own schedule sets the counts, e.g. PyramidDrop ratios or SparseVLM counts on a small model)
    by_budget: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def implemented(self) -> bool:
        """The harness implements the row's method (registered in hiprune.METHODS)."""
        return is_implemented(self.method)

    def options_at(self, budget_label: str | None) -> dict[str, Any]:
        """The method options of the row's run at ``budget_label``."""
        return {**self.options, **self.by_budget.get(str(budget_label), {})}

    def budget_at(self, budget_label: str | None, budget: Any) -> Any:
        """The ``budget`` of the row's run at ``budget_label`` (None where ``by_budget`` sets the schedule)."""
        return None if str(budget_label) in self.by_budget else budget


@dataclass
class ModelSpec:
    config: str
    paper: str
    reference_table: str | None
    vanilla: str | None  # the paper's budget label of its vanilla row; None: no vanilla row (ablations)
    budgets: dict[str, Any]  # paper label -> harness budget
    implemented: bool = True
    settings: dict[str, Any] = field(default_factory=dict)  # composed model config


@dataclass
class Spec:
    experiment: str
    table: str
    title: str
    kind: str
    layout: str
    avg_baseline: str
    benchmarks: list[str]
    benchmark_configs: dict[str, str]
    models: list[ModelSpec]
    rows: list[Row]
    store: Path
    limit: int | None
    offline: bool
    efficiency: dict[str, Any]
    overrides: list[str]
    notes: list[str] = field(default_factory=list)  # the paper: block's notes, printed under the table


def load_spec(table: str, overrides: Sequence[str] = ()) -> Spec:
    experiment = experiment_name(table)
    cfg = compose(experiment, overrides)
    block = OmegaConf.to_container(cfg.paper, resolve=True)
    models = []
    for m in block["models"]:
        model_cfg = compose(experiment, [*overrides, f"model={m['config']}"]).model
        models.append(
            ModelSpec(
                config=m["config"],
                paper=m["paper"],
                reference_table=None if m.get("reference_table") is None else str(m["reference_table"]),
                vanilla=None if m.get("vanilla") is None else str(m["vanilla"]),
                budgets={str(k): v for k, v in m["budgets"].items()},
                implemented=bool(model_cfg.get("implemented", True)),
                settings=OmegaConf.to_container(model_cfg, resolve=True),
            )
        )
    rows = []
    for r in block["rows"]:
        if not (CONFIG_DIR / "method" / f"{r['method']}.yaml").is_file():
            raise SystemExit(f"method config {CONFIG_DIR / 'method' / (r['method'] + '.yaml')} is missing")
        paper = str(r["label"]) if "paper" not in r else (None if r["paper"] is None else str(r["paper"]))
        by_budget = {str(k): dict(v or {}) for k, v in (r.get("by_budget") or {}).items()}
        rows.append(Row(label=str(r["label"]), method=r["method"], options=dict(r.get("options") or {}), paper=paper,
                        by_budget=by_budget))
    benchmark_configs = {**P.BENCHMARK_CONFIGS, **(block.get("benchmark_configs") or {})}
    return Spec(
        experiment=experiment,
        table=str(block["table"]),
        title=block.get("title", experiment),
        kind=block.get("kind", "accuracy"),
        layout=block.get("layout", "budget"),
        avg_baseline=str(block.get("avg_baseline", "vanilla")),
        benchmarks=list(block.get("benchmarks", [])),
        benchmark_configs=benchmark_configs,
        models=models,
        rows=rows,
        store=repo_path(cfg.store),
        limit=cfg.get("limit"),
        offline=bool(block.get("offline", False)),
        efficiency=dict(block.get("efficiency") or {}),
        overrides=list(overrides),
        notes=[str(n) for n in block.get("notes") or []],
    )


@functools.lru_cache(maxsize=256)
def _method_config(experiment: str, overrides: tuple[str, ...], model: str, method: str, options: tuple) -> str:
    """JSON of the method config (name + resolved options) as the composed run config would hold it."""
    cfg = compose(experiment, [*overrides, f"model={model}", f"method={method}",
                               *[f"method.options.{k}={_hydra_value(v)}" for k, v in options]])
    return json.dumps(OmegaConf.to_container(cfg.method, resolve=True))


def _build_method(row: Row, budget_label: str | None, budget: Any, spec: Spec, model: ModelSpec):
    """The method a run of this row at this budget builds, or None if it is not buildable."""
    if not row.implemented:
        return None
    options = tuple(sorted((k, _hydra_value(v)) for k, v in row.options_at(budget_label).items()))
    method_cfg = json.loads(_method_config(spec.experiment, tuple(spec.overrides), model.config, row.method, options))
    try:
        return build_from_config(method_cfg, row.budget_at(budget_label, budget))
    except ConfigError:
        return None


def _method_identity(row: Row, budget_label: str | None, budget: Any, spec: Spec,
                     model: ModelSpec) -> dict[str, Any] | None:
    """The method dict a record of this row at this budget carries (identity['method']), or None if not buildable."""
    method = _build_method(row, budget_label, budget, spec, model)
    return None if method is None else method.describe()


def run_settings(model: ModelSpec, method) -> dict[str, Any]:
    """The model settings a run of ``method`` records: the family's method-dependent adapter options resolved as the
    run resolves them (LLaVA-NeXT's ``layout=auto``: ``native`` for the vanilla model, ``official`` when pruning)."""
    settings = dict(model.settings)
    if method is None:
        return settings
    cls = lmms_model_class(str(settings["lmms_model"]))
    options = {k: settings[k] for k in cls.adapter_option_names if k in settings}
    try:
        settings.update(cls.resolve_adapter_options(options, method))
    except ValueError:
        pass  # the run refuses it before loading; the cell stays pending
    return settings


def _layout_of(model: ModelSpec, settings: dict[str, Any]) -> str | None:
    """The LLaVA-NeXT layout in ``settings`` (None for families without one)."""
    cls = lmms_model_class(str(model.settings["lmms_model"]))
    return str(settings["layout"]) if "layout" in cls.adapter_option_names and "layout" in settings else None


def _family_runs(model: ModelSpec, row: Row) -> bool:
    """False when the model's family cannot run the row's method at all (e.g. an LLM-side method on Qwen2.5-VL):
    eval.running.run skips such runs with a notice, and the cells read 'not run'."""
    return row.method == "none" or unsupported_reason(str(model.settings["lmms_model"]), row.method) is None


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


# ------------------------------------------------------------------------------------------------------------------
# Store
# ------------------------------------------------------------------------------------------------------------------
def load_results(store: Path) -> pd.DataFrame:
    """One row per (record, task): identity fields, the value in the paper's scale, provenance."""
    rows = []
    corrupt: list[tuple[Path, str]] = []  # reported here, and their cells marked by collect_cells
    if Path(store).exists():
        for path, record in iter_records(store, corrupt):
            identity = record["identity"]
            for task, metrics in record["metrics"].items():
                rows.append(
                    {
                        "model": identity["model"],
                        "benchmark": identity["benchmark"],
                        "task": task,
                        "method": identity["method"],
                        "budget": identity.get("budget"),
                        "limit": identity.get("limit"),
                        "settings": {**{k: v for k, v in identity.items() if k not in NOT_SETTINGS},
                                     **(identity.get("loading") or {})},
                        "value": P.paper_value(task, metrics),
                        "n_samples": (record.get("n_samples") or {}).get(task),
                        "kept_per_image": (record.get("visual_tokens") or {}).get("mean_kept_per_image"),
                        "timestamp": record.get("timestamp", ""),
                        "record": repo_relative(path),
                    }
                )
    frame = pd.DataFrame(rows, columns=["model", "benchmark", "task", "method", "budget", "limit", "settings",
                                        "value", "n_samples", "kept_per_image", "timestamp", "record"])
    for path, reason in corrupt:
        print(f"[reproduce] {repo_relative(reason)}: skipped, its cell reads 'corrupt record' (rerun the sweep to "
              f"replace it)", file=sys.stderr, flush=True)
    frame.attrs["corrupt"] = [str(Path(path).relative_to(store)) for path, _ in corrupt]
    return frame


def _settings_match(record_settings: dict, model_settings: dict) -> bool:
    return all(model_settings[k] == v for k, v in record_settings.items() if k in model_settings)


def _where(frame: pd.DataFrame, column: str, keep) -> pd.DataFrame:
    """Rows whose ``column`` value passes ``keep`` (a boolean mask that stays a mask on an empty frame)."""
    if frame.empty:
        return frame
    return frame.loc[[bool(keep(v)) for v in frame[column]]]


def find_result(results: pd.DataFrame, model: ModelSpec, benchmark_config: str, method: dict, limit: int | None,
                settings: dict[str, Any] | None = None):
    """The record row that fills a cell: same model settings (``settings``, default the model's), benchmark, method
    identity (budget included).

    Several candidates (e.g. different limits or versions): prefer limit == the table's limit, then the most
    samples, then the newest record.
    """
    if results.empty:
        return None
    sel = (results["model"] == model.settings.get("name", model.config)) & (results["benchmark"] == benchmark_config)
    cand = results[sel]
    if cand.empty:
        return None
    cand = _where(cand, "method", lambda m: m == method)
    expected = model.settings if settings is None else settings
    cand = _where(cand, "settings", lambda v: _settings_match(v, expected))
    cand = _where(cand, "value", lambda v: v is not None and not pd.isna(v))
    if cand.empty:
        return None
    preferred = _where(cand, "limit", lambda v: v == limit)
    if not preferred.empty:
        cand = preferred
    cand = cand.assign(_n=cand["n_samples"].fillna(-1)).sort_values(["_n", "timestamp"], ascending=False)
    return cand.iloc[0]


# ------------------------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------------------------
def budget_group_label(model: ModelSpec, label: str) -> str:
    if label.endswith("%"):
        return f"Retain {label} Tokens"
    if model.vanilla and model.vanilla.isdigit() and label.isdigit():
        return f"Retain {label} Tokens ({100 * int(label) / int(model.vanilla):.1f}%)"
    return f"Retain {label} Tokens"


def collect_cells(spec: Spec, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (model, row, budget, benchmark) of the table, ours and paper side by side."""
    results = load_results(spec.store) if results is None else results
    reference = P.load_accuracy()
    cells = []
    for model in spec.models:
        vanilla = Row(label="Vanilla", method="none", paper="vanilla")
        entries: list[tuple[Row, str | None, Any]] = []
        if model.vanilla is not None:
            entries.append((vanilla, model.vanilla, None))
        for row in spec.rows:
            for label, budget in model.budgets.items():
                entries.append((row, label, budget))
        for row, budget_label, budget in entries:
            runnable = row.implemented and model.implemented and _family_runs(model, row)
            method = _build_method(row, budget_label, budget, spec, model) if runnable else None
            method_id = None if method is None else method.describe()
            settings = run_settings(model, method)
            paper_row = {}
            if row.paper is not None and model.reference_table is not None:
                paper_row = P.row_values(reference, model.reference_table, model.paper, row.paper, budget_label)
            is_vanilla = row is vanilla
            if not is_vanilla and not paper_row and not runnable:
                continue  # neither in the paper at this budget nor runnable here
            for bench in spec.benchmarks:
                bench_config = spec.benchmark_configs.get(bench, bench)
                found = (find_result(results, model, bench_config, method_id, spec.limit, settings)
                         if method_id else None)
                if found is not None:
                    status = "ok"
                elif not runnable:
                    status = "not run"
                elif any(c.startswith(record_stem(model.settings.get("name", model.config), bench_config,
                                                  method_id["name"], method_id.get("budget")))
                         for c in results.attrs.get("corrupt", [])):
                    status = "corrupt record"
                else:
                    status = "pending"
                ours = None if found is None else float(found["value"])
                ref = paper_row.get(bench)
                cells.append(
                    {
                        "table": spec.table,
                        "model": model.config,
                        "paper_model": model.paper,
                        "row": row.label,
                        "method": row.method,
                        "options": row.options_at(budget_label),
                        "budget_label": budget_label if not is_vanilla else model.vanilla,
                        "budget": budget,
                        "vanilla": is_vanilla,
                        "benchmark": bench,
                        "ours": ours,
                        "paper": ref,
                        "delta": None if ours is None or ref is None else ours - ref,
                        "status": status,
                        "n_samples": None if found is None else found["n_samples"],
                        "limit": None if found is None else found["limit"],
                        "kept_per_image": None if found is None else found["kept_per_image"],
                        "record": None if found is None else found["record"],
                        "layout": (_layout_of(model, found["settings"]) if found is not None
                                   else _layout_of(model, settings) if method is not None else None),
                    }
                )
    return pd.DataFrame(cells)


def _values(cells: pd.DataFrame, column: str) -> dict[str, float]:
    return {b: v for b, v in zip(cells["benchmark"], cells[column]) if v is not None and not pd.isna(v)}


def row_averages(spec: Spec, cells: pd.DataFrame) -> pd.DataFrame:
    """Avg (and Avg without VizWiz) per table row, ours vs our baseline and paper vs the paper's baseline."""
    out = []
    if cells.empty:
        return pd.DataFrame(out)
    for (model, row, budget_label), group in cells.groupby(["model", "row", "budget_label"], sort=False, dropna=False):
        if spec.avg_baseline == "vanilla":
            base = cells[(cells["model"] == model) & cells["vanilla"]]
        else:
            base = cells[(cells["model"] == model) & (cells["row"] == spec.avg_baseline)
                         & (cells["budget_label"] == budget_label)]
        entry = {"model": model, "row": row, "budget_label": budget_label}
        for side in ("ours", "paper"):
            row_values, base_values = _values(group, side), _values(base, side)
            entry[f"avg_{side}"] = P.relative_avg(row_values, base_values, benchmarks=spec.benchmarks)
            entry[f"avg_{side}_no_vizwiz"] = P.relative_avg(row_values, base_values, exclude=P.EXCLUDED_FOR_NO_VIZWIZ,
                                                            benchmarks=spec.benchmarks)
        out.append(entry)
    return pd.DataFrame(out)


def printed_avg_notes(spec: Spec) -> dict[tuple[str, str, str], str]:
    """(model, row, budget_label) -> note where the paper prints an Avg that its own cells do not give.

    Only for tables that show every benchmark of the paper's table (otherwise our Avg covers other columns).
    """
    check = P.recompute_printed()
    bad = P.misprints(check)
    reference = P.load_accuracy()
    notes = {}
    for model in spec.models:
        if model.reference_table is None:
            continue
        paper_benches = set(reference[(reference["table"] == model.reference_table)
                                      & (reference["model"] == model.paper)]["benchmark"])
        if not paper_benches <= set(spec.benchmarks):
            continue
        for _, b in bad[(bad["table"] == model.reference_table) & (bad["model"] == model.paper)].iterrows():
            for row in [r.label for r in spec.rows if r.paper == b["method"]]:
                notes[(model.config, row, str(b["budget"]))] = (
                    f"the paper prints {b['printed']:.1f}% for {b['method']} at {b['budget']}; its own cells give "
                    f"{b['recomputed']:.2f}% (a misprint in the paper)")
    return notes


# ------------------------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, bench: str) -> str:
    if value is None or pd.isna(value):
        return "—"
    return f"{value:.0f}" if bench == "MME" else f"{value:.1f}"


def _fmt_delta(delta: float | None, bench: str) -> str:
    if delta is None or pd.isna(delta):
        return ""
    return f"{delta:+.0f}" if bench == "MME" else f"{delta:+.1f}"


def format_cell(ours: float | None, paper: float | None, status: str, bench: str) -> str:
    has_ours = ours is not None and not pd.isna(ours)
    has_paper = paper is not None and not pd.isna(paper)
    if has_ours and has_paper:
        return f"{_fmt(ours, bench)} ({_fmt(paper, bench)}, {_fmt_delta(ours - paper, bench)})"
    if has_ours:
        return _fmt(ours, bench)
    word = status if status in ("not run", "corrupt record") else "pending"
    return f"{word} ({_fmt(paper, bench)})" if has_paper else word


def format_avg(ours: float, paper: float, any_status: str, mark: str = "") -> str:
    has_ours, has_paper = not pd.isna(ours), not pd.isna(paper)
    if has_ours and has_paper:
        return f"{ours:.1f}% ({paper:.1f}%{mark}, {ours - paper:+.1f})"
    if has_ours:
        return f"{ours:.1f}%"
    if has_paper:
        return f"{any_status} ({paper:.1f}%{mark})"
    return any_status


@dataclass
class Rendered:
    header: list[str]
    lines: list[tuple[str, list[str]]]  # ("group", [title]) or ("row", cells)
    notes: list[str]


def build_table(spec: Spec, cells: pd.DataFrame) -> Rendered:
    averages = row_averages(spec, cells)
    misprints = printed_avg_notes(spec)
    # LLaVA-NeXT: which layout each row ran (records' loading.layout; the expected one where no record exists yet)
    with_layout = "layout" in cells and cells["layout"].notna().any()
    with_vizwiz = "VizWiz" in spec.benchmarks  # else "Avg w/o VizWiz" would repeat Avg
    header = ["Method", *(["Layout"] if with_layout else []), *spec.benchmarks, "Avg",
              *(["Avg w/o VizWiz"] if with_vizwiz else [])]
    lines: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    multi = len(spec.models) > 1

    def row_line(model: ModelSpec, row_label: str, budget_label: str, display: str) -> list[str] | None:
        group = cells[(cells["model"] == model.config) & (cells["row"] == row_label)
                      & (cells["budget_label"] == budget_label)]
        if group.empty:
            return None
        out = [display]
        if with_layout:
            out.append(" / ".join(sorted({str(v) for v in group["layout"] if v is not None and not pd.isna(v)})) or "—")
        by_bench = {r.benchmark: r for r in group.itertuples()}
        statuses = set(group["status"])
        status = "not run" if "not run" in statuses else "pending"
        for bench in spec.benchmarks:
            r = by_bench.get(bench)
            out.append("—" if r is None else format_cell(r.ours, r.paper, r.status, bench))
        avg = averages[(averages["model"] == model.config) & (averages["row"] == row_label)
                       & (averages["budget_label"] == budget_label)].iloc[0]
        mark = ""
        key = (model.config, row_label, budget_label)
        if key in misprints:
            mark = "†"
            notes.append(f"† {model.paper}: {misprints[key]}.")
        out.append(format_avg(avg.avg_ours, avg.avg_paper, status, mark))
        if with_vizwiz:
            out.append(format_avg(avg.avg_ours_no_vizwiz, avg.avg_paper_no_vizwiz, status))
        return out

    for model in spec.models:
        prefix = f"{model.paper} · " if multi else ""
        if model.vanilla is not None:
            lines.append(("group", [f"{prefix}Vanilla, {model.vanilla} tokens" if not model.vanilla.endswith("%")
                                    else f"{prefix}Vanilla, 100% tokens"]))
            line = row_line(model, "Vanilla", model.vanilla, f"Vanilla ({model.config})")
            if line:
                lines.append(("row", line))
        if spec.layout == "method":
            for row in spec.rows:
                group_lines = [row_line(model, row.label, label, f"{label}") for label in model.budgets]
                group_lines = [g for g in group_lines if g]
                if group_lines:
                    lines.append(("group", [f"{prefix}w/ {row.label}"]))
                    lines.extend(("row", g) for g in group_lines)
        else:
            for label in model.budgets:
                group_lines = [row_line(model, row.label, label, row.label) for row in spec.rows]
                group_lines = [g for g in group_lines if g]
                if group_lines:
                    lines.append(("group", [f"{prefix}{budget_group_label(model, label)}"]))
                    lines.extend(("row", g) for g in group_lines)

    notes = list(dict.fromkeys(notes))
    if any(m.reference_table is not None for m in spec.models):
        notes.insert(0, "Cells: ours (paper, ours − paper). 'not run': the harness lacks the method or model, or the "
                        "model's family cannot run the method (an LLM-side method outside LLaVA-1.5); the paper's "
                        "number is shown; 'pending': runnable here but no record yet; —: no number.")
    else:
        notes.insert(0, "Cells: ours (the model is not in the paper: no paper numbers). 'pending': runnable here but no "
                        "record yet; —: no number.")
    baseline = "the vanilla model" if spec.avg_baseline == "vanilla" else f"the default setting ({spec.avg_baseline})"
    notes.append(f"Avg: mean over the benchmarks present of value / value of {baseline} × 100 (ours against our own "
                 "run of it, the paper's against the paper's row, recomputed from the paper's cells), MME raw, missing "
                 "cells skipped.")
    if "VizWiz" in spec.benchmarks:
        notes.append(VIZWIZ_NOTE)
    if with_layout:
        notes.append(LAYOUT_NOTE)
    notes.extend(spec.notes)
    limited = cells[cells["limit"].notna()] if "limit" in cells else cells.iloc[0:0]
    if len(limited):
        limits = sorted({int(v) for v in limited["limit"]})
        notes.append(f"Some of our cells come from runs on a subset of the benchmark (limit={limits}).")
    unrun_models = [m.paper for m in spec.models if not m.implemented]
    if unrun_models:
        notes.append(f"Not supported by the harness yet: {', '.join(unrun_models)} (every cell 'not run').")
    return Rendered(header, lines, notes)


def to_frame(rendered: Rendered) -> pd.DataFrame:
    width = len(rendered.header)
    rows = [(cells + [""] * (width - len(cells))) if kind == "row" else [f"[{cells[0]}]"] + [""] * (width - 1)
            for kind, cells in rendered.lines]
    return pd.DataFrame(rows, columns=rendered.header)


def to_markdown(spec: Spec, rendered: Rendered) -> str:
    width = len(rendered.header)
    out = [f"# {spec.title}", "", f"Experiment `{spec.experiment}`; store `{repo_relative(spec.store)}`.", ""]
    out.append("| " + " | ".join(rendered.header) + " |")
    out.append("|" + "|".join([":---"] + ["---:"] * (width - 1)) + "|")
    for kind, cells in rendered.lines:
        if kind == "group":
            out.append("| **" + cells[0] + "** |" + " |" * (width - 1))
        else:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out.append("")
    out.extend(f"- {note}" for note in rendered.notes)
    return "\n".join(out) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "−": "$-$", "—": "--", "†": r"$^\dagger$", "·": r"$\cdot$", "×": r"$\times$", "α": r"$\alpha$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(spec: Spec, rendered: Rendered) -> str:
    width = len(rendered.header)
    out = [
        "% Generated by python -m eval.report.reproduce; needs \\usepackage{booktabs,graphicx}",
        "\\begin{table*}[t]",
        "\\centering",
        f"\\caption{{{latex_escape(spec.title)}. Cells: ours (paper, ours$-$paper).}}",
        "\\resizebox{\\linewidth}{!}{%",
        "\\begin{tabular}{l" + "c" * (width - 1) + "}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in rendered.header) + " \\\\",
    ]
    for kind, cells in rendered.lines:
        if kind == "group":
            out += ["\\midrule", f"\\multicolumn{{{width}}}{{c}}{{\\textit{{{latex_escape(cells[0])}}}}} \\\\", "\\midrule"]
        else:
            out.append(" & ".join(latex_escape(c) for c in cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}}", "\\end{table*}"]
    out += [f"% {line}" for line in rendered.notes]
    return "\n".join(out) + "\n"



# ------------------------------------------------------------------------------------------------------------------
# Efficiency (Table 5)
# ------------------------------------------------------------------------------------------------------------------
def _arch_config(model: ModelSpec):
    """HF config of the model's architecture, from configs/arch (hub models) or the local checkpoint."""
    pretrained = str(model.settings.get("pretrained", ""))
    candidates = []
    if model.settings.get("local"):
        candidates.append(repo_path(pretrained))
    candidates.append(CONFIG_DIR / "arch" / pretrained.split("/")[-1].lower())
    for folder in candidates:
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder)
    return None


def tflops(model: ModelSpec, n_visual: int, n_text: int) -> tuple[float | None, str]:
    """calflops-convention TFLOPs of one forward (every linear layer, attention scores excluded) from
    eval/efficiency/flops.py."""
    config = _arch_config(model)
    if config is None:
        return None, f"no architecture config for {model.config} (configs/arch)"
    try:
        counts = flops_exact(config, n_text, n_visual)
    except (NotImplementedError, ValueError, AttributeError) as exc:
        return None, f"flops_exact: {exc}"
    return (counts["total"] - counts["attention_scores"]) / 1e12, "eval.efficiency.flops.flops_exact (linear layers)"


def render_efficiency(spec: Spec) -> tuple[pd.DataFrame, str, str, pd.DataFrame]:
    reference = P.load_efficiency()
    n_text = int(spec.efficiency.get("n_text", 24))
    model = spec.models[0]
    metrics = [("tflops", "TFLOPs"), ("prefill_ms", "Prefill (ms)"), ("decode_ms", "Decode (ms)"),
               ("throughput_tok_s", "Throughput (tok/s)"), ("vram_gb", "VRAM (GB)")]
    header = ["Method", *[title for _, title in metrics]]
    lines: list[tuple[str, list[str]]] = []
    tidy = []
    source = ""
    entries = [("Vanilla", "vanilla", "none", model.vanilla, int(model.vanilla))]
    entries += [(row.label, row.paper, row.method, label, int(budget)) for label, budget in model.budgets.items()
                for row in spec.rows]
    current_group = None
    for label, paper_method, method, budget_label, n_visual in entries:
        group = "Vanilla, 576 tokens" if method == "none" else budget_group_label(model, budget_label)
        if group != current_group:
            lines.append(("group", [group]))
            current_group = group
        ref = reference[(reference["model"] == model.paper) & (reference["method"] == paper_method)
                        & (reference["budget"] == str(budget_label))]
        ref = ref.iloc[0] if len(ref) else None
        implemented = method == "none" or is_implemented(method)
        ours, source = tflops(model, n_visual, n_text) if implemented else (None, source)
        cells = [model.paper if method == "none" else label]
        for key, _ in metrics:
            paper_value = None if ref is None else float(ref[key])
            std = None if ref is None or f"{key}_std" not in ref else ref[f"{key}_std"]
            if key == "tflops":
                if ours is None and not implemented:
                    cells.append(f"not run ({paper_value:.2f})" if paper_value is not None else "not run")
                elif ours is None:
                    cells.append("—")
                elif paper_value is None:
                    cells.append(f"{ours:.2f}")
                else:
                    cells.append(f"{ours:.2f} ({paper_value:.2f}, {ours - paper_value:+.2f})")
            else:
                if paper_value is None:
                    cells.append("—")
                else:
                    spread = f" ± {float(std):.2f}" if std is not None and not pd.isna(std) else ""
                    cells.append(f"not measured ({paper_value:.2f}{spread})")
            tidy.append({"row": label, "budget_label": budget_label, "metric": key,
                         "ours": ours if key == "tflops" else None,
                         "paper": None if ref is None else float(ref[key])})
        lines.append(("row", cells))
    notes = [
        (f"TFLOPs (ours): {source or 'eval.efficiency.flops'}, one forward of {int(model.vanilla)} → N' visual + "
         f"{n_text} text "
         "tokens, lm_head on every position, attention-score FLOPs excluded: the calflops convention of the paper "
         "(calflops misses F.scaled_dot_product_attention). The paper's prompt length is not given ('around 600 "
         "tokens'), so small offsets are expected."),
        ("Latency, throughput and memory are not measured by this table: see the efficiency benchmark (make bench) "
         "for measured numbers on the machine at hand; the paper's are A100-40G, 11 runs, first dropped."),
    ]
    if any(not (r.method == "none" or r.implemented) for r in spec.rows):
        notes.append("'not run': the harness lacks the method; the paper's number is shown.")
    if any(r.method == "hiprune_pp" and r.implemented for r in spec.rows):
        notes.append("HiPrune++: only the VLM is counted, not the CLIP text encoder that scores the prompt "
                     "(the paper's +0.01-0.02 TFLOPs over HiPrune).")
    tidy = pd.DataFrame(tidy)
    offsets = tidy[(tidy["metric"] == "tflops") & tidy["ours"].notna() & tidy["paper"].notna()]
    per_token = None
    if len(offsets):
        a, b = tflops(model, int(model.vanilla), n_text), tflops(model, int(model.vanilla), n_text + 1)
        per_token = None if a[0] is None or b[0] is None else b[0] - a[0]
    if per_token:
        diff = (offsets["paper"] - offsets["ours"]).to_numpy()
        notes.insert(1, f"Paper − ours is {diff.min():+.2f} to {diff.max():+.2f} TFLOPs over the rows: one text token "
                        f"costs {1000 * per_token:.1f} GFLOPs here, so a constant offset is what ≈"
                        f"{diff.mean() / per_token:.0f} more text tokens in the paper's example would give.")
    rendered = Rendered(header, lines, notes)
    frame = to_frame(rendered)
    return frame, to_markdown(spec, rendered), to_latex(spec, rendered), tidy


# ------------------------------------------------------------------------------------------------------------------
# Render + run
# ------------------------------------------------------------------------------------------------------------------
def render(table: str, overrides: Sequence[str] = (), out_dir: Path | None = None, plots: bool = True,
           plots_dir: Path | None = None) -> dict[str, Path]:
    spec = load_spec(table, overrides)
    out_dir = Path(out_dir or TABLES_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / spec.experiment
    paths = {"csv": stem.with_suffix(".csv"), "md": stem.with_suffix(".md"), "tex": stem.with_suffix(".tex"),
             "cells": out_dir / f"{spec.experiment}_cells.csv"}
    if spec.kind == "efficiency":
        frame, markdown, latex, tidy = render_efficiency(spec)
        cells = None
    else:
        cells = collect_cells(spec)
        rendered = build_table(spec, cells)
        frame, markdown, latex = to_frame(rendered), to_markdown(spec, rendered), to_latex(spec, rendered)
        tidy = cells.drop(columns=["options"]).assign(options=cells["options"].map(str)) if len(cells) else cells
    frame.to_csv(paths["csv"], index=False)
    paths["md"].write_text(markdown)
    paths["tex"].write_text(latex)
    tidy.to_csv(paths["cells"], index=False, float_format="%.4f")
    if plots and cells is not None and len(cells):
        paths.update(table_plots(spec, cells, Path(plots_dir or PLOTS_DIR) / spec.experiment))
    return paths


def table_plots(spec: Spec, cells: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """The table's plots (eval.report.plots): accuracy vs kept tokens, and Avg vs TFLOPs (this module's
    :func:`tflops`) where the table's baseline is the vanilla model."""
    return plotting.table_plots(spec, cells, out_dir, row_averages(spec, cells), tflops)


def sweep_commands(spec: Spec, overrides: Sequence[str] = ()) -> list[list[str]]:
    """The Hydra multiruns that fill the table (eval.running.run --multirun ...), in order."""
    if spec.kind == "efficiency":
        return []
    # run's main by import, not `-m eval.running.run`: submitit / Ray pickle the task function, which must not be
    # __main__
    base = [sys.executable, "-c", "from eval.running.run import main; main()", "--multirun",
            f"+experiment={spec.experiment}", "hydra.sweeper.params=null"]
    benchmarks = ",".join(dict.fromkeys(spec.benchmark_configs.get(b, b) for b in spec.benchmarks))
    commands = []

    def add(name: str, args: list[str]) -> None:
        sweep_dir = f"hydra.sweep.dir=multirun/reproduce/{spec.experiment}/{len(commands):02d}-{name}"
        commands.append([*base, *args, f"benchmark={benchmarks}", sweep_dir, *overrides])

    for model in spec.models:
        if model.vanilla is not None:
            add(f"{model.config}-vanilla", [f"model={model.config}", "method=none"])
        budgets = ",".join(_hydra_value(b) for b in model.budgets.values())
        plain = list(dict.fromkeys(r.method for r in spec.rows if not r.options and not r.by_budget))
        if plain:
            add(f"{model.config}-methods", [f"model={model.config}", f"method={','.join(plain)}", f"budget={budgets}"])
        for row in spec.rows:
            slug = "".join(c if c.isalnum() else "-" for c in row.label).strip("-")
            if row.by_budget and row.implemented:
                # one run per budget label: budget=null, the label's own schedule options
                for label, budget in model.budgets.items():
                    options = [f"method.options.{k}={_hydra_value(v)}" for k, v in row.options_at(label).items()]
                    add(f"{model.config}-{slug}-{label}", [f"model={model.config}", f"method={row.method}", *options,
                                                           f"budget={_hydra_value(row.budget_at(label, budget))}"])
            elif row.options or row.by_budget:
                options = [f"method.options.{k}={_hydra_value(v)}" for k, v in row.options.items()]
                if not row.implemented:
                    options = []  # the notice does not depend on options, and the placeholder has none
                add(f"{model.config}-{slug}", [f"model={model.config}", f"method={row.method}", *options,
                                               f"budget={budgets}"])
    return commands


def run(table: str, overrides: Sequence[str] = (), dry_run: bool = False, plots: bool = True) -> int:
    spec = load_spec(table, overrides)
    commands = sweep_commands(spec, overrides)
    env = dict(os.environ)
    if spec.offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    failed = []
    for i, command in enumerate(commands, 1):
        shown = " ".join(["hiprune-eval", "--multirun", *command[4:]])
        print(f"[reproduce] {spec.experiment}: sweep {i}/{len(commands)}: {shown}", flush=True)
        if dry_run:
            continue
        code = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False).returncode
        if code != 0:
            failed.append((i, code))
            print(f"[reproduce] sweep {i} exited with {code}; continuing (rerun to resume)", flush=True)
    if dry_run:
        if commands:  # what the sweep costs on a measured device (eval/efficiency/estimate.py)
            cfg = compose(spec.experiment, overrides)
            mode = "compiled" if cfg.model.get("compile") else "eager"
            print(estimate.report(estimate.estimate_runs(spec, int(cfg.batch_size), mode)), flush=True)
        return 0
    paths = render(table, overrides, plots=plots)
    for path in paths.values():
        print(f"[reproduce] wrote {repo_relative(path)}")
    if failed:
        print(f"[reproduce] {len(failed)} sweep(s) failed: {failed}; the table shows what finished", flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the table's sweep (resumable), then render it")
    p_run.add_argument("table")
    p_run.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep (limit=..., store=..., ...)")
    p_run.add_argument("--dry-run", action="store_true", help="print the sweep commands, run nothing")
    p_run.add_argument("--no-plots", action="store_true")
    p_render = sub.add_parser("render", help="render from the store; runs nothing")
    p_render.add_argument("table", nargs="?")
    p_render.add_argument("overrides", nargs="*")
    p_render.add_argument("--all", action="store_true", help="every table")
    p_render.add_argument("--out", type=Path, help=f"output folder (default {repo_relative(TABLES_DIR)})")
    p_render.add_argument("--no-plots", action="store_true")
    p_render.add_argument("--allow-empty", action="store_true",
                          help="render a table whose store holds no record of it (all cells pending: the templates)")
    p_plots = sub.add_parser("plots", help="only the table's plots, from the store; runs nothing")
    p_plots.add_argument("table")
    p_plots.add_argument("overrides", nargs="*")
    p_plots.add_argument("--out", type=Path, help=f"output folder (default {repo_relative(PLOTS_DIR)}/<experiment>)")
    sub.add_parser("list", help="tables and their experiment configs")
    args = parser.parse_args(argv)

    if args.command == "list":
        for table, experiment in list_tables().items():
            print(f"{table:>14}  configs/experiment/{experiment}.yaml")
        return
    if args.command == "plots":
        spec = load_spec(args.table, args.overrides)
        for path in table_plots(spec, collect_cells(spec), args.out or PLOTS_DIR / spec.experiment).values():
            print(f"[reproduce] wrote {repo_relative(path)}")
        return
    if args.command == "run":
        sys.exit(run(args.table, args.overrides, dry_run=args.dry_run, plots=not args.no_plots))
    if not args.all and not args.table:
        parser.error("render needs a TABLE or --all")
    overrides = list(args.overrides)
    if args.all and args.table:  # `render --all store=...`: the first override landed in the table slot
        overrides.insert(0, args.table)
    tables = list(dict.fromkeys(list_tables().values())) if args.all else [args.table]
    refused, rendered, missing_store = [], 0, False
    for table in tables:
        spec = load_spec(table, overrides)
        problem = None if args.allow_empty else empty_store_problem(spec)
        if problem:
            print(f"[reproduce] table {table}: {problem}; not rendered, the existing table is kept (--allow-empty "
                  f"renders it with pending cells)", file=sys.stderr, flush=True)
            refused.append(table)
            missing_store |= spec.kind != "efficiency" and not Path(spec.store).is_dir()
            continue
        paths = render(table, overrides, out_dir=args.out, plots=not args.no_plots)
        rendered += 1
        print(f"[reproduce] table {table}: " + ", ".join(repo_relative(p) for p in paths.values()))
    # one table: no record of it is an error; --all: tables without records are kept, an error only when the store is
    # missing or nothing at all rendered (a mistyped store=)
    if refused and (not args.all or missing_store or not rendered):
        sys.exit(1)


def empty_store_problem(spec: Spec) -> str | None:
    """Why rendering ``spec`` from its store would show no result of ours (a store that does not exist, or holds no
    record of the experiment: a mistyped store=), or None. Efficiency tables read results/efficiency, not the store."""
    if spec.kind == "efficiency":
        return None
    if not Path(spec.store).is_dir():
        return f"store {repo_relative(spec.store)} does not exist"
    if not (collect_cells(spec)["status"] == "ok").any():
        return f"store {repo_relative(spec.store)} holds no record of experiment {spec.experiment}"
    return None


if __name__ == "__main__":
    main()
