"""Plots of a reproduced table (matplotlib, PNG + PDF), from the cells and row averages eval.report.reproduce
collects; drawn by ``python -m eval.report.reproduce render`` (and ``... plots``) into results/plots/<experiment>/.

1. accuracy vs kept visual tokens: one panel per benchmark, one line per method; ours solid (filled markers),
   the paper's dashed (hollow markers); the vanilla model as horizontal lines.
2. normalised Avg vs TFLOPs (Pareto): every (method, budget) as a point, the Pareto front (highest Avg for the
   fewest TFLOPs) of ours and of the paper's. TFLOPs per point come from the caller's ``tflops`` (reproduce: flops_exact
   of eval/efficiency/flops.py on the model's architecture config, calflops convention: linear layers, attention
   scores excluded, ``n_text`` text tokens); where that cannot be computed, from the paper's Table 5
   (paper_efficiency.csv: LLaVA-1.5-7B only); the plot names its source. Methods that prune inside the LLM (stage
   "llm" in hiprune.METHODS, e.g. FastV) keep all tokens in their first layers, so their x value is a nominal one (the
   budget's count in every layer): drawn with an x marker and said in the legend.

The paper's points are drawn only on the axes of the paper's own model: an offline table (``offline: true``, e.g. the
tiny random LLaVA standing in for LLaVA-1.5-7B) shows the paper's numbers in its table, not at its stand-in's FLOPs
or accuracy. Long titles wrap.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from eval.report import paper as P
from eval.running.methods import stage_of

# (table model, visual tokens, text tokens) -> (TFLOPs of one forward or None, where the number comes from)
TflopsOf = Callable[[Any, int, int], tuple[float | None, str]]

COLOURS = plt.get_cmap("tab10").colors


def wrap(title: str, width: int) -> str:
    """A title broken into lines of at most ``width`` characters (existing line breaks kept)."""
    return "\n".join(textwrap.fill(line, width) for line in str(title).split("\n"))


def paper_sides(spec) -> tuple[str, ...]:
    """The sides drawn: ours, and the paper's only where the table runs the paper's model (not an offline
    stand-in)."""
    return ("ours",) if getattr(spec, "offline", False) else ("ours", "paper")


def _colour(spec, row: str):
    """One colour per table row, the same in every panel and plot of the table."""
    labels = [r.label for r in spec.rows]
    colours = COLOURS if len(labels) <= len(COLOURS) else plt.get_cmap("tab20").colors  # distinct up to 20 rows
    return colours[labels.index(row) % len(colours)] if row in labels else "grey"


def save_figure(fig, out: Path) -> list[Path]:
    """``out``.png (150 dpi) and ``out``.pdf, tight; closes the figure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out.with_suffix(f".{ext}")
        fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _x_of(budget_label: str, budget: Any, vanilla: str | None) -> tuple[float, str]:
    """Position on the token axis and its unit: tokens per image, or % of the tokens for ratio budgets."""
    label = str(budget_label)
    if label.endswith("%"):
        return float(label.rstrip("%")), "% of visual tokens kept"
    if isinstance(budget, float) and budget <= 1:
        return 100 * budget, "% of visual tokens kept"
    return float(label), "visual tokens kept per image"


def accuracy_vs_tokens(spec, cells: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    out = {}
    for model in spec.models:
        mc = cells[cells["model"] == model.config]
        if mc.empty:
            continue
        benches = [b for b in spec.benchmarks if b in set(mc["benchmark"])]
        n = len(benches)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        unit = "visual tokens kept per image"
        for ax, bench in zip(axes.flat, benches):
            bc = mc[mc["benchmark"] == bench]
            vanilla = bc[bc["vanilla"]]
            for side, style in (("ours", "-"), ("paper", ":")):
                if side not in paper_sides(spec):
                    continue
                if len(vanilla) and pd.notna(vanilla.iloc[0][side]):
                    ax.axhline(vanilla.iloc[0][side], color="black", ls=style, lw=1,
                               label=f"vanilla ({side})")
            for row, rc in bc[~bc["vanilla"]].groupby("row", sort=False):
                colour = _colour(spec, row)
                pts = [(_x_of(r.budget_label, r.budget, model.vanilla), r.ours, r.paper) for r in rc.itertuples()]
                unit = pts[0][0][1] if pts else unit
                pts.sort(key=lambda p: p[0][0])
                ours = [(x, o) for (x, _), o, _ in pts if o is not None and pd.notna(o)]
                paper = [(x, p) for (x, _), _, p in pts if p is not None and pd.notna(p) and "paper" in paper_sides(spec)]
                if ours:
                    ax.plot(*zip(*ours), ls="-", marker="o", color=colour, label=f"{row} (ours)")
                if paper:
                    ax.plot(*zip(*paper), ls="--", marker="o", mfc="none", color=colour, label=f"{row} (paper)")
            ax.set_title(wrap(bench, 40))
            ax.set_xlabel(unit)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        handles, labels = [], []
        for ax in axes.flat:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels) or 1),
                   fontsize=8, frameon=False)
        fig.suptitle(wrap(f"{spec.title}: accuracy vs kept tokens ({model.paper}; harness model {model.config})",
                          max(40, 45 * cols)))
        fig.tight_layout()
        out.update({p.name: p for p in save_figure(fig, out_dir / f"accuracy_vs_tokens_{model.config}")})
    return out


def _tflops_lookup(spec, model, tflops: TflopsOf) -> tuple[Any, str]:
    """(function n_visual -> TFLOPs or None, source description)."""
    n_text = int(spec.efficiency.get("n_text", 24)) if spec.efficiency else 24
    probe, source = tflops(model, 1, n_text)
    if probe is not None:
        cache: dict[int, float | None] = {}

        def computed(n_visual: int) -> float | None:
            if n_visual not in cache:
                cache[n_visual] = tflops(model, n_visual, n_text)[0]
            return cache[n_visual]

        return computed, f"TFLOPs: {source}, {n_text} text tokens"
    reference = P.load_efficiency()
    ref = reference[reference["model"] == model.paper]
    if ref.empty:
        return None, f"no TFLOPs for {model.paper}: {source}; the paper's Table 5 covers LLaVA-1.5-7B only"
    table = {int(b): float(t) for b, t in zip(ref["budget"], ref["tflops"])}
    return (lambda n_visual: table.get(int(n_visual))), "TFLOPs: the paper's Table 5 (paper_efficiency.csv)"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto(spec, averages: pd.DataFrame, out_dir: Path, tflops: TflopsOf) -> dict[str, Path]:
    """Avg (``averages``: reproduce's row averages) against TFLOPs per (method, budget), with both Pareto fronts."""
    out = {}
    for model in spec.models:
        lookup, source = _tflops_lookup(spec, model, tflops)
        if lookup is None or not (model.vanilla or "").isdigit():
            print(f"[plots] no Pareto plot for {model.config}: {source if lookup is None else 'ratio budgets'}")
            continue
        av = averages[averages["model"] == model.config]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        fronts: dict[str, list[tuple[float, float]]] = {"ours": [], "paper": []}
        methods = {r.label: r.method for r in spec.rows}
        plotted_labels = set()
        for row, rc in av.groupby("row", sort=False):
            colour = "black" if row == "Vanilla" else _colour(spec, row)
            nominal = stage_of(methods.get(row, "none")) == "llm"
            for r in rc.itertuples():
                n_visual = int(model.vanilla) if row == "Vanilla" else int(r.budget_label)
                x = lookup(n_visual)
                if x is None:
                    continue
                for side, filled in (("ours", True), ("paper", False)):
                    if side not in paper_sides(spec):
                        continue
                    y = getattr(r, f"avg_{side}")
                    if pd.isna(y):
                        continue
                    label = f"{row} ({side}{', nominal TFLOPs' if nominal else ''})"
                    ax.scatter([x], [y], color=colour, marker="x" if nominal else "o",
                               facecolors=colour if (filled or nominal) else "none",
                               label=None if label in plotted_labels else label, zorder=3)
                    plotted_labels.add(label)
                    if not nominal:
                        fronts[side].append((x, y))
        for side, style in (("ours", "-"), ("paper", "--")):
            front = pareto_front(fronts[side])
            if len(front) > 1:
                ax.plot(*zip(*front), ls=style, color="grey", lw=1, label=f"Pareto front ({side})", zorder=2)
        ax.set_xlabel("TFLOPs per sample (one forward)")
        ax.set_ylabel(f"Avg, % of {'vanilla' if spec.avg_baseline == 'vanilla' else spec.avg_baseline}")
        ax.set_title(wrap(f"{spec.title}\n{model.paper}: normalised Avg vs TFLOPs", 70), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.text(0.01, -0.02, source, fontsize=7, ha="left", va="top")
        fig.tight_layout()
        out.update({p.name: p for p in save_figure(fig, out_dir / f"pareto_avg_vs_tflops_{model.config}")})
    return out


def table_plots(spec, cells: pd.DataFrame, out_dir: Path, averages: pd.DataFrame, tflops: TflopsOf) -> dict[str, Path]:
    """Every plot of a table: accuracy vs tokens, and where the baseline is the vanilla model, Avg vs TFLOPs."""
    out = accuracy_vs_tokens(spec, cells, out_dir)
    if spec.avg_baseline == "vanilla":
        out.update(pareto(spec, averages, out_dir, tflops))
    return out
