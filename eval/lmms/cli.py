"""``hiprune-lmms-eval``: lmms-eval's command line (the same arguments as ``python -m lmms_eval``) with an honest exit
status. lmms-eval 0.7.3 logs an exception and exits 0 (an unknown model arg, a bad budget, a missing task, an error
in the middle of a run), so scripts and CI would see success; this entry point exits 1 whenever an evaluation failed
or returned no results on the main process.

    hiprune-lmms-eval --model hiprune_llava --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=hiprune,budget=192 \\
        --tasks pope --batch_size 8 --output_path out/
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import lmms_eval.__main__ as lmms_main
from lmms_eval.cli.dispatch import main as lmms_dispatch


def main(argv: Sequence[str] | None = None) -> int:
    """Run lmms-eval's CLI on ``argv`` (default: this process's arguments); 0 only if every evaluation succeeded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    failures: list[str] = []
    evaluate_one = lmms_main.cli_evaluate_single
    main_process = int(os.environ.get("RANK", "0")) == 0

    def checked(args=None):
        try:
            results, samples = evaluate_one(args)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            raise
        if results is None and main_process:
            failures.append("lmms-eval returned no results")
        return results, samples

    saved_argv = sys.argv
    lmms_main.cli_evaluate_single = checked  # cli_evaluate calls it through the module, once per evaluation
    sys.argv = [saved_argv[0] if saved_argv else "hiprune-lmms-eval", *argv]
    try:
        lmms_dispatch()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            return exc.code if isinstance(exc.code, int) else 1
    finally:
        lmms_main.cli_evaluate_single = evaluate_one
        sys.argv = saved_argv
    if failures:
        print(f"[hiprune] lmms-eval failed: {failures[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
