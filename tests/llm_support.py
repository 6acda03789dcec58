"""Helpers the LLM-side tests share: an attention-implementation variant of a model and a single synthetic prompt
with one image's placeholder tokens."""

from __future__ import annotations

import copy

import torch
from PIL import Image

import hiprune


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


def prefill_and_decode(model, method, ids, pixels, steps: int):
    """One cached prefill of ``ids`` / ``pixels`` under ``method`` and ``steps`` greedy decode steps of one sample.

    Returns (session, the sequence length each decoder layer got in the prefill -- seen by pre-hooks registered
    after the plumbing's, so what the layers really ran on --, the prefill's output (logits, cache), the generated
    ids, the logits of every step)."""
    seen: list[int] = []

    def spy(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    with hiprune.apply(model, method) as session, torch.no_grad():
        handles = [layer.register_forward_pre_hook(spy, with_kwargs=True) for layer in model.model.language_model.layers]
        try:
            out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
            prefill_lengths = list(seen)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            generated, decode = [int(token)], [out.logits[0, -1]]
            for _ in range(steps):
                step = model(input_ids=token, cache=cache, use_cache=True)
                decode.append(step.logits[0, -1])
                token = step.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(int(token))
        finally:
            for handle in handles:
                handle.remove()
    return session, prefill_lengths, out, generated, decode
