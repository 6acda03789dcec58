"""Qwen3-VL (``transformers.Qwen3VLForConditionalGeneration``): prune the merged visual tokens of every image, and
their DeepStack features with them.

Geometry. A full-attention vision encoder (no windows; patch 16, one merged token per 2 x 2 patches = 32 x 32
pixels), whose patches come in merge-unit order: the 4 patches of merged token k are patches 4k .. 4k + 3, merged
tokens in raster order. Besides the merger's output (the LLM's visual input tokens), DeepStack mergers turn the
hidden states of a few vision blocks (``deepstack_visual_indexes``, e.g. 5 / 11 / 17 of 24) into one feature per
merged token each, which the LLM adds to the hidden states of the image's tokens after its first decoder layers.

Everything else is Qwen2.5-VL's (``hiprune.adapters.qwen2_5_vl``): one grid per image of (h/2, w/2) merged tokens, a
budget per image (a ratio of its merged tokens, N' = round(n * ratio), or a count), scores as the mean over each
token's 4 patches, kept tokens in raster order with their original M-RoPE positions (``positions="compact"``: numbered
like text), the processor emitting the kept count. DeepStack: every DeepStack feature list keeps exactly the kept
tokens' rows, in the same order, so the LLM adds each kept token's own features to it (HF places them by the image
token mask, which holds the kept tokens only).

LLM-side methods (FastV, PyramidDrop, SparseVLM: ``hiprune.adapters.llm_pruning``) run as on Qwen2.5-VL: every image
is one visual (a budget per image: a ratio of its merged tokens, or a count, checked before loading on a 1024-token
image and again on every image), every kept token keeps its M-RoPE position, decoding continues from HF's
``rope_deltas``. DeepStack: HF's text model adds ``deepstack_visual_embeds[i]`` at ``visual_pos_masks`` to the output of
decoder layer i for the first len(deepstack) layers (3 on the real checkpoints: after layers 0, 1, 2). After a drop
stage at one of those layers (FastV's default K = 2 is one) the adapter cuts the mask to the kept sequence and the
DeepStack rows to the kept tokens, each keeping its own rows (``VisualTokenDrop.held_rows``); a stage that adds
tokens (SparseVLM's recycling) at or before the last DeepStack layer is refused before loading: a recycled token
stands for several dropped ones and has no DeepStack features of its own. Videos are refused by LLM-side methods.

Videos pass through unpruned (with their own per-frame positions). Refused before loading: methods that read a CLS
token's attention (the encoder has none), TRIM (no paired CLIP text tower; HiPrune++ compares with the LLM's input
embeddings), merging inside the encoder.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from transformers import Qwen3VLForConditionalGeneration

from hiprune.adapters.base import PruningError, PruningSession, patch_attribute, register_adapter
from hiprune.adapters.llm_pruning import VisualTokenDrop, resolve_schedule
from hiprune.adapters.qwen2_5_vl import GRID_ATTRIBUTE, KEPT_ATTRIBUTE, Qwen25VLAdapter
from hiprune.methods.base import Method

# HiPrune's object layer by relative depth: CLIP-L's 9 of 24 layers (the paper's probe) on the vision depth, rounded
# (2B/4B: 9 of 24; 8B: 10 of 27); the deep layer is the last block (the merger's input). Not probed on real weights.
RELATIVE_OBJECT_DEPTH = 9 / 24


@register_adapter
class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"
    model_types = (Qwen3VLForConditionalGeneration,)
    # llm: Qwen2.5-VL's decoder drop, with the DeepStack features cut to the kept tokens
    stages = ("none", "vision", "llm")
    stage_limits = {"encoder": "its 2x2 patch merger and DeepStack mergers read fixed groups of 4 patches, which "
                               "merging inside the encoder would break; use a method that prunes before the LLM"}

    def full_attention_layers(self) -> list[int]:
        return list(range(1, self.num_encoder_layers() + 1))

    def default_object_layer(self) -> int:
        return round(RELATIVE_OBJECT_DEPTH * self.num_encoder_layers())

    def describe_encoder(self) -> dict[str, Any]:
        out = super().describe_encoder()
        out.pop("paper_object_layer")
        return {**out, "deepstack_layers": [i + 1 for i in self.vision_config.deepstack_visual_indexes],
                "default_object_layer": self.default_object_layer()}

    def deepstack_layers(self) -> int:
        """Decoder layers 0 .. n - 1 whose outputs get DeepStack features added (one per DeepStack merger)."""
        return len(self.vision_config.deepstack_visual_indexes)

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        super().check_supported(method, prompt_encoder)
        if method.stage != "llm":
            return
        layers = self.model.config.text_config.num_hidden_layers
        last = self.deepstack_layers() - 1
        for stage in resolve_schedule(method, self.reference_tokens(), layers):
            if stage.added and stage.layer <= last:
                raise ValueError(
                    f"method {method.name!r} adds recycled tokens at decoder layer {stage.layer}, "
                    f"but DeepStack adds every visual token's own features after layers 0..{last}: a recycled token "
                    f"stands for several dropped ones and has none; a stage that adds tokens must come at decoder layer "
                    f"{last + 1} or later"
                )

    # --- captures ------------------------------------------------------------------------------------------
    def merged_captures(self, chunks: list[torch.Tensor] | None, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """A vision block's records (one call per image: [1, T] scores or [1, T, d] keys; or its [P, d] output)
        -> per image [n_i] or [n_i, d] per merged token in raster order: the mean over its 4 patches."""
        if not chunks:
            raise PruningError("the captured vision block did not run in this forward pass")
        flat = [c.reshape(-1) if c.dim() == 2 and c.shape[0] == 1 else c.reshape(-1, *c.shape[-1:]) for c in chunks]
        values = torch.cat(flat)
        n_patches = int(grid_thw.prod(-1).sum())
        if values.shape[0] != n_patches:
            raise PruningError(f"captured {values.shape[0]} patch scores for {n_patches} patches")
        merged = values.view(-1, self.merge**2, *values.shape[1:]).mean(dim=1)  # merge-unit order = raster
        if not torch.isfinite(merged).all():
            raise PruningError("vision attention scores contain NaN or inf")
        return list(torch.split(merged, [self.merged_tokens(g) for g in grid_thw]))

    # --- installation --------------------------------------------------------------------------------------
    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        method = session.method
        inner = self.inner
        unpatched_features = type(inner).get_image_features.__get__(inner)  # also what get_video_features calls

        def get_video_features(pixel_values_videos, video_grid_thw=None, *args, return_dict=None, **kwargs):
            # videos are not pruned; their grids travel with the features (generate() drops video_grid_thw)
            out = unpatched_features(pixel_values_videos, video_grid_thw, *args, return_dict=True, **kwargs)
            setattr(out, GRID_ATTRIBUTE, video_grid_thw)
            return out if return_dict is not False else out.to_tuple()

        if method.stage != "vision":

            def record_only(pixel_values, image_grid_thw=None, *args, **kwargs):
                out = unpatched_features(pixel_values, image_grid_thw, *args, **kwargs)
                self.record_unpruned(session, [self.merged_tokens(g) for g in image_grid_thw])
                return out

            patch_attribute(stack, inner, "get_image_features", record_only)
            patch_attribute(stack, inner, "get_video_features", get_video_features)
            if method.stage == "llm":
                self._install_deepstack_cut(stack, self.install_decoder_drop(stack, session))
            return

        def get_image_features(pixel_values, image_grid_thw=None, *args, return_dict=None, **kwargs):
            if image_grid_thw is None:
                raise PruningError("Qwen3-VL image features need image_grid_thw")
            with self.capture(method) as capture:
                out = unpatched_features(pixel_values, image_grid_thw, *args, return_dict=True, **kwargs)
                captured = {name: self.merged_captures(capture.chunks.get(name), image_grid_thw) for name in capture.names}
            features, kept = self._select(session, list(out.pooler_output), captured, pixel_values, image_grid_thw)
            out.pooler_output = tuple(features)
            # DeepStack: each layer's features of the kept tokens, in the kept order
            out.deepstack_features = [tuple(image[index.to(image.device)] for image, index in zip(layer, kept))
                                      for layer in out.deepstack_features]
            setattr(out, KEPT_ATTRIBUTE, kept)  # per image, kept raster indices into its merged grid
            setattr(out, GRID_ATTRIBUTE, image_grid_thw)  # generate() drops image_grid_thw after encoding
            return out if return_dict is not False else out.to_tuple()

        patch_attribute(stack, inner, "get_image_features", get_image_features)
        self._install_positions(stack)
        patch_attribute(stack, inner, "get_video_features", get_video_features)

    def _install_deepstack_cut(self, stack: ExitStack, drop: VisualTokenDrop) -> None:
        """After a drop stage, HF's DeepStack step gets the image mask of the kept sequence and the kept tokens' rows."""
        language_model = self.inner.language_model
        original = language_model._deepstack_process

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            cut = drop.held_rows(visual_pos_masks, "DeepStack features")
            if cut is not None:
                visual_pos_masks, rows = cut
                visual_embeds = visual_embeds[rows.to(visual_embeds.device)]
            if visual_pos_masks.shape != hidden_states.shape[:2]:
                raise PruningError(f"DeepStack mask of shape {tuple(visual_pos_masks.shape)} for hidden states of "
                                   f"shape {tuple(hidden_states.shape)}")
            return original(hidden_states, visual_pos_masks, visual_embeds)

        patch_attribute(stack, language_model, "_deepstack_process", deepstack_process)

    def rope_index(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw=None, second_per_grid_ts=None,
                   attention_mask=None, kept=None, provisional=False):
        """Qwen2.5-VL's, with Qwen3-VL's videos: one grid per frame (t = 1), frames separated by timestamp text."""
        if video_grid_thw is not None:
            video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
            video_grid_thw[:, 0] = 1
        return super().rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, None, attention_mask,
                                  kept=kept, provisional=provisional)


__all__ = ["Qwen3VLAdapter"]
