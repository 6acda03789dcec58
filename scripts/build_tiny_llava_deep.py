#!/usr/bin/env python
"""Build the tiny LLaVA with a 32-layer LLM (Vicuna-7B's depth), fully offline: scripts/build_tiny_llava.py's recipe
and seed with ``text_num_hidden_layers=32``, so LLM-side methods run their real schedules on it (FastV's K = 2 and
the per-layer average budgets 192 / 128 / 64; PyramidDrop's boundaries [2, 8, 16]). Random weights: answers are noise.

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_llava_deep [--out DIR] [--seed 0] [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path

from scripts import asset_build, build_tiny_llava

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-llava-deep"
TEXT_LAYERS = 32


def build_tiny_llava_deep(out_dir: Path, seed: int = 0, force: bool = False, verbose: bool = False) -> Path:
    """Build (or reuse) the 32-layer tiny LLaVA in ``out_dir``; deterministic like build_tiny_llava."""
    return build_tiny_llava.build_tiny_llava(
        out_dir, seed=seed, force=force, verbose=verbose, text_num_hidden_layers=TEXT_LAYERS
    )


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_llava_deep)


if __name__ == "__main__":
    sys.exit(main())
