"""Helpers shared by test modules (conftest fixtures cover the LLaVA-1.5 assets)."""

from __future__ import annotations

from pathlib import Path

from conftest import ASSETS, load_script


def build_asset(script: str, folder: str) -> Path:
    """Build assets/<folder> with scripts/<script>.py's build function if missing (idempotent)."""
    module = load_script(script)
    return getattr(module, script)(ASSETS / folder)
