"""Helpers the LLM-side tests share: an attention-implementation variant of a model and a single synthetic prompt
with one image's placeholder tokens."""

from __future__ import annotations

import copy

import torch
from PIL import Image


def attention_variant(model, attention):
    """``model`` itself under its own attention implementation, else a deep copy switched to ``attention``."""
    if attention == model.config.text_config._attn_implementation:
        return model
    variant = copy.deepcopy(model)
    variant.set_attn_implementation(attention)
    return variant


def single_input(model, seed=0, before=5, after=7):
    """(input_ids [1, T], pixel_values [1, 3, S, S]): random text around one image's placeholder tokens."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.image_token_id  # text ids below the image token (pad / image ids are the last two)
    ids = torch.cat(
        [
            torch.randint(3, vocab - 1, (before,), generator=g),
            torch.full((model.config.image_seq_length,), model.config.image_token_id),
            torch.randint(3, vocab - 1, (after,), generator=g),
        ]
    )[None]
    size = model.config.vision_config.image_size
    return ids, torch.randn(1, 3, size, size, generator=g)


def noise_images(count: int, size: int = 128) -> list[Image.Image]:
    """``count`` random-noise RGB images, image i seeded with i."""
    images = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        images.append(Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()))
    return images


def greedy_with_scores(model, inputs, steps: int = 5):
    """(generated ids [B, steps], scores [B, steps, V]) of a greedy cached ``generate``."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)
