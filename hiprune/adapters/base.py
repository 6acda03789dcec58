"""What every model adapter provides, and the session object that ``hiprune.apply`` yields."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hiprune.methods.base import FEATURE_LAYER, Method, Selection, VisionTokens


class PruningError(RuntimeError):
    """A pruning step produced something unusable (wrong count, NaN scores, ...). Never caught by the harness."""


@dataclass
class GridRecord:
    """One grid (image or crop) that went through a method in one forward pass."""

    tokens_in: int
    tokens_kept: int
    indices: torch.Tensor | None  # kept indices (CPU, long), None when nothing was pruned


@dataclass
class LayerRecord:
    """One LLM prefill under an LLM-side method: what each decoder layer processed, the same for every row.

    tokens: sequence positions per row that each decoder layer ran on (text, padding and visual tokens).
    visual: visual tokens per row among them, at each decoder layer (``eval.flops.flops_exact`` takes this list).
    indices: [rows * images per row, kept] visual-token indices of each image kept by the last stage of the drop
        schedule (indices into the image's original tokens; CPU, long, sorted), in batch order, or None when the
        forward pruned nothing.
    stages: every stage of the schedule that ran, in order: (first decoder layer on the shortened sequence, kept
        indices [rows * images per row, kept], as ``indices``); the last one's indices are ``indices``.
    """

    tokens: list[int]
    visual: list[int]
    indices: torch.Tensor | None
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass
class PruningSession:
    """Handle yielded by ``hiprune.apply``: what was installed and what it did.

    records: one list per vision forward pass (a ``generate`` call makes one), one GridRecord per grid.
    layer_records: one LayerRecord per LLM prefill that an LLM-side method pruned (empty for other methods).
    """

    method: Method
    adapter: Adapter
    prompt_encoder: Any = None
    records: list[list[GridRecord]] = field(default_factory=list)
    layer_records: list[LayerRecord] = field(default_factory=list)
    last_selection: Selection | None = None
    _prompts: list[str] | None = None

    def set_prompts(self, prompts_per_image: list[str]) -> None:
        """Prompt of every image of the next forward pass, in image order (prompt-aware methods need them)."""
        self._prompts = list(prompts_per_image)

    def take_prompts(self, n_images: int) -> list[str]:
        """The prompts set for this forward pass (consumed, so a stale prompt is never reused)."""
        prompts, self._prompts = self._prompts, None
        if prompts is None:
            raise PruningError(
                f"method {self.method.name!r} is prompt-aware: call session.set_prompts([...]) before each generate"
            )
        if len(prompts) != n_images:
            raise PruningError(f"{len(prompts)} prompts were set for a forward pass over {n_images} images")
        return prompts

    def tokens_per_image(self) -> int:
        """Visual tokens the LLM receives per image under this method (what the processor must emit)."""
        return self.adapter.tokens_per_image(self.method)

    def pop_records(self) -> list[list[GridRecord]]:
        out, self.records = self.records, []
        return out

    def pop_layer_records(self) -> list[LayerRecord]:
        out, self.layer_records = self.layer_records, []
        return out


def patch_attribute(stack: ExitStack, obj: Any, name: str, value: Any) -> None:
    """Set ``obj.name = value`` as an instance attribute; the stack restores the exact previous state."""
    had_own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)

    def restore() -> None:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    stack.callback(restore)


def stable_ids(pixel_values: torch.Tensor) -> list[int]:
    """One 63-bit id per image from its pixel bytes: seeds random methods independently of batch composition."""
    ids = []
    for row in pixel_values.detach().to("cpu", torch.float32).contiguous():
        digest = hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest()
        ids.append(int.from_bytes(digest, "little") >> 1)
    return ids


def derived_id(base: int, index: int | str) -> int:
    """A 63-bit id for part ``index`` (a crop, a frame) of the visual whose :func:`stable_ids` id is ``base``."""
    digest = hashlib.blake2b(f"{base}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def select_checked(method: Method, tokens: VisionTokens, budget: int, keep: int, unit: str) -> Selection:
    """``method.select`` on ``tokens``, failing loudly unless it returns ``keep`` indices and features per row."""
    selection = method.select(tokens, budget)
    rows = tokens.features.shape[0]
    if selection.indices.shape != (rows, keep) or selection.features.shape[:2] != (rows, keep):
        raise PruningError(
            f"method {method.name!r} returned {tuple(selection.indices.shape)} indices and features "
            f"{tuple(selection.features.shape)}; expected {keep} tokens for each of {rows} {unit}"
        )
    return selection


class Adapter:
    """Plumbing for one model family. Subclasses set ``model_types`` and implement ``install``.

    An adapter resolves a method's layer requests against its encoder, computes exactly those scores, hands the
    method a :class:`VisionTokens` per grid and puts the kept tokens back into the model's own data flow.
    """

    family: ClassVar[str] = ""
    # Where this family's plumbing lets a method prune: "vision" (before the LLM), "llm" (inside the decoder).
    stages: ClassVar[tuple[str, ...]] = ("none", "vision")
    model_types: ClassVar[tuple[type, ...]] = ()
    # CLIP-tower families compare prompts through an external text tower; others use their own LLM embeddings.
    needs_prompt_encoder: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_types)

    # --- encoder description -------------------------------------------------------------------------------
    def num_encoder_layers(self) -> int:
        raise NotImplementedError

    def feature_layer(self) -> int:
        """1-based encoder layer whose output feeds the LLM."""
        raise NotImplementedError

    def attention_module(self, layer: int) -> nn.Module:
        """Attention module of 1-based encoder layer ``layer``."""
        raise NotImplementedError

    def tokens_per_image(self, method: Method) -> int:
        raise NotImplementedError

    def describe_encoder(self) -> dict[str, Any]:
        """How this family presents visual tokens to methods: grid, CLS, feature layer, merge (recorded per run)."""
        return {"family": self.family, "layers": self.num_encoder_layers(), "feature_layer": self.feature_layer()}

    # --- method plumbing -----------------------------------------------------------------------------------
    def resolve_layers(self, method: Method) -> dict[str, int]:
        """Method's score requests -> 1-based layers, validated against this encoder."""
        resolved = {}
        n_layers = self.num_encoder_layers()
        for name, layer in method.score_layers().items():
            index = self.feature_layer() if layer == FEATURE_LAYER else layer
            if not isinstance(index, int) or not 1 <= index <= n_layers:
                raise ValueError(
                    f"method {method.name!r} asks for encoder layer {layer!r} ({name}) but the "
                    f"{self.family} vision encoder has layers 1..{n_layers}"
                )
            resolved[name] = index
        return resolved

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        """Raise if this family cannot run ``method``. Called before anything is patched."""
        if method.needs_prompt and self.needs_prompt_encoder and prompt_encoder is None:
            raise ValueError(
                f"method {method.name!r} compares visual tokens with the prompt: the {self.family} adapter needs a "
                "prompt encoder, e.g. apply(model, method, processor, "
                "prompt_encoder=hiprune.ClipPromptEncoder.from_pretrained('openai/clip-vit-large-patch14-336'))"
            )
        if method.stage not in self.stages:
            raise ValueError(unsupported_stage_message(method.name, self.family))

    def install(self, stack: ExitStack, session: PruningSession, processor: Any | None) -> None:
        raise NotImplementedError


def unsupported_stage_message(method: str, family: str) -> str:
    return f"method {method!r} prunes inside the LLM, which the {family} adapter does not support yet"


_ADAPTERS: list[type[Adapter]] = []


def family_supports_stage(family: str, stage: str) -> bool:
    """Whether the registered adapter of ``family`` can run methods of ``stage`` (decidable without a model)."""
    matching = [cls for cls in _ADAPTERS if cls.family == family]
    if not matching:
        raise ValueError(f"no adapter is registered for the model family {family!r}")
    return all(stage in cls.stages for cls in matching)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append(cls)
    return cls


def adapter_for(model: nn.Module, **options: Any) -> Adapter:
    """The adapter of ``model``'s family; ``options`` are that adapter's own (e.g. Qwen2.5-VL ``positions``)."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            try:
                return cls(model, **options)
            except TypeError as exc:
                if options and "unexpected keyword" in str(exc):
                    raise ValueError(f"the {cls.family} adapter has no option(s) {sorted(options)}") from exc
                raise
    supported = ", ".join(t.__name__ for cls in _ADAPTERS for t in cls.model_types)
    raise TypeError(f"no pruning adapter for {type(model).__name__}; supported: {supported}")


@contextmanager
def apply(
    model: nn.Module,
    method: Method,
    processor: Any | None = None,
    prompt_encoder: Any | None = None,
    **adapter_options: Any,
) -> Iterator[PruningSession]:
    """Install ``method`` on ``model`` (and make ``processor`` emit the matching number of image tokens).

    Prompt-aware methods on CLIP-tower families also need ``prompt_encoder`` (e.g. hiprune.ClipPromptEncoder) and
    the prompts of each forward pass (``session.set_prompts``). ``adapter_options`` go to the family's adapter
    (e.g. ``positions="compact"`` for Qwen2.5-VL). Everything patched is restored on exit, also when the body raises.
    """
    method.validate()
    adapter = adapter_for(model, **adapter_options)
    adapter.check_supported(method, prompt_encoder)
    session = PruningSession(method=method, adapter=adapter, prompt_encoder=prompt_encoder)
    with ExitStack() as stack:
        adapter.install(stack, session, processor)
        yield session
