"""Tables from the result store (pandas): one row per record and task, metrics as columns.

    python -m eval.report.tables results/smoke/runs results/smoke/table   # writes table.csv and table.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

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


def write_table(table: pd.DataFrame, stem: Path) -> tuple[Path, Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    table.to_csv(csv, index=False, float_format="%.4f")
    md.write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    return csv, md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, help="result store folder")
    parser.add_argument("out", type=Path, help="output path without suffix (writes .csv and .md)")
    args = parser.parse_args(argv)
    table = run_table(load_store(args.store))
    for path in write_table(table, args.out):
        print(f"wrote {path}")
    print(table.to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main()
