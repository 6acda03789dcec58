"""The paper's numbers (HiPrune, arXiv 2508.00553 v3) and its relative score ("Avg").

Reference files (results/reference/, facts copied from the paper; see results/reference/README.md):
  paper_accuracy.csv     every accuracy cell of Tables 2, 4, 7, 8, 9 (9 = the full LLaVA-NeXT-7B table; Table 3 is
                         a subset of its rows), 10: table, model, method, budget, benchmark, value
  paper_efficiency.csv   Table 5 (FLOPs, prefill, decode, throughput, VRAM on LLaVA-1.5-7B)
  paper_ablation.csv     Tables 6 (a/b/c) and 11 (LLaVA-1.5-7B, 192 tokens), same columns as paper_accuracy.csv
  paper_printed_avg.csv  the Avg column as printed (Tables 2, 3/9, 4, 10, 6, 11), to check the computation

Avg (the paper's relative score): mean over the benchmarks present in a row of method / baseline x 100, with MME
as its raw score (not rescaled), missing cells skipped, no cap at 100%. The baseline is the vanilla model (main
tables) or the default setting (ablation Tables 6 and 11, whose default row reads 100.0%). HiPrune's VizWiz cells
come from lmms-eval's val split while vanilla and most baselines were measured under another protocol, so the
harness reports Avg both with and without VizWiz.

    python -m eval.report.paper     # recompute every printed Avg, list the rows where the paper disagrees
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from eval.config import REPO_ROOT

REFERENCE_DIR = REPO_ROOT / "results" / "reference"

# Column order of the paper's tables.
BENCHMARKS = ["GQA", "MMB", "MMB-CN", "MME", "POPE", "SQA-IMG", "VQAv2", "TextVQA", "VizWiz"]
EXCLUDED_FOR_NO_VIZWIZ = ("VizWiz",)

# Paper benchmark -> harness benchmark config (configs/benchmark/<name>.yaml).
BENCHMARK_CONFIGS = {
    "GQA": "gqa",
    "MMB": "mmbench",
    "MMB-CN": "mmbench_cn",
    "MME": "mme",
    "POPE": "pope",
    "SQA-IMG": "sqa_img",
    "VQAv2": "vqav2",
    "TextVQA": "textvqa",
    "VizWiz": "vizwiz",
}


def _percent(metric: str):
    def get(metrics: Mapping[str, float]) -> float | None:
        value = metrics.get(metric)
        return None if value is None else 100.0 * float(value)

    get.__doc__ = f"{metric} x 100"
    return get


def _as_is(metric: str):
    def get(metrics: Mapping[str, float]) -> float | None:
        value = metrics.get(metric)
        return None if value is None else float(value)

    get.__doc__ = f"{metric} (already a percentage)"
    return get


def _mme_total(metrics: Mapping[str, float]) -> float | None:
    """perception + cognition: the MME total the LLaVA-1.5 line of papers reports (1862 for LLaVA-1.5-7B)."""
    parts = [metrics.get("mme_perception_score"), metrics.get("mme_cognition_score")]
    return None if any(p is None for p in parts) else float(sum(parts))


# lmms-eval task -> how its metrics become the number the paper prints (paper's scale).
# POPE: the F1 score, which is what LLaVA-1.5 and the pruning papers print (85.9 for LLaVA-1.5-7B); lmms-eval's
# `pope` task pools the three splits into one F1, LLaVA's script averages the per-split F1s (they differ slightly).
TASK_METRICS = {
    "gqa": _percent("exact_match"),
    "mmbench_en_dev_static": _as_is("gpt_eval_score"),
    "mmbench_en_dev": _as_is("gpt_eval_score"),
    "mmbench_cn_dev": _as_is("gpt_eval_score"),
    "mme": _mme_total,
    "pope": _percent("pope_f1_score"),
    "hiprune_smoke_pope": _percent("pope_f1_score"),
    "hiprune_scene_pope": _percent("pope_f1_score"),
    "hiprune_scene_qa": _percent("exact_match"),
    "scienceqa_img": _percent("exact_match"),
    "vqav2_val": _percent("exact_match"),
    "textvqa_val": _percent("exact_match"),
    "hiprune_textvqa_val": _percent("exact_match"),
    "vizwiz_vqa_val": _percent("exact_match"),
}


def paper_value(task: str, metrics: Mapping[str, float]) -> float | None:
    """The number a harness record's task metrics stand for in the paper's table (None if unknown/missing)."""
    get = TASK_METRICS.get(task)
    return None if get is None else get(metrics)


# ------------------------------------------------------------------------------------------------------------------
# Reference data
# ------------------------------------------------------------------------------------------------------------------
def _read(name: str, root: Path | None = None) -> pd.DataFrame:
    path = Path(root or REFERENCE_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(f"reference file {path} is missing (it ships with the repo under results/reference/)")
    return pd.read_csv(path, dtype={"table": str, "budget": str})


def load_accuracy(root: Path | None = None, include_ablation: bool = True) -> pd.DataFrame:
    """All accuracy cells: table (str), model, method, budget (str label as printed), benchmark, value."""
    frame = _read("paper_accuracy.csv", root)
    if include_ablation:
        frame = pd.concat([frame, _read("paper_ablation.csv", root)], ignore_index=True)
    return frame


def load_printed_avg(root: Path | None = None) -> pd.DataFrame:
    return _read("paper_printed_avg.csv", root)


def load_efficiency(root: Path | None = None) -> pd.DataFrame:
    return _read("paper_efficiency.csv", root)


def row_values(frame: pd.DataFrame, table: str | int, model: str, method: str, budget: str | None = None) -> dict[str, float]:
    """benchmark -> value of one row of a paper table (empty if the row is not in the paper)."""
    sel = (frame["table"] == str(table)) & (frame["model"] == model) & (frame["method"] == method)
    if budget is not None:
        sel &= frame["budget"] == str(budget)
    rows = frame[sel]
    if rows["benchmark"].duplicated().any():
        raise ValueError(f"table {table} {model} {method} {budget}: several values per benchmark")
    return dict(zip(rows["benchmark"], rows["value"].astype(float)))


# ------------------------------------------------------------------------------------------------------------------
# Avg
# ------------------------------------------------------------------------------------------------------------------
def _number(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def relative_avg(
    row: Mapping[str, float | None],
    baseline: Mapping[str, float | None],
    exclude: Iterable[str] = (),
    benchmarks: Iterable[str] | None = None,
) -> float:
    """The paper's Avg: mean over benchmarks present in both ``row`` and ``baseline`` of row / baseline x 100.

    Raw MME included as is (a ratio, so its scale cancels), missing or NaN cells skipped, no cap at 100%,
    ``exclude`` drops benchmarks (e.g. VizWiz), ``benchmarks`` restricts to a column set. NaN if nothing is left.
    """
    excluded = set(exclude)
    names = list(benchmarks) if benchmarks is not None else list(row)
    ratios = []
    for name in names:
        if name in excluded:
            continue
        value, base = _number(row.get(name)), _number(baseline.get(name))
        if value is None or base is None:
            continue
        if base == 0:
            raise ValueError(f"baseline value of {name} is 0: the relative score is undefined")
        ratios.append(value / base * 100.0)
    return sum(ratios) / len(ratios) if ratios else math.nan


# Which row is 100% in each printed table: the vanilla model, or the default setting of an ablation.
AVG_BASELINES = {"6a": "Global*", "6b": "Full*", "6c": "Cross(4)*", "11": "Cross(4)*"}


def recompute_printed(root: Path | None = None, tables: Iterable[str | int] | None = None) -> pd.DataFrame:
    """Every printed Avg next to the value recomputed from the paper's own cells (with and without VizWiz).

    Columns: table, model, method, budget, printed, recomputed, diff (recomputed - printed), recomputed_no_vizwiz.
    """
    cells = load_accuracy(root)
    printed = load_printed_avg(root)
    if tables is not None:
        wanted = {str(t) for t in tables}
        printed = printed[printed["table"].isin(wanted)]
    out = []
    for _, p in printed.iterrows():
        base_method = AVG_BASELINES.get(p["table"], "vanilla")
        base = row_values(cells, p["table"], p["model"], base_method)
        row = row_values(cells, p["table"], p["model"], p["method"], p["budget"])
        if not row:
            raise ValueError(f"printed Avg for {p.to_dict()} has no cells in the reference data")
        value = relative_avg(row, base)
        out.append(
            {
                "table": p["table"],
                "model": p["model"],
                "method": p["method"],
                "budget": p["budget"],
                "printed": float(p["avg"]),
                "recomputed": value,
                "diff": value - float(p["avg"]),
                "recomputed_no_vizwiz": relative_avg(row, base, exclude=EXCLUDED_FOR_NO_VIZWIZ),
            }
        )
    return pd.DataFrame(out)


def misprints(check: pd.DataFrame, tolerance: float = 0.1) -> pd.DataFrame:
    """Rows of :func:`recompute_printed` whose printed Avg is further than ``tolerance`` from the recomputed one.

    The printed values have one decimal, so a correct row is within 0.05 (+ float noise) of its recomputation.
    """
    return check[check["diff"].abs() > tolerance].reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="*", help="paper tables to check (default: all with a printed Avg)")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--out", type=Path, help="also write the check as CSV here")
    args = parser.parse_args(argv)
    check = recompute_printed(tables=args.tables)
    print(check.to_markdown(index=False, floatfmt=".2f"))
    bad = misprints(check, args.tolerance)
    print(f"\n{len(check) - len(bad)} of {len(check)} printed Avg values reproduce within {args.tolerance}.")
    if len(bad):
        print("Rows where the printed Avg disagrees with the paper's own cells (misprints):")
        print(bad.to_markdown(index=False, floatfmt=".2f"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        check.to_csv(args.out, index=False, float_format="%.4f")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
