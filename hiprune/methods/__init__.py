"""Token-reduction methods: one small dataclass per file, registered by name with ``@register_method``.

Every module of this package is imported here, so a new method is one new file (plus its Hydra config).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from hiprune.methods.base import (
    FEATURE_LAYER,
    METHODS,
    DropStage,
    EncoderTokens,
    Method,
    Request,
    Selection,
    VisionTokens,
    register_method,
    resolve_budget,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from hiprune.methods.fastv import FastV, select_fastv  # noqa: E402  (re-exported; registered by the loop above)
from hiprune.methods.hiprune import HiPrune, select_hiprune  # noqa: E402
from hiprune.methods.hiprune_pp import HiPrunePP  # noqa: E402
from hiprune.methods.none import NoPrune  # noqa: E402
from hiprune.methods.pdrop import PyramidDrop, select_pdrop  # noqa: E402
from hiprune.methods.random import RandomPrune  # noqa: E402
from hiprune.methods.sparsevlm import SparseVLM  # noqa: E402


def build_method(name: str, **options: Any) -> Method:
    """Instantiate and validate a method by its registered name; unknown names or options are errors."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    method = cls(**options)
    method.validate()
    return method


__all__ = [
    "FEATURE_LAYER",
    "METHODS",
    "DropStage",
    "EncoderTokens",
    "FastV",
    "HiPrune",
    "HiPrunePP",
    "Method",
    "NoPrune",
    "PyramidDrop",
    "RandomPrune",
    "Request",
    "Selection",
    "SparseVLM",
    "VisionTokens",
    "build_method",
    "register_method",
    "resolve_budget",
    "select_fastv",
    "select_hiprune",
    "select_pdrop",
]
