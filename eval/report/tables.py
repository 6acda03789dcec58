"""Tables from the result store (pandas): one row per record and task, metrics as columns.

    python -m eval.report.tables results/smoke/runs results/smoke/table   # writes table.csv and table.md

table.csv is the long table (one row per record and task, every metric, four decimals: what scripts compare).
table.md is the same numbers shaped like the paper's tables: one table per model, methods grouped by budget (the
full model first), one column per benchmark metric (× 100 with one decimal where the metric is a fraction), blank
where a metric does not apply to the row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from eval.config import repo_relative
from eval.running.store import iter_records

# Columns shown first when present; other metrics follow in name order.
LEADING = ["model", "benchmark", "task", "method", "budget", "kept_tokens_per_image", "n_samples"]
METHOD_ORDER = {"none": 0, "random": 1, "hiprune": 2}


def load_store(root: Path) -> pd.DataFrame:
    rows = []
    for path, record in iter_records(root):
        identity = record["identity"]
        tokens = record.get("visual_tokens", {})
        for task, metrics in record["metrics"].items():
            rows.append(
                {
                    "model": identity["model"],
                    "benchmark": identity["benchmark"],
                    "task": task,
                    "method": identity["method"]["name"],
                    "budget": identity.get("budget"),
                    "kept_tokens_per_image": tokens.get("mean_kept_per_image"),
                    "n_samples": record.get("n_samples", {}).get(task),
                    **metrics,
                    "record": str(path),
                }
            )
    if not rows:
        raise FileNotFoundError(f"no result records under {root}")
    frame = pd.DataFrame(rows)
    frame["_order"] = frame["method"].map(METHOD_ORDER).fillna(len(METHOD_ORDER))
    frame["_budget"] = pd.to_numeric(frame["budget"], errors="coerce").fillna(float("inf"))
    frame = frame.sort_values(["model", "benchmark", "task", "_order", "method", "_budget"], ascending=[True] * 5 + [False])
    return frame.drop(columns=["_order", "_budget"]).reset_index(drop=True)


def run_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Leading identity columns, then metrics (standard errors left to the records); the record path is dropped."""
    metrics = sorted(c for c in frame.columns if c not in LEADING and c != "record" and "_stderr" not in c)
    table = frame[[c for c in LEADING if c in frame.columns] + metrics].copy()
    table["budget"] = table["budget"].map(_budget_label)
    return table


def _budget_label(budget) -> str:
    if budget is None or pd.isna(budget):
        return "full"
    return str(int(budget)) if float(budget).is_integer() and budget >= 1 else f"{budget:g}"


def _number(value: float, percent: bool) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{100 * value:.1f}" if percent else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _tokens(values) -> str:
    values = sorted({float(v) for v in values if v is not None and not pd.isna(v)})
    if not values:
        return ""
    shown = [f"{v:.0f}" if v.is_integer() else f"{v:.1f}" for v in values]
    return shown[0] if len(shown) == 1 else f"{shown[0]}–{shown[-1]}"


def paper_markdown(table: pd.DataFrame, title: str = "Results") -> str:
    """``table`` (:func:`run_table`) shaped like the paper's tables: per model, rows = methods grouped by budget,
    columns = benchmark metrics, blank cells where a metric does not apply."""
    out = [f"# {title}", ""]
    metrics = [c for c in table.columns if c not in LEADING]
    for model, frame in table.groupby("model", sort=False):
        columns = []  # (benchmark, task, metric, percent)
        tasks = list(dict.fromkeys(zip(frame["benchmark"], frame["task"])))
        per_benchmark = {b: sum(1 for bb, _ in tasks if bb == b) for b, _ in tasks}
        for benchmark, task in tasks:
            part = frame[(frame["benchmark"] == benchmark) & (frame["task"] == task)]
            for metric in metrics:
                values = part[metric].dropna()
                if values.empty:
                    continue
                percent = bool(((values >= 0) & (values <= 1)).all())
                columns.append((benchmark, task, metric, percent))
        header = ["Method", "Tokens"] + [
            f"{benchmark if per_benchmark[benchmark] == 1 else task} · {metric}{' (%)' if percent else ''}"
            for benchmark, task, metric, percent in columns]
        if table["model"].nunique() > 1:
            out += [f"## {model}", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
        budgets = list(dict.fromkeys(frame["budget"]))
        budgets.sort(key=lambda b: (b != "full", -float(b) if b != "full" else 0.0))
        for budget in budgets:
            group = frame[frame["budget"] == budget]
            label = "Full model" if budget == "full" else f"Budget {budget}"
            out.append(f"| **{label}** |" + " |" * (len(header) - 1))
            for method in dict.fromkeys(group["method"]):
                rows = group[group["method"] == method]
                cells = [method, _tokens(rows["kept_tokens_per_image"])]
                for benchmark, task, metric, percent in columns:
                    hit = rows[(rows["benchmark"] == benchmark) & (rows["task"] == task)][metric].dropna()
                    cells.append(_number(float(hit.iloc[0]), percent) if len(hit) else "")
                out.append("| " + " | ".join(cells) + " |")
        samples = frame.groupby("task", sort=False)["n_samples"].agg(lambda v: sorted({int(x) for x in v.dropna()}))
        out += ["", "- Tokens: visual tokens the LLM received per image (mean over the samples). Samples per task: "
                + ", ".join(f"{task} {'/'.join(map(str, n))}" for task, n in samples.items()) + ".", ""]
    return "\n".join(out)


def write_table(table: pd.DataFrame, stem: Path, title: str | None = None) -> tuple[Path, Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    table.to_csv(csv, index=False, float_format="%.4f")
    md.write_text(paper_markdown(table, title or f"Results: {stem.parent.name}/{stem.name}"))
    return csv, md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, help="result store folder")
    parser.add_argument("out", type=Path, help="output path without suffix (writes .csv and .md)")
    parser.add_argument("--title", help="title of table.md (default: the store's path)")
    args = parser.parse_args(argv)
    table = run_table(load_store(args.store))
    paths = write_table(table, args.out, args.title or f"Results of {repo_relative(args.store)}")
    for path in paths:
        print(f"wrote {path}")
    print(paths[1].read_text())


if __name__ == "__main__":
    main()
