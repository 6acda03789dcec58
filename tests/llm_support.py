"""Helpers the LLM-side tests share: an attention-implementation variant of a model and a single synthetic prompt
with one image's placeholder tokens."""

from __future__ import annotations

import copy

import torch


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
