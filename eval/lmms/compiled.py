"""Generation without launch overhead (``model.compile=true``; lmms-eval ``compile=true``): transformers' static KV
cache, decode steps through ``torch.compile`` (transformers' own auto-compile of the cached forward), and the prefill
through a separately compiled decoder call on text lengths padded to a few buckets.

Why buckets: a vision-side method hands the LLM a fixed number of visual tokens per image, so a batch's prefill
length varies only with its text (and, on dynamic-resolution families, its image sizes). The batch is left-padded to
the next multiple of ``compile_bucket`` tokens (the attention mask covers the padding, as in any batch of unequal
prompts), so the compiled prefill and the static cache (prompt + ``max_new_tokens`` long) see a handful of shapes per
task instead of one per prompt. Answers equal the eager path's (tests/test_compiled_generation.py on the tiny models);
on a GPU, half-precision kernels of the compiled graphs may round differently, which the throughput tool reports.

Methods that prune inside the LLM (FastV, PyramidDrop, SparseVLM) change the sequence length from one decoder layer
to the next and keep their drop schedule in Python hooks: they cannot use a static cache, and are refused before any
model loads (:func:`check_compile`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CompileConfig

import hiprune

BACKENDS = ("inductor", "eager", "aot_eager")  # eager / aot_eager: dynamo capture without code generation (tests)


@dataclass(frozen=True)
class CompileOptions:
    """What ``compile=true`` runs: bucket width of the padded prompt, torch.compile backend and mode, whether the
    prefill is compiled too (the decode step always is)."""

    bucket: int = 32
    backend: str = "inductor"
    mode: str | None = None  # None: "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere
    prefill: bool = True

    def validate(self) -> None:
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket < 1:
            raise ValueError(f"compile_bucket must be an int >= 1 (tokens), got {self.bucket!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"compile_backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"unknown compile_mode {self.mode!r}")

    def resolved_mode(self, device: str) -> str:
        return self.mode or ("reduce-overhead" if str(device).startswith("cuda") else "default")

    def describe(self, device: str) -> dict[str, Any]:
        return {"bucket": self.bucket, "backend": self.backend, "mode": self.resolved_mode(device),
                "prefill": self.prefill, "cache": "static"}


# Families whose adapter cannot run on a static cache, and why.
UNSUPPORTED_FAMILIES = {
    "qwen2_5_vl": "the Qwen2.5-VL adapter computes the pruned M-RoPE positions from the 2-D attention mask, which "
                  "generate replaces by precomputed 4-D masks when the cache is static",
}


def check_compile(method: hiprune.Method, family: str) -> None:
    """Refuse a family or method that cannot run on a static cache (raised before any model loads)."""
    if family in UNSUPPORTED_FAMILIES:
        raise ValueError(f"compile=true is not supported on the {family} family: {UNSUPPORTED_FAMILIES[family]}; "
                         "run it with compile=false")
    if method.stage == "llm":
        raise ValueError(
            f"compile=true needs a fixed sequence length through the decoder (static KV cache, compiled graphs), but "
            f"method {method.name!r} prunes inside the LLM and changes the sequence length from layer to layer; run it "
            "with compile=false"
        )


def options_from(compile: Any, model_args: dict[str, Any]) -> CompileOptions | None:
    """The compile options of a model's arguments (``compile`` and the ``compile_*`` keys, popped from ``model_args``,
    which then holds method options only); None when compile is off (then no compile_* key may be given)."""
    keys = {k: model_args.pop(k) for k in [k for k in model_args if k.startswith("compile_")]}
    if not parse_bool(compile, "compile"):
        if keys:
            raise ValueError(f"{sorted(keys)} given without compile=true")
        return None
    fields = {"compile_bucket": "bucket", "compile_backend": "backend", "compile_mode": "mode",
              "compile_prefill": "prefill"}
    unknown = sorted(set(keys) - set(fields))
    if unknown:
        raise ValueError(f"unknown compile option(s) {unknown}; expected {sorted(fields)}")
    values = {fields[k]: v for k, v in keys.items()}
    if "bucket" in values and isinstance(values["bucket"], str) and values["bucket"].isdigit():
        values["bucket"] = int(values["bucket"])
    if "prefill" in values:
        values["prefill"] = parse_bool(values["prefill"], "compile_prefill")
    if values.get("mode") in ("none", "None", ""):
        values["mode"] = None
    options = CompileOptions(**values)
    options.validate()
    return options


def parse_bool(value: Any, name: str) -> bool:
    """A boolean model_arg as Hydra or lmms-eval's ``--model_args`` give it (bool, or the strings true / false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def pad_to_bucket(batch: dict[str, torch.Tensor], bucket: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad every [B, L] tensor of the batch (input_ids with ``pad_id``, the masks and type ids with 0) to the
    next multiple of ``bucket``; other tensors (pixels, image sizes, grids) unchanged."""
    ids = batch["input_ids"]
    length = ids.shape[1]
    extra = -length % bucket
    if not extra:
        return batch
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            fill = pad_id if key == "input_ids" else 0
            pad = value.new_full((value.shape[0], extra), fill)
            out[key] = torch.cat([pad, value], dim=1)
        else:
            out[key] = value
    return out


class CompiledGeneration:
    """Installs the compiled prefill on a loaded model and gives ``generate`` its static-cache arguments."""

    def __init__(self, model, options: CompileOptions, device: str) -> None:
        self.options = options
        self.device = device
        self.config = CompileConfig(fullgraph=False, dynamic=False, backend=options.backend,
                                    mode=options.resolved_mode(device))
        self.config._compile_all_devices = True  # transformers compiles on CUDA only unless asked (CPU: tests, bench)
        self.decoder = model.model.language_model
        self._original = None
        if options.prefill:
            self._install_prefill()

    def _install_prefill(self) -> None:
        decoder = self.decoder
        if "forward" in vars(decoder):
            raise RuntimeError("compile=true: the decoder's forward is already patched on the instance")
        original = decoder.forward  # the bound method (hiprune.apply leaves the decoder's forward alone)
        compiled = torch.compile(original, fullgraph=False, dynamic=False, backend=self.options.backend,
                                 mode=self.options.resolved_mode(self.device))

        @functools.wraps(original)
        def forward(*args, **kwargs):
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids")
            length = (embeds if embeds is not None else ids).shape[1] if (embeds is not None or ids is not None) else 1
            # prefill (several positions) through its own graphs; one-token steps stay on the eager forward here:
            # transformers compiles the whole decode call around it
            return compiled(*args, **kwargs) if length > 1 else original(*args, **kwargs)

        self._original = original
        decoder.forward = forward

    def close(self) -> None:
        if self._original is not None:
            del self.decoder.forward  # back to the class's forward
            self._original = None

    def generation_kwargs(self) -> dict[str, Any]:
        return {"cache_implementation": "static", "compile_config": self.config}
