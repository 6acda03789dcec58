"""Video-LLaVA (``transformers.VideoLlavaForConditionalGeneration``): images and videos, pruned frame by frame.

Video-LLaVA has two CLIP-L/14 towers of the same shape (LanguageBind image and video encoders, 224 px -> 16 x 16
patches), one projector and a Vicuna LLM. As for LLaVA-1.5, pruning happens after the projector and before the LLM:
the adapter wraps ``get_image_features`` and ``get_video_features`` so that they return only the kept tokens, and
makes the processor emit exactly that many ``<image>`` / ``<video>`` tokens. HF's generate, KV cache, left padding
and contiguous position ids then work unchanged.

images -- one 16 x 16 grid per image (the CLS token is dropped by ``vision_feature_select_strategy='default'``, as
    in LLaVA-1.5): the method keeps N' tokens (a float budget: round(256 * ratio)); scores come from the image tower.
videos -- every frame is one 16 x 16 grid, selected on its own with the budget split over the frames:
    int(N' / frames) patch tokens per frame (a float budget: round(256 * ratio) per frame); scores come from the
    video tower. Video frames carry their CLS token into the LLM (HF and the original Video-LLaVA keep all 257
    tokens of a frame); it is not on the grid, so it is always kept, in front of the frame's kept patches, and not
    counted in the budget. The LLM receives frames x (int(N' / frames) + 1) video tokens, frame after frame.

Kept-token records (``session.records``): one list per tower call, one ``GridRecord`` per image or per frame (video
frames in video order, then frame order); each list carries ``kind`` = "image" or "video". ``tokens_per_image``
answers for an image when the budget fits one, else for a video of ``num_frames`` frames (adapter option ``num_frames``).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from transformers import VideoLlavaForConditionalGeneration

from hiprune.adapters.base import (
    GridRecord,
    PruningError,
    PruningSession,
    derived_id,
    patch_attribute,
    register_adapter,
    select_checked,
    stable_ids,
)
from hiprune.adapters.clip_tower import ClipTowerAdapter
from hiprune.capture import AttentionScores
from hiprune.methods.base import Method, VisionTokens, resolve_budget

DEFAULT_FRAMES = 8  # Video-LLaVA samples 8 frames per video


class Forward(list):
    """The GridRecords of one tower call; ``kind`` says which tower ("image" or "video")."""

    def __init__(self, kind: str, records):
        super().__init__(records)
        self.kind = kind


@register_adapter
class VideoLlavaAdapter(ClipTowerAdapter):
    family = "video_llava"
    model_types = (VideoLlavaForConditionalGeneration,)

    def __init__(self, model: VideoLlavaForConditionalGeneration, num_frames: int = DEFAULT_FRAMES):
        super().__init__(model)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        self.num_frames = num_frames  # frames tokens_per_image assumes for a video (each input has its own count)

    # --- encoder description (two towers with one vision_config) --------------------------------------------
    def vision_tower(self, kind: str = "image"):
        return self.inner.image_tower if kind == "image" else self.inner.video_tower

    def attention_module(self, layer: int, kind: str = "image"):
        return self.encoder_layers(self.vision_tower(kind))[layer - 1].self_attn

    def describe_encoder(self) -> dict[str, Any]:
        return {**super().describe_encoder(), "grids_per_image": f"1; a video: one per frame ({self.num_frames})",
                "cls": "images: dropped from the grid; video frames: kept in front of each frame, not counted"}

    # --- budgets -------------------------------------------------------------------------------------------
    def image_budget(self, method: Method) -> int:
        """The method's budget for one image grid."""
        return resolve_budget(method.budget, self.num_patches())

    def frame_budget(self, method: Method, num_frames: int) -> int:
        """The method's budget for one frame of a video of ``num_frames`` frames: int(N' / frames), or a ratio."""
        budget = method.budget
        if isinstance(budget, float):
            return resolve_budget(budget, self.num_patches())
        per_frame = int(budget) // num_frames
        if per_frame < 1:
            raise ValueError(
                f"budget {budget} gives int({budget} / {num_frames} frames) = 0 tokens per frame; the budget of a "
                f"video is split over its frames, so use at least {num_frames}"
            )
        if per_frame > self.num_patches():
            raise ValueError(
                f"budget {budget} asks for int({budget} / {num_frames} frames) = {per_frame} tokens per frame but a "
                f"frame has only {self.num_patches()}"
            )
        return per_frame

    def _kept(self, method: Method, budget: int) -> int:
        keep = method.kept_count(budget)
        if keep > self.num_patches():
            raise ValueError(f"method {method.name!r} keeps {keep} tokens of a grid with only {self.num_patches()}")
        return keep

    def image_tokens(self, method: Method) -> int:
        """Visual tokens the LLM receives per image."""
        if method.stage != "vision":
            return self.num_patches()
        return self._kept(method, self.image_budget(method))

    def frame_tokens(self, method: Method, num_frames: int) -> int:
        """Patch tokens the LLM receives per frame (the frame's CLS comes on top)."""
        if method.stage != "vision":
            return self.num_patches()
        return self._kept(method, self.frame_budget(method, num_frames))

    def video_tokens(self, method: Method, num_frames: int) -> int:
        """Visual tokens the LLM receives per video: frames x (kept patches + CLS)."""
        return num_frames * (self.frame_tokens(method, num_frames) + 1)

    def tokens_per_image(self, method: Method) -> int:
        """Tokens per image if the budget fits an image (int <= 256 or a ratio), else per video of ``num_frames``
        frames; a budget that fits neither is an error naming both limits."""
        try:
            return self.image_tokens(method)
        except ValueError as image_error:
            try:
                return self.video_tokens(method, self.num_frames)
            except ValueError as video_error:
                raise ValueError(f"{image_error} (images); {video_error} (videos)") from None

    # --- installation --------------------------------------------------------------------------------------
    def install(self, stack: ExitStack, session: PruningSession, processor: Any | None) -> None:
        method = session.method
        layers = self.resolve_layers(method) if method.stage == "vision" else {}
        self.tokens_per_image(method)  # validates the budget before anything is patched
        original_image = self.inner.get_image_features
        original_video = self.inner.get_video_features

        # generate() picks this function's inputs by the names in its signature: both spellings must be there.
        def get_image_features(pixel_values: torch.Tensor | None = None, pixel_values_images: torch.Tensor | None = None,
                               *args, **kwargs):
            if pixel_values is None:
                pixel_values = pixel_values_images
            modules = {name: self.attention_module(layer, "image") for name, layer in layers.items()}
            with AttentionScores(modules, method.score_queries()) as capture:
                out = original_image(pixel_values, *args, **kwargs)
                scores = capture.collect() if modules else {}
            features = out.pooler_output  # [B, 256, D]
            grids = self._check(features, scores, features.shape[0], "image")
            if method.stage != "vision":
                session.records.append(Forward("image", [GridRecord(grids, grids, None)] * features.shape[0]))
                return out
            ids = stable_ids(pixel_values)
            budget = self.image_budget(method)
            selected, records = self._select(session, features, scores, ids, budget, out.last_hidden_state, "image",
                                             prompts_per_row=list(range(features.shape[0])))
            session.records.append(Forward("image", records))
            out.pooler_output = selected
            return out

        def get_video_features(pixel_values_videos: torch.Tensor, *args, **kwargs):
            videos, frames = pixel_values_videos.shape[:2]
            modules = {name: self.attention_module(layer, "video") for name, layer in layers.items()}
            with AttentionScores(modules, method.score_queries()) as capture:
                out = original_video(pixel_values_videos, *args, **kwargs)
                scores = capture.collect() if modules else {}
            features = out.pooler_output  # [videos * frames, 1 + 256, D]: CLS first
            grids = self._check(features[:, 1:], scores, videos * frames, "video")
            if method.stage != "vision":
                session.records.append(Forward("video", [GridRecord(grids, grids, None)] * (videos * frames)))
                return out
            ids = [
                derived_id(video_id, f)
                for video_id in stable_ids(pixel_values_videos.reshape(videos, -1))
                for f in range(frames)
            ]
            budget = self.frame_budget(method, frames)
            selected, records = self._select(
                session, features[:, 1:], scores, ids, budget, out.last_hidden_state, "video",
                prompts_per_row=[v for v in range(videos) for _ in range(frames)],
            )
            session.records.append(Forward("video", records))
            out.pooler_output = torch.cat([features[:, :1], selected], dim=1)  # CLS, then kept patches
            return out

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        patch_attribute(stack, self.inner, "get_video_features", get_video_features)
        if processor is not None:
            self._patch_processor(stack, processor, method)

    def _check(self, features: torch.Tensor, scores: dict, rows: int, kind: str) -> int:
        n = self.num_patches()
        if features.dim() != 3 or features.shape[:2] != (rows, n):
            raise PruningError(f"expected {kind} features [{rows}, {n}, D], got {tuple(features.shape)}")
        for name, s in scores.items():
            if s.shape != (rows, n + 1):
                raise PruningError(f"{kind} score {name!r} has shape {tuple(s.shape)}, expected ({rows}, {n + 1})")
            if not torch.isfinite(s).all():
                raise PruningError(f"attention score {name!r} contains NaN or inf")
        return n

    def _select(self, session, features, scores, ids, budget, last_hidden_state, kind, prompts_per_row):
        method = session.method
        keep = method.kept_count(budget)
        tokens = VisionTokens(
            features=features.contiguous(),
            grid=self.grid,
            scores={name: s[:, 1:] for name, s in scores.items()},  # CLS key column dropped
            sample_ids=ids,
        )
        if method.needs_prompt:  # HiPrune++: every frame is compared with the prompt of its video
            n_visuals = max(prompts_per_row) + 1
            prompts = session.prompt_encoder.encode_prompts(session.take_prompts(n_visuals))
            tokens.prompt_embeds = prompts[prompts_per_row]
            tower = getattr(self.vision_tower(kind), "vision_model", self.vision_tower(kind))
            tokens.token_embeds = session.prompt_encoder.encode_patches(last_hidden_state, tower.post_layernorm)
        selection = select_checked(method, tokens, budget, keep, f"{kind} grids")
        session.last_selection = selection
        indices = selection.indices.detach().cpu()
        return selection.features, [GridRecord(self.num_patches(), keep, row) for row in indices]

    def _patch_processor(self, stack: ExitStack, processor: Any, method: Method) -> None:
        for name in ("replace_image_token", "replace_video_token", "image_token", "video_token"):
            if not hasattr(processor, name):
                raise TypeError(f"cannot set the image / video token counts of {type(processor).__name__}")

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            return processor.image_token * self.image_tokens(method)

        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs) -> str:
            frames = len(video_inputs["pixel_values_videos"][video_idx])
            return processor.video_token * self.video_tokens(method, frames)

        patch_attribute(stack, processor, "replace_image_token", replace_image_token)
        patch_attribute(stack, processor, "replace_video_token", replace_video_token)
