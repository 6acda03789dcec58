"""HiPrune harness: training-free visual-token pruning for HF transformers VLMs.

    import hiprune
    method = hiprune.build_method("hiprune", budget=192)
    with hiprune.apply(model, method, processor) as session:
        out = model.generate(**processor(text=..., images=..., return_tensors="pt"))
"""

from hiprune.adapters import PruningError, PruningSession, adapter_for, apply
from hiprune.methods import (
    METHODS,
    FastV,
    HiPrune,
    HiPrunePP,
    Method,
    NoPrune,
    PyramidDrop,
    RandomPrune,
    build_method,
    select_fastv,
    select_hiprune,
)
from hiprune.scores import global_attention
from hiprune.text_encoders import ClipPromptEncoder

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ClipPromptEncoder",
    "FastV",
    "HiPrune",
    "HiPrunePP",
    "Method",
    "NoPrune",
    "PruningError",
    "PruningSession",
    "PyramidDrop",
    "RandomPrune",
    "adapter_for",
    "apply",
    "build_method",
    "global_attention",
    "select_fastv",
    "select_hiprune",
]
