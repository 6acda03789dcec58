"""Evaluation throughput: samples/s of one lmms-eval run at batch size 1 vs 8 on the same model instance, with
identical answers (issue 8, deliverable 6).

    python -m eval.efficiency.throughput                         # tiny LLaVA, HiPrune 64, local smoke POPE task
    python -m eval.efficiency.throughput --method none --batch-sizes 1 4 8 --limit 24
    python -m eval.efficiency.throughput --pretrained llava-hf/llava-1.5-7b-hf --tasks pope --include-path "" \\
        --limit 500 --device cuda --dtype float16      # a real model (weights and dataset from the hub cache)

One ``eval.lmms.llava.HiPruneLlava`` is loaded once; each batch size runs ``lmms_eval.evaluator.simple_evaluate``
(``log_samples=True``; its final ``lm.clean()``, which deletes the model's modules, is skipped so the instance
can be reused) over the same documents, after one untimed warm-up run (dataset loading, first-call
overheads). Reported per batch size: wall time of the evaluate call and of the model's ``generate_until`` alone,
samples/s for both, the speed-up over the first batch size, and whether every answer (lmms-eval's filtered
response per document) and every kept-token selection (hash of the kept indices per document) equals the first
batch size's. Any difference is listed and makes the command exit non-zero.

Writes ``<out>.json`` and ``<out>.md`` (default results/efficiency/eval_throughput).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eval.config import REPO_ROOT, repo_relative
from eval.efficiency.measure import load_average

DEFAULT_OUT = REPO_ROOT / "results" / "efficiency" / "eval_throughput"


def _answers(results: dict) -> dict[str, Any]:
    """'task/doc_id' -> lmms-eval's filtered response for that document."""
    out = {}
    for task, samples in (results.get("samples") or {}).items():
        for sample in samples:
            out[f"{task}/{sample['doc_id']}"] = sample["filtered_resps"]
    return out


def evaluate_once(model, tasks: list[str], manager, limit: int | None, batch_size: int, seed: int = 0) -> dict:
    """One simple_evaluate at ``batch_size`` on ``model``; times the whole call and generate_until alone."""
    # deferred on purpose: lmms-eval and transformers read HF_HUB_OFFLINE when imported, after main()'s defaults
    from lmms_eval.evaluator import simple_evaluate

    from eval.lmms.base import DOC_LOGS

    model.batch_size_per_gpu = int(batch_size)
    for name in DOC_LOGS:  # every per-doc log starts empty, so each batch size is compared on its own answers
        getattr(model, name).clear()
    spent = {"generate_s": 0.0}
    original = model.generate_until

    def timed(requests):
        t0 = time.perf_counter()
        try:
            return original(requests)
        finally:
            spent["generate_s"] += time.perf_counter() - t0

    model.generate_until = timed
    # lmms-eval's evaluate() ends with lm.clean(), which deletes the model's nn.Module attributes; the same instance
    # must serve every batch size, so that release is skipped here (close() at the end uninstalls the method).
    model.clean = lambda: None
    try:
        t0 = time.perf_counter()
        results = simple_evaluate(
            model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=True, bootstrap_iters=0,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
        wall = time.perf_counter() - t0
    finally:
        del model.generate_until, model.clean  # back to the class methods
    if results is None:
        raise RuntimeError("lmms-eval returned no results")
    answers = _answers(results)
    digests = {f"{t}/{doc}": d for (t, _), docs in model.kept_digests.items() for doc, d in docs.items()}
    n = len(answers)
    metrics = {task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float))}
               for task, values in results.get("results", {}).items()}
    return {
        "batch_size": int(batch_size),
        "samples": n,
        "wall_s": wall,
        "generate_s": spent["generate_s"],
        "samples_per_s": n / wall if wall else float("nan"),
        "samples_per_s_generate": n / spent["generate_s"] if spent["generate_s"] else float("nan"),
        "metrics": metrics,
        "answers": answers,
        "selection_digests": digests,
    }


def compare(reference: dict, other: dict) -> list[str]:
    """Differences in answers or kept-token selections between two runs (empty: identical)."""
    problems = []
    for field in ("answers", "selection_digests"):
        a, b = reference[field], other[field]
        if set(a) != set(b):
            problems.append(f"{field}: documents differ ({sorted(set(a) ^ set(b))[:5]} ...)")
            continue
        for key in sorted(a):
            if a[key] != b[key]:
                problems.append(f"{field} {key}: bs={reference['batch_size']} {a[key]!r} vs bs={other['batch_size']} {b[key]!r}")
    return problems


def run(
    pretrained: str | Path,
    method: str = "hiprune",
    budget: int | None = 64,
    tasks: list[str] | None = None,
    include_path: str | None = str(REPO_ROOT / "eval" / "tasks"),
    limit: int | None = 24,
    batch_sizes: list[int] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    warmup_limit: int = 2,
    seed: int = 0,
    **method_options: Any,
) -> dict:
    # deferred on purpose: lmms-eval and transformers read HF_HUB_OFFLINE when imported, after main()'s defaults
    from eval.lmms.llava import HiPruneLlava
    from eval.running.run import task_manager

    tasks = tasks or ["hiprune_smoke_pope"]
    batch_sizes = batch_sizes or [1, 8]
    manager = task_manager(include_path or None)
    options = dict(method_options)
    if method != "none" and budget is not None:
        options["budget"] = budget
    model = HiPruneLlava(pretrained=str(pretrained), method=method, device=device, dtype=dtype, **options)
    try:
        if warmup_limit:
            evaluate_once(model, tasks, manager, warmup_limit, batch_sizes[0], seed)
        runs = [evaluate_once(model, tasks, manager, limit, bs, seed) for bs in batch_sizes]
        settings = dict(model.settings)
        settings["pretrained"] = repo_relative(settings["pretrained"])
    finally:
        model.close()
    first = runs[0]
    for r in runs:
        r["speedup_vs_first"] = r["samples_per_s"] / first["samples_per_s"]
        r["speedup_generate_vs_first"] = r["samples_per_s_generate"] / first["samples_per_s_generate"]
        r["differences"] = compare(first, r) if r is not first else []
        r["identical_to_first"] = not r["differences"]
    return {
        "model": settings,
        "tasks": tasks,
        "limit": limit,
        "batch_sizes": batch_sizes,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": repo_relative(" ".join(sys.argv)),
        "runs": runs,
        "identical": all(r["identical_to_first"] for r in runs),
    }


def markdown(result: dict) -> str:
    m = result["model"]
    first = result["batch_sizes"][0]
    distinct_answers = len({json.dumps(a) for a in result["runs"][0]["answers"].values()})
    distinct_selections = len(set(result["runs"][0]["selection_digests"].values()))
    lines = [
        "# Evaluation throughput: batch size vs samples/s (lmms-eval)",
        "",
        (f"- model `{m['pretrained']}` ({m['device']}, {m['dtype']}, attention {m['attn_implementation']}), method "
         f"`{m['method']}`; tasks {result['tasks']}, limit {result['limit']}; {result['torch_threads']} torch threads; "
         f"load average {result['load_average']}."),
        ("- samples/s = documents answered / wall time of `simple_evaluate` (whole run: request building, generation, "
         "metrics) and / time inside the model's `generate_until` (generation only). One untimed warm-up run first."),
        (f"- identical answers and kept-token selections across batch sizes: **{'yes' if result['identical'] else 'NO'}**"
        f" ({distinct_answers} distinct answers and {distinct_selections} distinct kept-token selections over "
        f"{result['runs'][0]['samples']} documents; a model that answers alike everywhere checks little through its "
        "answers, the selections still check every document)"),
        "",
        (f"| batch size | samples | wall s | samples/s | × bs={first} | generate s | samples/s (generate) | × bs={first} "
         "| identical |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['batch_size']} | {r['samples']} | {r['wall_s']:.2f} | {r['samples_per_s']:.2f} | "
            f"{r['speedup_vs_first']:.2f} | {r['generate_s']:.2f} | {r['samples_per_s_generate']:.2f} | "
            f"{r['speedup_generate_vs_first']:.2f} | {'yes' if r['identical_to_first'] else 'no'} |"
        )
    for r in result["runs"]:
        for problem in r["differences"][:20]:
            lines.append(f"\n- difference: {problem}")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(markdown(result))
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.efficiency.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=str(REPO_ROOT / "assets" / "tiny-llava"))
    p.add_argument("--method", default="hiprune")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--tasks", nargs="+", default=["hiprune_smoke_pope"])
    p.add_argument("--include-path", default=str(REPO_ROOT / "eval" / "tasks"), help="'' for lmms-eval's tasks only")
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without suffix")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.pretrained).startswith(str(REPO_ROOT / "assets")) and not (Path(args.pretrained) / "config.json").is_file():
        sys.exit(f"{args.pretrained} is missing: build the offline assets first (make assets)")
    result = run(args.pretrained, args.method, None if args.method == "none" else args.budget, args.tasks,
                 args.include_path or None, args.limit, args.batch_sizes, args.device, args.dtype)
    for path in write(result, args.out):
        print(f"wrote {path}")
    print(markdown(result))
    if not result["identical"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
