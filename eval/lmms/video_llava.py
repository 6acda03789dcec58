"""lmms-eval model class ``hiprune_video_llava``: an HF Video-LLaVA checkpoint with any harness method installed.

    python -m lmms_eval --model hiprune_video_llava \\
        --model_args pretrained=LanguageBind/Video-LLaVA-7B-hf,method=hiprune,budget=0.334 --tasks mvbench

Visuals may be images (PIL) or videos (a file path, as lmms-eval's video tasks pass them, e.g. MVBench). A video is
read with decord and ``num_frames`` frames (default 8, Video-LLaVA's) are sampled uniformly over it
(``np.linspace(0, frames - 1, num_frames)``, as the original Video-LLaVA and lmms-eval's ``load_video_decord``).
Prompt (default): Video-LLaVA's ``llava_v1`` conversation (Vicuna v1 format, "curious human" system prompt), LLaVA's
chunk-wise tokenisation, one ``<image>`` / ``<video>`` placeholder per visual before the question; HF's layout for a video:
one ``<video>`` placeholder expanded to frames x (kept patches + CLS) tokens. Images are padded to a square with
the mean colour before the processor (Video-LLaVA's ``image_aspect_ratio='pad'``) unless ``pad_to_square=false``.

Pruning (hiprune/adapters/video_llava.py): an image keeps N' tokens of its 16 x 16 grid; a video's budget is split
over its frames, int(N' / frames) per frame (a float budget is a ratio of each grid), and every frame keeps its CLS
token on top. The expected kept tokens per sample list one entry per image grid and one per video frame, in the
sample's visual order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from decord import VideoReader, cpu
from PIL import Image
from transformers import VideoLlavaForConditionalGeneration

from eval.lmms.base import HiPruneLMM
from eval.lmms.prompting import (
    CONVERSATION_SYSTEMS,
    IMAGE_PLACEHOLDER,
    PROMPT_STYLES,
    VIDEO_PLACEHOLDER,
    conversation_prompt,
    fill_placeholders,
    left_pad,
    to_rgb,
    tokenize_with_visuals,
)
from hiprune.adapters.base import PruningError


@dataclass
class VideoClip:
    """A decoded video: uint8 frames [F, H, W, 3] and where it came from."""

    frames: np.ndarray
    source: str = ""


def load_video(path: str, num_frames: int) -> VideoClip:
    """``num_frames`` frames sampled uniformly over the video (decord), as uint8 [F, H, W, 3]."""
    reader = VideoReader(path, ctx=cpu(0), num_threads=1)
    total = len(reader)
    if total < 1:
        raise ValueError(f"video {path} has no frames")
    indices = np.linspace(0, total - 1, num_frames, dtype=int).tolist()
    frames = reader.get_batch(indices).asnumpy()
    del reader
    return VideoClip(frames, path)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: pad the shorter side symmetrically with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


class HiPruneVideoLlava(HiPruneLMM):
    """Video-LLaVA (HF ``VideoLlavaForConditionalGeneration``) on image and video tasks."""

    family = "video_llava"
    kept_unit = "image or video frame"
    default_pretrained = "LanguageBind/Video-LLaVA-7B-hf"
    adapter_option_names = ("num_frames",)
    loading_options = {
        "prompt_style": "llava_v1",  # Video-LLaVA's conversation; vicuna_v1 (LLaVA's wording) | hf_chat (chat template)
        "num_frames": 8,
        "pad_to_square": True,
        # Text tower for prompt-aware methods (HiPrune++); Video-LLaVA's towers are LanguageBind's, whose paired text
        # tower is LanguageBind/LanguageBind_Image (a CLIP-shaped checkpoint; loaded only when a method needs it).
        "text_tower": "LanguageBind/LanguageBind_Image",
        "prompt_pooling": "mean",
    }

    def load(self, pretrained, revision, attn_implementation, prompt_style, num_frames, pad_to_square, text_tower,
             prompt_pooling):
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; choose one of {PROMPT_STYLES}")
        self.num_frames = int(num_frames)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.load_clip_prompt_encoder(text_tower, prompt_pooling)
        model, processor = self.load_pretrained(
            VideoLlavaForConditionalGeneration, pretrained, revision, attn_implementation
        )
        self.prompt_style = prompt_style
        self.pad_to_square = bool(pad_to_square)
        self._batch_visuals: list[list[tuple[str, int]]] = []
        return model, processor

    @property
    def tokens_per_image(self) -> int:
        return self.session.adapter.image_tokens(self.method)

    # --- visuals ------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_ids, task, split):
        per_sample = []
        for fn, doc_id in zip(doc_to_visual, doc_ids):
            visuals = self.doc_visuals(fn, task, split, doc_id)
            sample = []
            for v in visuals or []:
                if v is None:
                    continue
                if isinstance(v, Image.Image):
                    sample.append(v)
                elif isinstance(v, str):
                    sample.append(load_video(v, self.num_frames))
                elif isinstance(v, VideoClip):
                    sample.append(v)
                else:
                    raise TypeError(f"hiprune_video_llava takes images and video paths; doc {doc_id} has a {type(v).__name__}")
            per_sample.append(sample)
        return per_sample

    def _image_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        image_processor = self.processor.image_processor
        images = [to_rgb(image) for image in images]
        if self.pad_to_square:
            background = tuple(round(x * 255) for x in image_processor.image_mean)
            images = [expand_to_square(image, background) for image in images]
        out = image_processor(images, return_tensors="pt")
        return out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]

    # --- inputs -------------------------------------------------------------------------------------------
    def prompt(self, context: str, placeholders: list[str]) -> str:
        if placeholders and IMAGE_PLACEHOLDER not in context and VIDEO_PLACEHOLDER not in context:
            question = " ".join(placeholders) + "\n" + context
        else:
            question = context
        if self.prompt_style in CONVERSATION_SYSTEMS:
            return conversation_prompt(question, self.prompt_style)
        content = [{"type": p.strip("<>")} for p in placeholders] + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def build_inputs(self, contexts, visuals):
        if len(contexts) != len(visuals):
            raise ValueError(f"{len(contexts)} prompts but {len(visuals)} visual lists")
        adapter = self.session.adapter
        method = self.method
        images = [v for sample in visuals for v in sample if isinstance(v, Image.Image)]
        videos = [v for sample in visuals for v in sample if isinstance(v, VideoClip)]
        batch: dict[str, torch.Tensor] = {}
        if images:
            batch["pixel_values"] = self._image_pixels(images)
        if videos:
            lengths = {len(v.frames) for v in videos}
            if len(lengths) != 1:
                raise ValueError(f"videos of one batch must have the same number of frames, got {sorted(lengths)}")
            batch["pixel_values_videos"] = self.processor.video_processor(
                videos=[v.frames for v in videos], return_tensors="pt"
            )["pixel_values_videos"]
        image_tokens = adapter.image_tokens(method) if images else 0
        sequences, expected, self._batch_visuals = [], [], []
        for context, sample in zip(contexts, visuals):
            fills, kept, layout = [], [], []
            for v in sample:
                if isinstance(v, Image.Image):
                    fills.append((IMAGE_PLACEHOLDER, image_tokens))
                    kept.append(image_tokens)
                    layout.append(("image", 1))
                else:
                    frames = len(v.frames)
                    fills.append((VIDEO_PLACEHOLDER, adapter.video_tokens(method, frames)))
                    kept.extend([adapter.frame_tokens(method, frames)] * frames)
                    layout.append(("video", frames))
            prompt = self.prompt(context, [p for p, _ in fills])
            if self.prompt_style in CONVERSATION_SYSTEMS:
                ids = {IMAGE_PLACEHOLDER: self.processor.image_token_id, VIDEO_PLACEHOLDER: self.processor.video_token_id}
                sequences.append(tokenize_with_visuals(self.tokenizer, prompt, [(p, ids[p], n) for p, n in fills]))
            else:
                tokens = {IMAGE_PLACEHOLDER: self.processor.image_token, VIDEO_PLACEHOLDER: self.processor.video_token}
                text = fill_placeholders(prompt, [(p, tokens[p], n) for p, n in fills])
                sequences.append(self.tokenizer(text).input_ids)
            expected.append(kept)
            self._batch_visuals.append(layout)
        batch["input_ids"], batch["attention_mask"] = left_pad(sequences, self.pad_token_id)
        return batch, expected

    def _log_kept_tokens(self, task, split, doc_ids, expected) -> None:
        """The model encodes all images of a batch, then all videos: put the records back in sample order."""
        records = self.session.pop_records()
        by_kind = {"image": [], "video": []}
        for forward in records:
            kind = getattr(forward, "kind", None)
            if kind not in by_kind:
                raise PruningError(f"a tower call recorded grids of unknown kind {kind!r}")
            by_kind[kind].extend(forward)
        ordered, cursor = [], {"image": 0, "video": 0}
        for sample in self._batch_visuals:
            for kind, n in sample:
                ordered.extend(by_kind[kind][cursor[kind] : cursor[kind] + n])
                cursor[kind] += n
        for kind, grids in by_kind.items():
            if cursor[kind] != len(grids):
                raise PruningError(f"{len(grids)} {kind} grids went through the method, {cursor[kind]} expected")
        self.session.records = [ordered]
        super()._log_kept_tokens(task, split, doc_ids, expected)
