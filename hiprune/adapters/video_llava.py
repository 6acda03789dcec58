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
    GridInput,
    PruningError,
    PruningSession,
    derived_id,
    patch_attribute,
    register_adapter,
    split_budget,
    stable_ids,
)
from hiprune.adapters.clip_tower import ClipTowerAdapter
from hiprune.adapters.llm_pruning import check_llm_method, install_decoder_drop
from hiprune.methods.base import Method

DEFAULT_FRAMES = 8  # Video-LLaVA samples 8 frames per video


@register_adapter
class VideoLlavaAdapter(ClipTowerAdapter):
    family = "video_llava"
    model_types = (VideoLlavaForConditionalGeneration,)
    stages = ("none", "vision", "encoder", "llm")  # llm: hiprune.adapters.llm_pruning, an image or a whole video
    passes_cls = True  # methods with keeps_cls: images get their CLS in front; video frames carry it anyway

    def __init__(self, model: VideoLlavaForConditionalGeneration, num_frames: int = DEFAULT_FRAMES):
        super().__init__(model)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        self.num_frames = num_frames  # frames tokens_per_image assumes for a video (each input has its own count)

    # --- encoder description (two towers with one vision_config) --------------------------------------------
    def vision_tower(self, tower: str = "image"):
        return self.inner.image_tower if tower == "image" else self.inner.video_tower

    def describe_encoder(self) -> dict[str, Any]:
        return {**super().describe_encoder(), "grids_per_image": f"1; a video: one per frame ({self.num_frames})",
                "cls": "images: dropped from the grid; video frames: kept in front of each frame, not counted"}

    # --- budgets -------------------------------------------------------------------------------------------
    def image_budget(self, method: Method) -> int:
        """The method's budget for one image grid."""
        return split_budget(method.budget, [self.num_patches()])[0]

    def frame_budget(self, method: Method, num_frames: int) -> int:
        """The method's budget for one frame of a video of ``num_frames`` frames: int(N' / frames), or a ratio."""
        frames = [self.num_patches()] * num_frames
        return split_budget(method.budget, frames, "frame", "equal", "a video's budget is split over its frames")[0]

    def _kept(self, method: Method, budget: int) -> int:
        keep = method.kept_count(budget)
        if keep > self.num_patches():
            raise ValueError(f"method {method.name!r} keeps {keep} tokens of a grid with only {self.num_patches()}")
        return keep

    def image_tokens(self, method: Method) -> int:
        """Visual tokens the LLM receives per image."""
        if method.stage not in ("vision", "encoder"):
            return self.num_patches()
        cls = 1 if method.stage == "vision" and method.keeps_cls else 0  # video frames carry their CLS anyway
        return self._kept(method, self.image_budget(method)) + cls

    def frame_tokens(self, method: Method, num_frames: int) -> int:
        """Patch tokens the LLM receives per frame (the frame's CLS comes on top)."""
        if method.stage not in ("vision", "encoder"):
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

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        if method.stage != "llm":
            super().check_supported(method, prompt_encoder)
            return
        # one visual of the drop schedule: an image (256 tokens) or a whole video (frames x (CLS + 256))
        try:
            check_llm_method(method, self.config.text_config, self.family, self.num_patches())
        except ValueError as image_error:
            try:
                check_llm_method(method, self.config.text_config, self.family, self.video_tokens(method, self.num_frames))
            except ValueError as video_error:
                raise ValueError(f"{image_error} (images); {video_error} (videos of {self.num_frames} frames)") from None

    # --- installation --------------------------------------------------------------------------------------
    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        method = session.method
        if method.stage != "llm":
            self.tokens_per_image(method)  # validates the budget before anything is patched
        original_image = self.inner.get_image_features
        original_video = self.inner.get_video_features
        merging = {tower: self.install_merging(stack, session, tower) for tower in ("image", "video")} \
            if method.stage == "encoder" else None

        # generate() picks this function's inputs by the names in its signature: both spellings must be there.
        def get_image_features(pixel_values: torch.Tensor | None = None, pixel_values_images: torch.Tensor | None = None,
                               *args, **kwargs):
            if pixel_values is None:
                pixel_values = pixel_values_images
            if merging is not None:
                merging["image"].expect(self.image_budget(method))
                out = original_image(pixel_values, *args, **kwargs)
                self._record_merged(session, merging["image"], out.pooler_output, "image")
                return out
            with self.capture(method, "image") as capture:
                out = original_image(pixel_values, *args, **kwargs)
                captured = capture.collect()
            features = out.pooler_output  # [B, 256, D]
            self._check(features, features.shape[0], "image")
            if method.stage != "vision":
                self.record_unpruned(session, [self.num_patches()] * features.shape[0], "image")
                return out
            out.pooler_output = self._select(
                session, features, captured, stable_ids(pixel_values), self.image_budget(method),
                out, "image", visuals=list(range(features.shape[0])),
            )
            if method.keeps_cls:  # CLS in front, as video frames have it
                out.pooler_output = torch.cat([self.cls_tokens(out.hidden_states)[:, None], out.pooler_output], dim=1)
            return out

        def get_video_features(pixel_values_videos: torch.Tensor, *args, **kwargs):
            videos, frames = pixel_values_videos.shape[:2]
            if merging is not None:
                merging["video"].expect(self.frame_budget(method, frames))
                out = original_video(pixel_values_videos, *args, **kwargs)
                self._record_merged(session, merging["video"], out.pooler_output[:, 1:], "video")  # CLS in front
                return out
            with self.capture(method, "video") as capture:
                out = original_video(pixel_values_videos, *args, **kwargs)
                captured = capture.collect()
            features = out.pooler_output  # [videos * frames, 1 + 256, D]: CLS first
            self._check(features[:, 1:], videos * frames, "video")
            if method.stage != "vision":
                self.record_unpruned(session, [self.num_patches()] * (videos * frames), "video")
                return out
            ids = [
                derived_id(video_id, f)
                for video_id in stable_ids(pixel_values_videos.reshape(videos, -1))
                for f in range(frames)
            ]
            selected = self._select(
                session, features[:, 1:], captured, ids, self.frame_budget(method, frames), out,
                "video", visuals=[v for v in range(videos) for _ in range(frames)],
            )
            out.pooler_output = torch.cat([features[:, :1], selected], dim=1)  # CLS, then kept patches
            return out

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        patch_attribute(stack, self.inner, "get_video_features", get_video_features)
        if method.stage == "llm":  # an image or a whole video (its frames, CLS included) is one visual
            install_decoder_drop(stack, session, self.inner, self.inner.language_model,
                                 [self.config.image_token_id, self.config.video_token_id],
                                 visual_inputs=("pixel_values", "pixel_values_images", "pixel_values_videos"))

    def placeholder_counts(self, method: Method) -> dict:
        return {
            "image": lambda inputs, index: self.image_tokens(method),
            "video": lambda inputs, index: self.video_tokens(method, len(inputs["pixel_values_videos"][index])),
        }

    def _record_merged(self, session, merging, features: torch.Tensor, kind: str) -> None:
        outputs = merging.finish()
        for output, row in zip(outputs, features):
            output.features = row
        self.record_outputs(session, [self.num_patches()] * len(outputs), outputs, kind)

    def _check(self, features: torch.Tensor, rows: int, kind: str) -> None:
        n = self.num_patches()
        if features.dim() != 3 or features.shape[:2] != (rows, n):
            raise PruningError(f"expected {kind} features [{rows}, {n}, D], got {tuple(features.shape)}")

    def _select(self, session, features, captured, ids, budget, tower_out, kind, visuals) -> torch.Tensor:
        """Every image or frame is one grid; frames of a video share its prompt (``visuals``: row -> visual)."""
        method = session.method
        keep = method.kept_count(budget)
        patches = self.patch_captures(captured, features.shape[0], kind)
        embeds = self.patch_embeds(session, tower_out, kind) if method.needs_prompt else None
        grids = [
            GridInput(self.grid, features[r], {name: value[r] for name, value in patches.items()}, budget, keep,
                      ids[r], visual=visuals[r], token_embeds=None if embeds is None else embeds[r])
            for r in range(features.shape[0])
        ]
        outputs = self.select_grids(session, grids, max(visuals) + 1, kind, tower=kind)
        return torch.stack([o.features for o in outputs])
