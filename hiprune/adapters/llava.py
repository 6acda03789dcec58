"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``): prune after the projector, before the LLM.

transformers expands every ``<image>`` placeholder into one token per visual feature and scatters the projected
features into those positions. The adapter wraps ``LlavaModel.get_image_features`` so that it returns only the kept
features (raster order), and makes the processor emit exactly that many placeholders. The LLM then sees a plain,
shorter sequence: HF's own generate, KV cache, left padding and contiguous position ids (the official LLaVA
behaviour) work unchanged, and a count mismatch is caught by HF's own placeholder check.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from hiprune.adapters.base import (
    GridRecord,
    PruningError,
    PruningSession,
    patch_attribute,
    register_adapter,
    stable_ids,
)
from hiprune.adapters.clip_tower import ClipTowerAdapter
from hiprune.capture import AttentionScores
from hiprune.methods.base import Method, VisionTokens, resolve_budget


@register_adapter
class LlavaAdapter(ClipTowerAdapter):
    family = "llava"
    model_types = (LlavaForConditionalGeneration,)

    def tokens_per_image(self, method: Method) -> int:
        if method.stage != "vision":
            return self.num_patches()
        return method.kept_count(resolve_budget(method.budget, self.num_patches()))

    # --- installation --------------------------------------------------------------------------------------
    def install(self, stack: ExitStack, session: PruningSession, processor: Any | None) -> None:
        method = session.method
        layers = self.resolve_layers(method)
        budget = resolve_budget(method.budget, self.num_patches()) if method.stage == "vision" else None
        keep = self.tokens_per_image(method)  # validates the budget against the grid before anything runs
        original = self.inner.get_image_features  # bound method of the class

        def get_image_features(pixel_values: torch.Tensor, *args, **kwargs):
            if method.stage != "vision":
                out = original(pixel_values, *args, **kwargs)
                n = self.num_patches()
                session.records.append([GridRecord(n, n, None) for _ in out.pooler_output])
                return out
            modules = {name: self.attention_module(layer) for name, layer in layers.items()}
            with AttentionScores(modules, method.score_queries()) as capture:
                out = original(pixel_values, *args, **kwargs)
                scores = capture.collect() if modules else {}
            out.pooler_output = self._select(session, out, scores, pixel_values, budget, keep)
            return out

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        if processor is not None:
            self._patch_processor(stack, processor, keep)

    def _select(self, session, out, scores, pixel_values, budget, keep):
        features = torch.stack(list(out.pooler_output))  # [B, N, D]
        n_images, n_tokens = features.shape[:2]
        if n_tokens != self.num_patches():
            raise PruningError(f"expected {self.num_patches()} visual tokens per image, got {n_tokens}")
        grid_scores = {}
        for name, s in scores.items():
            if s.shape != (n_images, n_tokens + 1):
                raise PruningError(f"score {name!r} has shape {tuple(s.shape)}, expected ({n_images}, {n_tokens + 1})")
            if not torch.isfinite(s).all():
                raise PruningError(f"attention score {name!r} contains NaN or inf")
            grid_scores[name] = s[:, 1:]  # drop the CLS key column
        tokens = VisionTokens(features=features, grid=self.grid, scores=grid_scores, sample_ids=stable_ids(pixel_values))
        if session.method.needs_prompt:
            tokens.prompt_embeds = session.prompt_encoder.encode_prompts(session.take_prompts(n_images))
            tower = self.inner.vision_tower
            tokens.token_embeds = session.prompt_encoder.encode_patches(out.last_hidden_state, tower.post_layernorm)
        selection = session.method.select(tokens, budget)
        if selection.indices.shape != (n_images, keep) or selection.features.shape[:2] != (n_images, keep):
            raise PruningError(
                f"method {session.method.name!r} returned {tuple(selection.indices.shape)} indices and features "
                f"{tuple(selection.features.shape)}; expected {keep} tokens for each of {n_images} images"
            )
        session.last_selection = selection
        indices = selection.indices.detach().cpu()
        session.records.append([GridRecord(n_tokens, keep, row) for row in indices])
        return list(selection.features)

    def _patch_processor(self, stack: ExitStack, processor: Any, keep: int) -> None:
        if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_token"):
            raise TypeError(f"cannot set the image token count of {type(processor).__name__}")

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            return processor.image_token * keep

        patch_attribute(stack, processor, "replace_image_token", replace_image_token)
