"""Token-reduction methods: one small dataclass per file, registered here by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from hiprune.methods.base import FEATURE_LAYER, Method, Request, Selection, VisionTokens, resolve_budget
from hiprune.methods.fastv import FastV, select_fastv
from hiprune.methods.hiprune import HiPrune, select_hiprune
from hiprune.methods.hiprune_pp import HiPrunePP
from hiprune.methods.none import NoPrune
from hiprune.methods.random import RandomPrune

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NoPrune, RandomPrune, HiPrune, HiPrunePP, FastV)}


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
    "FastV",
    "HiPrune",
    "HiPrunePP",
    "Method",
    "NoPrune",
    "RandomPrune",
    "Request",
    "Selection",
    "VisionTokens",
    "build_method",
    "resolve_budget",
    "select_fastv",
    "select_hiprune",
]
