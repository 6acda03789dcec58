"""Model inputs for LLaVA-family checkpoints, as the official LLaVA-1.5 evaluation builds them (default) or as HF does.

official ("vicuna_v1"):
  - prompt  = "<system> USER: <image>\\n<question> ASSISTANT:" (LLaVA's conv_vicuna_v1, separator " "), the system
    prompt "A chat between a curious user ... the user's questions." that LLaVA-1.5's and LLaVA-NeXT's evaluation
    scripts use (``--conv-mode vicuna_v1``); "llava_v1" is the same conversation with LLaVA's conv_llava_v1 wording
    ("curious human ... the human's questions"), which Video-LLaVA evaluates with and the models trained here
    (models/scene-llava, the tiny assets) were trained with;
  - tokens  = each text chunk around an ``<image>`` placeholder tokenised on its own (BOS kept only on the first),
    the placeholder replaced by the image's visual tokens: what LLaVA's chunk-wise tokenisation does, which differs
    from tokenising the whole string (e.g. the newline after the image becomes its own word-initial piece);
  - images  = padded to square with the image mean colour, then resized (LlavaImageProcessor with do_pad=True), by
    the PIL backend like the original CLIPImageProcessor.
hf ("hf_chat"): the checkpoint's own chat template; with image_backend="checkpoint" also its own image processor
(HF's llava-1.5 processors centre-crop instead of padding).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.models.llava.image_processing_llava import LlavaImageProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
# LLaVA's conv_vicuna_v1 (LLaVA-1.5 / LLaVA-NeXT evaluation) and conv_llava_v1: the same two-separator conversation
# (roles USER / ASSISTANT, separator " "), only the system prompt differs
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CONVERSATION_SYSTEMS = {"vicuna_v1": VICUNA_V1_SYSTEM, "llava_v1": LLAVA_V1_SYSTEM}
PROMPT_STYLES = (*CONVERSATION_SYSTEMS, "hf_chat")
IMAGE_BACKENDS = ("pil", "torchvision", "checkpoint")  # checkpoint: the processor as saved, as is


def conversation_prompt(question: str, style: str = "vicuna_v1") -> str:
    """LLaVA's conversation ``style`` (conv_vicuna_v1 / conv_llava_v1): one user turn and an open assistant turn."""
    if style not in CONVERSATION_SYSTEMS:
        raise ValueError(f"unknown conversation {style!r}; choose one of {tuple(CONVERSATION_SYSTEMS)}")
    return f"{CONVERSATION_SYSTEMS[style]} USER: {question} ASSISTANT:"


def with_image_placeholders(context: str, n_images: int) -> str:
    """Put one placeholder per image before the question unless the task already placed them (LLaVA's rule)."""
    if n_images == 0 or IMAGE_PLACEHOLDER in context:
        return context
    return " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context


def tokenize_with_images(tokenizer, prompt: str, image_token_id: int, tokens_per_image: int) -> list[int]:
    """Tokenise the text between placeholders chunk by chunk and splice in ``tokens_per_image`` image tokens."""
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for position, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        piece = tokenizer(chunk).input_ids
        if position > 0:
            if bos is not None and piece and piece[0] == bos:
                piece = piece[1:]
            ids.extend([image_token_id] * tokens_per_image)
        ids.extend(piece)
    return ids


def tokenize_with_visuals(tokenizer, prompt: str, fills: Sequence[tuple[str, int, int]]) -> list[int]:
    """LLaVA's chunk-wise tokenisation with a token count per placeholder.

    ``fills`` has one (placeholder, token id, count) per placeholder occurrence of ``prompt``, in order: each text
    chunk is tokenised on its own (BOS kept only on the first) and each placeholder becomes ``count`` copies of its
    token id.
    """
    parts = _PLACEHOLDERS.split(prompt)
    chunks, placeholders = parts[0::2], parts[1::2]
    if [p for p, _, _ in fills] != placeholders:
        raise ValueError(f"prompt placeholders {placeholders} do not match the visuals {[p for p, _, _ in fills]}")
    bos = tokenizer.bos_token_id
    ids: list[int] = list(tokenizer(chunks[0]).input_ids)
    for (_, token_id, count), chunk in zip(fills, chunks[1:]):
        ids.extend([token_id] * count)
        piece = tokenizer(chunk).input_ids
        if bos is not None and piece and piece[0] == bos:
            piece = piece[1:]
        ids.extend(piece)
    return ids


def fill_placeholders(text: str, fills: Sequence[tuple[str, str, int]]) -> str:
    """Replace the placeholders of ``text`` in order: fills = (placeholder, token string, count) per occurrence."""
    parts = _PLACEHOLDERS.split(text)
    chunks, placeholders = parts[0::2], parts[1::2]
    if [p for p, _, _ in fills] != placeholders:
        raise ValueError(f"prompt placeholders {placeholders} do not match the visuals {[p for p, _, _ in fills]}")
    out = [chunks[0]]
    for (_, token, count), chunk in zip(fills, chunks[1:]):
        out.extend([token * count, chunk])
    return "".join(out)


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode (L, RGBA, P, I;16 ...). 16-bit greyscale is scaled to 8 bits, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray((values / top * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def llava_prompt(processor, prompt_style: str, context: str, n_images: int) -> str:
    """A LLaVA-family prompt: a conversation template of the official code (``CONVERSATION_SYSTEMS``) or the
    processor's chat template (``prompt_style="hf_chat"``), with one image placeholder per image."""
    if prompt_style in CONVERSATION_SYSTEMS:
        return conversation_prompt(with_image_placeholders(context, n_images), prompt_style)
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@dataclass
class LlavaInputBuilder:
    """Turns (question, images) pairs into a left-padded batch for a LLaVA-family model."""

    processor: object
    prompt_style: str = "vicuna_v1"
    image_backend: str = "pil"
    pad_to_square: bool = True

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {self.prompt_style!r}; choose one of {PROMPT_STYLES}")
        if self.image_backend not in IMAGE_BACKENDS:
            raise ValueError(f"unknown image_backend {self.image_backend!r}; choose one of {IMAGE_BACKENDS}")
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = self.processor.image_token_id
        self.image_processor = self._make_image_processor()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _make_image_processor(self):
        if self.image_backend == "checkpoint":
            return self.processor.image_processor
        cls = LlavaImageProcessorPil if self.image_backend == "pil" else LlavaImageProcessor
        settings = {
            k: getattr(self.processor.image_processor, k)
            for k in ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop", "do_resize")
            if getattr(self.processor.image_processor, k, None) is not None
        }
        return cls(**settings, do_pad=self.pad_to_square)

    def prompt(self, context: str, n_images: int) -> str:
        return llava_prompt(self.processor, self.prompt_style, context, n_images)

    def __call__(self, contexts: Sequence[str], images: Sequence[Sequence[Image.Image]], tokens_per_image: int) -> dict:
        if len(contexts) != len(images):
            raise ValueError(f"{len(contexts)} prompts but {len(images)} image lists")
        sequences = []
        for context, sample_images in zip(contexts, images):
            prompt = self.prompt(context, len(sample_images))
            n_placeholders = prompt.count(IMAGE_PLACEHOLDER)
            if n_placeholders != len(sample_images):
                raise ValueError(f"prompt has {n_placeholders} image placeholders but the sample has {len(sample_images)} images")
            if self.prompt_style in CONVERSATION_SYSTEMS:
                sequences.append(tokenize_with_images(self.tokenizer, prompt, self.image_token_id, tokens_per_image))
            else:
                text = prompt.replace(IMAGE_PLACEHOLDER, self.processor.image_token * tokens_per_image)
                sequences.append(self.tokenizer(text).input_ids)
        input_ids, attention_mask = left_pad(sequences, self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        flat = [to_rgb(image) for sample_images in images for image in sample_images]
        if flat:
            batch["pixel_values"] = self.image_processor(flat, return_tensors="pt")["pixel_values"]
        return batch
