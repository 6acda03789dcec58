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

import inspect
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
    select_checked,
    stable_ids,
)
from hiprune.adapters.clip_tower import ClipTowerAdapter
from hiprune.adapters.llm_pruning import VisualTokenDrop, check_llm_method
from hiprune.capture import AttentionScores
from hiprune.methods.base import Method, VisionTokens, resolve_budget


@register_adapter
class LlavaAdapter(ClipTowerAdapter):
    family = "llava"
    model_types = (LlavaForConditionalGeneration,)
    stages = ("none", "vision", "llm")  # LLM-side methods (FastV) through hiprune.adapters.llm_pruning

    def tokens_per_image(self, method: Method) -> int:
        if method.stage == "llm":
            resolve_budget(method.budget, self.num_patches())  # validates the budget against the grid
        if method.stage != "vision":
            return self.num_patches()  # the LLM's input holds every visual token; LLM-side methods drop them later
        return method.kept_count(resolve_budget(method.budget, self.num_patches()))

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        if method.stage != "llm":
            super().check_supported(method, prompt_encoder)
            return
        check_llm_method(method, self.config.text_config, self.family, self.num_patches())

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
        if method.stage == "llm":
            self._install_llm_pruning(stack, session)
        if processor is not None:
            self._patch_processor(stack, processor, keep)

    def _install_llm_pruning(self, stack: ExitStack, session: PruningSession) -> None:
        drop = VisualTokenDrop(session, self.inner.language_model.layers, self.num_patches())
        drop.install(stack)
        original = self.inner.forward  # bound method of the class
        signature = inspect.signature(original)
        image_token_id = self.config.image_token_id

        def forward(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            input_ids, inputs_embeds = bound.get("input_ids"), bound.get("inputs_embeds")
            images = bound.get("pixel_values") is not None or bound.get("mm_encoder_outputs") is not None
            if input_ids is not None and images:  # a decode step may generate the image token's id: not an image
                image_mask = input_ids == image_token_id
            elif inputs_embeds is not None and images:  # HF's own rule: placeholders hold the image token's embedding
                token = torch.tensor(image_token_id, device=inputs_embeds.device)
                image_mask = (inputs_embeds == self.inner.get_input_embeddings()(token)).all(-1)
            else:
                image_mask = None
                extra = bound.get("kwargs") or {}
                cache = bound.get("cache", extra.get("past_key_values"))
                prefill = cache is None or cache.get_seq_length() == 0
                if inputs_embeds is not None and inputs_embeds.shape[1] > 1 and prefill:
                    # Embeddings with the image features already scattered in: nothing says where the images are,
                    # and running unpruned would be a silent fallback.
                    raise PruningError(
                        f"{session.method.name} needs input_ids (or pixel_values with placeholder embeddings) to "
                        "locate the image tokens; a prefill from pre-merged inputs_embeds cannot be pruned"
                    )
            with drop.forward(image_mask, bound.get("attention_mask")):
                return original(*args, **kwargs)

        patch_attribute(stack, self.inner, "forward", forward)

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
        selection = select_checked(session.method, tokens, budget, keep, "images")
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
