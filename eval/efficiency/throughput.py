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

Grid mode (``--model NAME``, issue 18): a random-weight architecture (``configs/model/NAME.yaml``: ``arch`` +
``arch_overrides``, built once directly on the device, the tiny LLaVA's processor and tokenizer) evaluated on the local
smoke POPE images and prompts, with generation forced to each task's answer length (:data:`ANSWER_TOKENS`), at every
batch size, eager and ``compile=true``, for ``none`` and ``hiprune`` at each budget:

    python -m eval.efficiency.throughput --model llava15_mid_cpu --tasks pope gqa --batch-sizes 1 4 --limit 8
    python -m eval.efficiency.throughput --model llava15_7b --device cuda --batch-sizes 1 8 32 --limit 64 \
        --modes eager compiled --methods none hiprune:192 hiprune:64 --tasks pope gqa mme

Reported per (mode, method, task, batch size): samples/s of ``generate_until``, the speed-up over the first batch
size, whether the answers (token for token) equal the first batch size's, and for compiled rows whether they equal
the eager rows'. Writes results/efficiency/eval_throughput_<model>-<device>-<dtype>.{json,md}, which
``python -m eval.report.reproduce run <TABLE> --dry-run`` reads for its GPU-hour estimates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eval.config import REPO_ROOT, repo_relative
from eval.efficiency.measure import load_average

DEFAULT_OUT = REPO_ROOT / "results" / "efficiency" / "eval_throughput"
TINY_PROCESSOR = REPO_ROOT / "assets" / "tiny-llava"

# Tokens generated per sample, the end-of-sequence token included: a yes/no or option-letter answer is one token
# (POPE, MME, ScienceQA-IMG, MMBench), then EOS; short-answer tasks ("Answer the question using a single word or
# phrase": GQA, TextVQA, VizWiz, VQAv2) are assumed to answer in two to three tokens. An assumption of this
# estimate, not a measurement of real answers (random weights answer nothing).
ANSWER_TOKENS = {"pope": 2, "mme": 2, "sqa_img": 2, "mmbench": 2, "mmbench_cn": 2, "gqa": 4, "textvqa": 4,
                 "vizwiz": 4, "vqav2": 3}


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


def forced_length(model, new_tokens: int):
    """Make every generate call of ``model`` produce exactly ``new_tokens`` tokens (min = max): the answer length of
    the task being emulated. Returns the undo function."""
    generate = model._model.generate

    def forced(**kwargs):
        kwargs["max_new_tokens"] = kwargs["min_new_tokens"] = int(new_tokens)
        return generate(**kwargs)

    model._model.generate = forced
    return lambda: delattr(model._model, "generate")


def random_weight_lmm(model_name: str, method: str, budget: int | None, device: str, dtype: str, compile: bool,
                      cache: dict, **compile_options):
    """An lmms-eval HiPruneLlava on random weights of ``configs/model/<model_name>.yaml``'s architecture, built once
    per process (``cache``) directly on the device; the tiny LLaVA's tokenizer and processor (its image and pad token
    ids are set on the config, so prompts are shorter than Vicuna's: an approximation of the text length)."""
    # deferred on purpose: lmms-eval and transformers read HF_HUB_OFFLINE when imported, after main()'s defaults
    from transformers import AutoProcessor

    from eval.config import compose_config
    from eval.efficiency.bench import architecture_config, build_model
    from eval.lmms.base import resolve_dtype
    from eval.lmms.llava import HiPruneLlava
    from eval.lmms.prompting import LlavaInputBuilder

    if "model" not in cache:
        cfg = compose_config([f"model={model_name}"])
        config, source = architecture_config(cfg.model)
        tiny = json.loads((TINY_PROCESSOR / "config.json").read_text())
        config.image_token_index = config.image_token_id = tiny["image_token_index"]
        config.pad_token_id = tiny["pad_token_id"]
        torch_dtype = resolve_dtype(dtype if dtype != "auto" else str(cfg.model.dtype), device)
        cache["model"] = build_model(config, torch_dtype, torch.device(device), str(cfg.model.attn_implementation), 0)
        cache["dtype"] = str(torch_dtype).removeprefix("torch.")
        cache["arch"] = {"model": model_name, "arch": repo_relative(source),
                         "parameters": sum(p.numel() for p in cache["model"].parameters())}

    class RandomWeights(HiPruneLlava):
        def load(self, pretrained, revision, attn_implementation, prompt_style, image_backend, pad_to_square,
                 text_tower, prompt_pooling):
            processor = AutoProcessor.from_pretrained(TINY_PROCESSOR)
            self.inputs = LlavaInputBuilder(processor, prompt_style=prompt_style, image_backend=image_backend,
                                            pad_to_square=pad_to_square)
            self.pad_token_id = self.inputs.pad_id
            return cache["model"], processor

    options = {"budget": budget} if method != "none" else {}
    if compile:
        options.update(compile=True, **compile_options)
    return RandomWeights(pretrained=str(TINY_PROCESSOR), method=method, device=device, dtype=cache["dtype"],
                         prompt_style="llava_v1", **options)


def run_grid(
    model_name: str,
    methods: list[tuple[str, int | None]],
    tasks: list[str],
    batch_sizes: list[int],
    modes: list[str],
    limit: int,
    device: str,
    dtype: str = "auto",
    seed: int = 0,
    compile_options: dict | None = None,
    deadline: float | None = None,
    eval_task: str = "hiprune_smoke_pope",
) -> dict:
    """Samples/s per (mode, method, task answer length, batch size) on one random-weight model (module docstring).
    ``deadline`` (time.monotonic()): cells not started by then are skipped and listed (a device-time budget)."""
    # deferred on purpose: lmms-eval and transformers read HF_HUB_OFFLINE when imported, after main()'s defaults
    from eval.running.run import task_manager

    unknown = sorted(set(tasks) - set(ANSWER_TOKENS))
    if unknown:
        raise ValueError(f"no answer length for task(s) {unknown}; known: {sorted(ANSWER_TOKENS)}")
    manager = task_manager(str(REPO_ROOT / "eval" / "tasks"))
    cache: dict = {}
    cells, skipped = [], []
    for mode in modes:
        for method, budget in methods:
            if deadline is not None and time.monotonic() > deadline:
                skipped.append(f"{mode} {method} {budget}")
                continue
            lmm = random_weight_lmm(model_name, method, budget, device, dtype, mode == "compiled", cache,
                                    **(compile_options or {}))
            try:
                for t, task in enumerate(tasks):
                    undo = forced_length(lmm, ANSWER_TOKENS[task])
                    try:
                        if t == 0 and mode == "eager":  # first calls: dataset loading, lazy inits
                            evaluate_once(lmm, [eval_task], manager, min(2, limit), batch_sizes[0], seed)
                        for bs in batch_sizes:
                            if deadline is not None and time.monotonic() > deadline:
                                skipped.append(f"{mode} {method} {budget} {task} bs={bs}")
                                continue
                            if mode == "compiled":  # compile this (batch, length) shape outside the timed run
                                evaluate_once(lmm, [eval_task], manager, bs, bs, seed)
                            r = evaluate_once(lmm, [eval_task], manager, limit, bs, seed)
                            r.update(mode=mode, method=method, budget=budget, task=task,
                                     new_tokens=ANSWER_TOKENS[task])
                            cells.append(r)
                    finally:
                        undo()
                settings = dict(lmm.settings)
            finally:
                lmm.close()
    for cell in cells:
        same = [c for c in cells if (c["mode"], c["method"], c["budget"], c["task"])
                == (cell["mode"], cell["method"], cell["budget"], cell["task"])]
        first = same[0]
        cell["speedup_generate_vs_first"] = cell["samples_per_s_generate"] / first["samples_per_s_generate"]
        cell["differences"] = compare(first, cell) if cell is not first else []
        cell["identical_to_first"] = not cell["differences"]
        if cell["mode"] != "eager":
            eager = [c for c in cells if c["mode"] == "eager" and (c["method"], c["budget"], c["task"], c["batch_size"])
                     == (cell["method"], cell["budget"], cell["task"], cell["batch_size"])]
            cell["matches_eager"] = (not compare(eager[0], cell)) if eager else None
    return {
        "model": {**cache.get("arch", {}), "device": device, "dtype": cache.get("dtype"),
                  "processor": repo_relative(str(TINY_PROCESSOR)),
                  "compile": settings.get("compile") if cells and "compiled" in modes else None},
        "device_name": device_name_of(device),
        "data": f"{eval_task} images and prompts (local); generation forced to each task's answer length",
        "answer_tokens": {t: ANSWER_TOKENS[t] for t in tasks},
        "limit": limit,
        "batch_sizes": batch_sizes,
        "modes": modes,
        "methods": [f"{m}:{b}" if b else m for m, b in methods],
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": repo_relative(" ".join(sys.argv)),
        "cells": [{k: v for k, v in c.items() if k not in ("answers",)} | {"answers": c["answers"]} for c in cells],
        "skipped": skipped,
        "identical": all(c["identical_to_first"] for c in cells),
        "compiled_matches_eager": all(c.get("matches_eager") is not False for c in cells),
    }


def device_name_of(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def grid_markdown(result: dict) -> str:
    m = result["model"]
    lines = [
        (f"# Evaluation throughput: {m.get('model')} (random weights), {result['device_name']} ({m['device']}, "
         f"{m['dtype']})"),
        "",
        (f"- {m.get('parameters', 0) / 1e6:,.1f} M parameters, architecture `{m.get('arch')}`; {result['data']}; "
         f"answer tokens (EOS included) {result['answer_tokens']}; {result['limit']} samples per cell; "
         f"{result['torch_threads']} torch threads; load average {result['load_average']}; {result['timestamp']}."),
        "- samples/s = documents / time inside `generate_until` (preprocessing, vision, selection, prefill, decode).",
        f"- compile: {m.get('compile')}",
        (f"- answers identical across batch sizes: **{'yes' if result['identical'] else 'NO'}**; compiled answers equal "
         f"eager: **{'yes' if result['compiled_matches_eager'] else 'NO'}**"),
        "",
        "| mode | method | task (tokens) | batch | samples/s | × first batch | identical to first batch | = eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        method = c["method"] if c["budget"] is None else f"{c['method']} {c['budget']}"
        eq = {True: "yes", False: "no", None: "—"}[c.get("matches_eager")]
        lines.append(f"| {c['mode']} | {method} | {c['task']} ({c['new_tokens']}) | {c['batch_size']} | "
                     f"{c['samples_per_s_generate']:.2f} | {c['speedup_generate_vs_first']:.2f} | "
                     f"{'yes' if c['identical_to_first'] else 'no'} | {eq} |")
    if result["skipped"]:
        lines.append(f"\n- skipped (time budget): {result['skipped']}")
    for c in result["cells"]:
        for problem in c["differences"][:5]:
            lines.append(f"\n- difference: {problem}")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--out", type=Path, default=None, help="output path without suffix")
    p.add_argument("--model", default=None, help="grid mode: a configs/model name with an arch (random weights)")
    p.add_argument("--methods", nargs="+", default=["none", "hiprune:192", "hiprune:64"], help="grid: method[:budget]")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-prefill", default="true", choices=["true", "false"])
    p.add_argument("--eval-task", default="hiprune_smoke_pope",
                   help="grid: the local task whose images and prompts stand in (hiprune_scene_pope: 600 samples)")
    p.add_argument("--time-budget", type=float, default=None, help="grid: seconds; later cells are skipped")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return main_grid(args)
    args.out = args.out or DEFAULT_OUT
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


def main_grid(args) -> dict:
    methods = []
    for item in args.methods:
        name, _, budget = item.partition(":")
        methods.append((name, int(budget) if budget else None))
    tasks = [t for t in args.tasks if t != "hiprune_smoke_pope"] or ["pope", "gqa", "mme"]
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    result = run_grid(args.model, methods, tasks, args.batch_sizes, args.modes, args.limit, args.device, args.dtype,
                      compile_options={"compile_backend": args.compile_backend,
                                       "compile_prefill": args.compile_prefill},
                      deadline=deadline, eval_task=args.eval_task)
    out = args.out or (DEFAULT_OUT.parent / f"eval_throughput_{args.model}-{args.device.split(':')[0]}-"
                                           f"{result['model']['dtype']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(grid_markdown(result))
    print(grid_markdown(result))
    print(f"wrote {repo_relative(str(out))}.{{json,md}}")
    if not result["identical"] or not result["compiled_matches_eager"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
