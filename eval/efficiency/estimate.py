"""What a paper table costs: estimated device-hours of every run of its sweep, from the tasks' sample counts
(results/reference/task_sizes.csv, with sources), their answer lengths (eval.efficiency.throughput.ANSWER_TOKENS)
and a measured samples/s file of ``python -m eval.efficiency.throughput --model ...``
(results/efficiency/eval_throughput_<model>-<device>-<dtype>.json).

Per run (model, method, budget, benchmark): seconds per sample = a + b x generated tokens, fitted per (mode, method,
budget, batch size) over the measured answer lengths (least squares; one length measured: b = 0 and a the measured
time); method and budget as measured, else the nearest measured stand-in, which the report names: vision-side
methods -> hiprune at the nearest budget, LLM-side methods and vanilla -> none (the full prefill). The batch size is
the sweep's, else the nearest measured one. The measurement file is the run model's on a GPU, else any GPU
measurement (of another architecture: said so; the largest measured model first), else a CPU measurement, labelled as such: it is then an estimate of
CPU-hours of a smaller model, not of the GPU-hours.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from eval.config import CONFIG_DIR, REPO_ROOT, repo_relative
from eval.efficiency.throughput import ANSWER_TOKENS
from eval.running.methods import is_implemented, stage_of

TASK_SIZES = REPO_ROOT / "results" / "reference" / "task_sizes.csv"
MEASUREMENTS = REPO_ROOT / "results" / "efficiency"


def task_sizes(path: Path = TASK_SIZES) -> dict[str, int]:
    with open(path, newline="") as f:
        return {row["task"]: int(row["samples"]) for row in csv.DictReader(f)}


def benchmark_tasks(benchmark: str) -> list[str]:
    return list(OmegaConf.load(CONFIG_DIR / "benchmark" / f"{benchmark}.yaml").tasks)


@dataclass
class Measurement:
    path: Path
    data: dict[str, Any]
    label: str  # what the estimate is of (device, model), shown with every report

    @property
    def on_gpu(self) -> bool:
        return str(self.data["model"]["device"]).startswith("cuda")


def find_measurement(model: str, directory: Path = MEASUREMENTS) -> Measurement | None:
    """The measured samples/s file to estimate ``model``'s runs from (module docstring for the order)."""
    files = sorted(directory.glob("eval_throughput_*.json"))
    loaded = [(p, json.loads(p.read_text())) for p in files]
    loaded = [(p, d) for p, d in loaded if d.get("cells")]
    gpu = [(p, d) for p, d in loaded if str(d["model"]["device"]).startswith("cuda")]
    cpu = [(p, d) for p, d in loaded if not str(d["model"]["device"]).startswith("cuda")]
    for pool, kind in ((gpu, "GPU"), (cpu, "CPU")):
        # the largest measured model first (closest to the real ones), then the fullest measurement
        pool = sorted(pool, key=lambda item: (-(item[1]["model"].get("parameters") or 0), -len(item[1]["cells"])))
        same = [(p, d) for p, d in pool if d["model"].get("model") == model]
        chosen = (same or pool or [None])[0]
        if chosen is None:
            continue
        p, d = chosen
        what = f"{kind} {d.get('device_name')} ({d['model']['device']}, {d['model']['dtype']}), " \
               f"measured on {d['model'].get('model')}"
        if d["model"].get("model") != model:
            what += f", not {model}: another architecture"
        if kind == "CPU":
            what += "; NO GPU MEASUREMENT: these are CPU-hours of the measured model, not GPU-hours"
        return Measurement(p, d, what)
    return None


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares seconds = a + b * tokens; one distinct length: (mean, 0)."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return sum(y for _, y in points) / len(points), 0.0
    n = len(points)
    mx, my = sum(xs) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def seconds_per_sample(measurement: Measurement, method: str, budget: Any, batch_size: int, new_tokens: int,
                       mode: str = "eager") -> tuple[float, str]:
    """(seconds per sample, what stood in) for one run, from the measurement's cells."""
    cells = [c for c in measurement.data["cells"] if c["mode"] == mode]
    if not cells:
        raise ValueError(f"{repo_relative(str(measurement.path))} has no {mode!r} cells")
    stand_in = "none" if method == "none" or not is_implemented(method) or stage_of(method) == "llm" else "hiprune"
    wanted = method if any(c["method"] == method for c in cells) else stand_in
    cells = [c for c in cells if c["method"] == wanted] or [c for c in cells if c["method"] == "none"] or cells
    wanted = cells[0]["method"]
    budgets = sorted({c["budget"] for c in cells if c["budget"] is not None})
    used_budget = None
    if wanted != "none" and budgets:
        target = budget if isinstance(budget, int) else budgets[0]
        used_budget = min(budgets, key=lambda b: (abs(b - target), b))
        cells = [c for c in cells if c["budget"] == used_budget]
    sizes = sorted({c["batch_size"] for c in cells})
    used_batch = min(sizes, key=lambda b: (abs(b - batch_size), b))
    cells = [c for c in cells if c["batch_size"] == used_batch]
    a, b = _fit([(c["new_tokens"], 1.0 / c["samples_per_s_generate"]) for c in cells])
    used = f"{wanted}{'' if used_budget is None else ' ' + str(used_budget)} bs={used_batch}"
    return max(a + b * new_tokens, 0.0), used


def estimate_runs(spec, batch_size: int, mode: str = "eager", measurement: Measurement | None = None,
                  sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Every run of the table's sweep with its samples, answer tokens, the stand-in measured, and hours."""
    sizes = sizes if sizes is not None else task_sizes()
    runs, missing = [], []
    for model in spec.models:
        m = measurement or find_measurement(model.config)
        if m is None:
            return {"measurement": None, "runs": [], "total_hours": None,
                    "note": "no measured samples/s file (run python -m eval.efficiency.throughput --model ...)"}
        combos = [("none", None)] if model.vanilla is not None else []
        combos += [(row.method, budget) for row in spec.rows for budget in model.budgets.values()]
        for benchmark in spec.benchmarks:
            config = spec.benchmark_configs.get(benchmark, benchmark)
            tasks = benchmark_tasks(config)
            unknown = [t for t in tasks if t not in sizes]
            if unknown or config not in ANSWER_TOKENS:
                missing.append(f"{benchmark} ({config}: {unknown or 'no answer length'})")
                continue
            samples = sum(sizes[t] for t in tasks)
            if spec.limit:
                samples = min(samples, int(spec.limit) * len(tasks))
            for method, budget in combos:
                seconds, used = seconds_per_sample(m, method, budget, batch_size, ANSWER_TOKENS[config], mode)
                runs.append({"model": model.config, "method": method, "budget": budget, "benchmark": benchmark,
                             "samples": samples, "answer_tokens": ANSWER_TOKENS[config], "measured_as": used,
                             "hours": samples * seconds / 3600})
    return {"measurement": m.label, "measurement_file": repo_relative(str(m.path)), "mode": mode,
            "batch_size": batch_size, "runs": runs, "total_hours": sum(r["hours"] for r in runs),
            "missing": missing}


def report(estimate: dict[str, Any]) -> str:
    if estimate["measurement"] is None:
        return f"[estimate] {estimate['note']}"
    lines = [(f"[estimate] measurement: {estimate['measurement']} ({estimate['measurement_file']}); mode "
              f"{estimate['mode']}, batch size {estimate['batch_size']}; samples from "
              f"{repo_relative(str(TASK_SIZES))}; answer tokens (EOS included) from ANSWER_TOKENS")]
    for r in estimate["runs"]:
        budget = "" if r["budget"] is None else f" {r['budget']}"
        lines.append(f"[estimate]   {r['model']} {r['method']}{budget} {r['benchmark']}: {r['samples']} samples x "
                     f"{r['answer_tokens']} tokens, as {r['measured_as']}: {r['hours']:.2f} h")
    for m in estimate["missing"]:
        lines.append(f"[estimate]   not estimated: {m}")
    lines.append(f"[estimate] total: {estimate['total_hours']:.1f} device-hours over {len(estimate['runs'])} runs")
    return "\n".join(lines)
