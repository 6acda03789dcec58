"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``): prune after the projector, before the LLM.

transformers expands every ``<image>`` placeholder into one token per visual feature and scatters the projected
features into those positions. The adapter wraps ``LlavaModel.get_image_features`` so that it returns only the kept
features (raster order), and makes the processor emit exactly that many placeholders. The LLM then sees a plain,
shorter sequence: HF's own generate, KV cache, left padding and contiguous position ids (the official LLaVA
behaviour) work unchanged, and a count mismatch is caught by HF's own placeholder check.

LLM-side methods (FastV) get every visual token at the LLM's input; ``LlavaModel.forward`` is wrapped so that the
decoder plumbing of ``hiprune.adapters.llm_pruning`` knows where the image tokens of each forward are.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from hiprune.adapters.base import (
    GridInput,
    PruningError,
    PruningSession,
    patch_attribute,
    register_adapter,
    split_budget,
    stable_ids,
    stack_selections,
)
from hiprune.adapters.clip_tower import ClipTowerAdapter
from hiprune.adapters.llm_pruning import check_llm_method, install_decoder_drop
from hiprune.methods.base import Method, Selection, resolve_budget


@register_adapter
class LlavaAdapter(ClipTowerAdapter):
    family = "llava"
    model_types = (LlavaForConditionalGeneration,)
    # encoder: merging inside the CLIP tower (ClipTowerAdapter.install_merging); llm: hiprune.adapters.llm_pruning
    stages = ("none", "vision", "encoder", "llm")
    passes_cls = True  # methods with keeps_cls: the CLS token in front of the image's kept tokens

    def tokens_per_image(self, method: Method) -> int:
        if method.stage == "llm" and method.budget is not None:  # PyramidDrop with explicit ratios has none
            resolve_budget(method.budget, self.num_patches())  # validates the budget against the grid
        if method.stage not in ("vision", "encoder"):
            return self.num_patches()  # the LLM's input holds every visual token; LLM-side methods drop them later
        cls = 1 if method.stage == "vision" and method.keeps_cls else 0
        return method.kept_count(resolve_budget(method.budget, self.num_patches())) + cls

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        if method.stage != "llm":
            super().check_supported(method, prompt_encoder)
            return
        check_llm_method(method, self.config.text_config, self.family, self.num_patches())

    # --- installation --------------------------------------------------------------------------------------
    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        method = session.method
        keep = self.tokens_per_image(method)  # validates the budget against the grid before anything runs
        budget = split_budget(method.budget, [self.num_patches()])[0] if method.stage in ("vision", "encoder") else None
        if method.stage == "vision" and method.keeps_cls:
            keep -= 1  # select returns the patch part; the CLS token goes in front (_select)
        original = self.inner.get_image_features  # bound method of the class
        merging = self.install_merging(stack, session) if method.stage == "encoder" else None
        if merging is not None:
            merging.schedule_for(budget)  # validates the method's schedule before anything runs

        def get_image_features(pixel_values: torch.Tensor, *args, **kwargs):
            if merging is not None:
                merging.expect(budget)
                out = original(pixel_values, *args, **kwargs)
                outputs = merging.finish()
                for output, features in zip(outputs, out.pooler_output):
                    output.features = features
                    if features.shape[0] != keep:
                        raise PruningError(f"the merging encoder passed {features.shape[0]} tokens on, expected {keep}")
                self.record_outputs(session, [self.num_patches()] * len(outputs), outputs)
                session.last_selection = stack_selections(
                    [Selection(o.indices[None], o.features[None], sources=o.sources[None]) for o in outputs]
                )
                return out
            with self.capture(method) as capture:
                out = original(pixel_values, *args, **kwargs)
                captured = capture.collect()
            if method.stage != "vision":
                self.record_unpruned(session, [self.num_patches()] * len(out.pooler_output))
                return out
            out.pooler_output = self._select(session, out, captured, pixel_values, budget, keep)
            return out

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        if method.stage == "llm":
            self._install_llm_pruning(stack, session)

    def placeholder_counts(self, method: Method) -> dict:
        keep = self.tokens_per_image(method)
        return {"image": lambda inputs, index: keep}

    def _install_llm_pruning(self, stack: ExitStack, session: PruningSession) -> None:
        install_decoder_drop(stack, session, self.inner, self.inner.language_model, [self.config.image_token_id],
                             tokens_per_image=self.num_patches())

    def _select(self, session, out, captured, pixel_values, budget, keep):
        features = torch.stack(list(out.pooler_output))  # [B, N, D]
        n_images, n_tokens = features.shape[:2]
        if n_tokens != self.num_patches():
            raise PruningError(f"expected {self.num_patches()} visual tokens per image, got {n_tokens}")
        patches = self.patch_captures(captured, n_images)
        embeds = self.patch_embeds(session, out) if session.method.needs_prompt else None
        ids = stable_ids(pixel_values)
        grids = [
            GridInput(self.grid, features[i], {name: value[i] for name, value in patches.items()}, budget, keep,
                      ids[i], visual=i, token_embeds=None if embeds is None else embeds[i])
            for i in range(n_images)
        ]
        kept = [grid.features for grid in self.select_grids(session, grids, n_images)]
        if session.method.keeps_cls:
            cls = self.cls_tokens(out.hidden_states)
            kept = [torch.cat([cls[i : i + 1], tokens]) for i, tokens in enumerate(kept)]
        return kept
