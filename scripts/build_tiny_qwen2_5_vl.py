#!/usr/bin/env python
"""Build a tiny, random-initialised Qwen2.5-VL checkpoint, fully offline.

The result is a directory loadable with ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` that has the *structure* of Qwen/Qwen2.5-VL-3B-Instruct where it matters for
token pruning, with tiny widths:

- vision tower: patch 14, temporal patch 2, 2x2 spatial merge (one LLM token per 28x28 pixels), windowed attention
  with full-attention blocks (depth 8, ``fullatt_block_indexes`` [3, 7], like [7, 15, 23, 31] of 32), and a window
  of 56 px = 2x2 merged tokens, so an image of a few hundred pixels spans several windows, ragged ones included;
- LLM: Qwen2 decoder with grouped-query attention and M-RoPE (``mrope_section`` [2, 3, 3] of a head dim of 16);
- processor: Qwen2VLImageProcessor (dynamic resolution, ``min_pixels`` / ``max_pixels`` as the real checkpoint),
  a byte-level BPE tokenizer trained here with Qwen's special tokens (``<|im_start|>``, ``<|vision_start|>``,
  ``<|image_pad|>`` ...) and Qwen2.5-VL-Instruct's chat template.

All weights are random (fixed seed), except the output head, which is set so that greedy decoding answers "yes" or
"no" from the image and then stops (as the tiny LLaVA: POPE-style tasks then score something, at chance level).
The directory is ~1.5 MB and a forward pass takes milliseconds on a CPU.

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_qwen2_5_vl [--out DIR] [--seed 0] [--force]

Library use (e.g. from tests)::

    build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen2.5-vl", seed=0)

Like ``build_tiny_llava.py``: written to a temporary sibling directory, verified (reload + ``generate``), renamed into
place; ``build_info.json`` marks a complete build; re-running with the same parameters is a no-op.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from scripts import asset_build
# OpenAI CLIP normalisation, as Qwen2.5-VL's preprocessor_config.json
from scripts.asset_build import CLIP_MEAN, CLIP_STD

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-qwen2.5-vl"

# Bump when the build recipe changes so stale builds are rebuilt automatically.
BUILDER_VERSION = 1

SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen's special tokens, in the checkpoint's order (there: ids 151643..151656).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the Hub checkpoints).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULTS: dict[str, Any] = {
    # vision tower (Qwen2.5-VL geometry: patch 14, merge 2, temporal 2; windowed + full-attention blocks)
    "patch_size": 14,
    "vision_depth": 8,
    "fullatt_block_indexes": [3, 7],  # 0-based, like [7, 15, 23, 31] of the 32-block towers
    "window_size": 56,  # pixels: 56 / 14 / 2 = 2x2 merged tokens per window (real: 112 -> 4x4)
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_heads": 2,
    # language model (tiny Qwen2 with grouped-query attention and M-RoPE)
    "text_hidden_size": 64,
    "text_num_hidden_layers": 2,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 2,
    "text_intermediate_size": 128,
    "mrope_section": [2, 3, 3],  # sums to head_dim / 2 = 8 (real: [16, 24, 24] of 64)
    "max_position_embeddings": 32768,
    # image processor (as the Hub checkpoint; lmms-eval overrides min/max pixels at load time)
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 16384,
    # tokenizer
    "bpe_vocab_size": 700,  # byte-level BPE incl. the 256 byte symbols; Qwen's special tokens come on top
    "corpus_sentences": 400,
    # misc
    "torch_dtype": "float32",
    "verify": True,
}


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def build_tokenizer(bpe_vocab_size: int, corpus: list[str], model_max_length: int):
    """Train a byte-level BPE with Qwen2's pre-tokenizer and wrap it as transformers' Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The chat scaffolding is part of the corpus so "system", "user", "assistant" become single pieces.
    # Answers start a line in Qwen's template ("<|im_start|>assistant\nyes"): "yes" / "no" without a leading space.
    scaffold = [f"system\n{SYSTEM_PROMPT}", "user\n", "assistant\n", "yes", "no", "Yes", "No"] * 10
    vocab, merges = asset_build.train_bpe(tok, trainer, corpus + scaffold)

    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",  # as the Instruct checkpoints' tokenizer_config.json
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_with(p: dict[str, Any], extra_tokens: list[str], chat_template: str):
    """The tiny Qwen tokenizer of a build's parameters ``p``, with a family's ``extra_tokens`` (after Qwen's special
    tokens) and ``chat_template``."""
    corpus = asset_build.build_corpus(p["corpus_sentences"], p["seed"])
    tokenizer = build_tokenizer(p["bpe_vocab_size"], corpus, p["max_position_embeddings"])
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS, *extra_tokens]})
    tokenizer.chat_template = chat_template
    return tokenizer


def images_first_chat_template(image_text: str) -> str:
    """A Qwen chat template that writes each image of a message as ``image_text`` + newline, before its text."""
    return (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        f"{{% for content in message['content'] %}}{{% if content['type'] == 'image' %}}{image_text}\n"
        "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def text_widths(p: dict[str, Any], tokenizer) -> dict[str, Any]:
    """The LLM's vocabulary and widths (keys ``text_*`` of ``p``), as ``text_config`` entries."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": p["text_hidden_size"],
        "intermediate_size": p["text_intermediate_size"],
        "num_hidden_layers": p["text_num_hidden_layers"],
        "num_attention_heads": p["text_num_attention_heads"],
        "num_key_value_heads": p["text_num_key_value_heads"],
        "max_position_embeddings": p["max_position_embeddings"],
    }


def vision_widths(p: dict[str, Any]) -> dict[str, Any]:
    """A Qwen-VL vision tower's depth, widths and patch geometry (2 x 2 merge, 2 frames), as ``vision_config``
    entries; its output width is the LLM's."""
    return {
        "depth": p["vision_depth"],
        "hidden_size": p["vision_hidden_size"],
        "intermediate_size": p["vision_intermediate_size"],
        "num_heads": p["vision_num_heads"],
        "in_channels": 3,
        "out_hidden_size": p["text_hidden_size"],
        "patch_size": p["patch_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The ids of Qwen's image, video and vision start / end tokens, as a Qwen-VL config's fields."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def qwen2_text_config(p: dict[str, Any], tokenizer) -> dict[str, Any]:
    """A plain Qwen2 LLM (no M-RoPE) of the widths in ``p``, as the ``text_config`` of a LLaVA-style checkpoint."""
    return {
        "model_type": "qwen2",
        **text_widths(p, tokenizer),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def generation_config(tokenizer, bos_token_id: int):
    """Greedy decoding that stops at either of Qwen's end tokens (as the Instruct checkpoints' generation_config)."""
    return asset_build.greedy_generation_config(
        tokenizer,
        bos_token_id=bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
    )


def _make_config(p: dict[str, Any], tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision_config = {
        **vision_widths(p),
        "hidden_act": "silu",
        "window_size": p["window_size"],
        "fullatt_block_indexes": list(p["fullatt_block_indexes"]),
        "tokens_per_second": 2,
    }
    text_config = {
        **text_widths(p, tokenizer),
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(p["mrope_section"])},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "use_sliding_window": False,
    }
    return Qwen2_5_VLConfig(
        vision_config=vision_config,
        text_config=text_config,
        **vision_token_ids(tokenizer),
        tie_word_embeddings=False,  # the answer head below rewrites output rows only
    )


def _build_processor(tokenizer, p: dict[str, Any]):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=p["min_pixels"],
        max_pixels=p["max_pixels"],
        patch_size=p["patch_size"],
        temporal_patch_size=2,
        merge_size=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=p["patch_size"], temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def prompt(processor, question: str, n_images: int = 1) -> str:
    """The chat prompt lmms-eval sends (a system message, then the images and the question)."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _yes_no_answerer(model, tokenizer, processor, seed: int) -> None:
    """Greedy decoding answers "yes" or "no" from the image, then <|im_end|> (asset_build.install_yes_no_head),
    calibrated on 16 random images of four sizes, one at a time (their prompts differ in length)."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    question = prompt(processor, "Is there a red circle in the image?\nAnswer the question using a single word or phrase.")
    sizes = [(84, 112), (112, 84), (140, 84), (112, 112)] * 4
    images = [
        Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()) for h, w in sizes
    ]
    asset_build.calibrate_yes_no_head(model, tokenizer, processor, question, images, gen)


# ----------------------------------------------------------------------------------------------
# build / verify
# ----------------------------------------------------------------------------------------------


def _params(seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    p = asset_build.build_params(DEFAULTS, seed, overrides)
    if any(not 0 <= i < p["vision_depth"] for i in p["fullatt_block_indexes"]):
        raise ValueError(f"fullatt_block_indexes {p['fullatt_block_indexes']} must lie in [0, {p['vision_depth']})")
    if p["window_size"] % (2 * p["patch_size"]):
        raise ValueError("window_size must be a multiple of 2 * patch_size (whole merged tokens per window)")
    return p


def is_complete_build(out_dir: Path, seed: int = 0, **overrides) -> bool:
    """True if ``out_dir`` holds a finished build made with the same recipe."""
    return asset_build.is_complete_build(out_dir, asset_build.build_recipe(BUILDER_VERSION, _params(seed, overrides)))


def verify_build(out_dir: Path, verbose: bool = True) -> dict[str, Any]:
    """Reload from disk (offline) and answer one image question with ``generate``."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, processor = asset_build.load_checkpoint(Qwen2_5_VLForConditionalGeneration, Path(out_dir))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(120, 200, 3), dtype=np.uint8))  # non-square on purpose
    text = prompt(processor, "Is there a red circle in the image?")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    grid = inputs["image_grid_thw"][0].tolist()
    if n_image_tokens != grid[0] * grid[1] * grid[2] // 4:
        raise RuntimeError(f"processor emitted {n_image_tokens} image tokens for a {grid} patch grid")
    new_tokens = asset_build.generate_new_tokens(model, inputs, max_new_tokens=4)
    result = {
        "prompt": text,
        "input_len": int(inputs["input_ids"].shape[1]),
        "n_image_tokens": n_image_tokens,
        "image_grid_thw": grid,
        "new_token_ids": new_tokens.tolist(),
        "decoded": processor.decode(new_tokens, skip_special_tokens=False),
    }
    if verbose:
        print(f"[verify] prompt={text!r}")
        print(f"[verify] input_len={result['input_len']} image tokens={n_image_tokens} grid_thw={grid}")
        print(f"[verify] generated ids={result['new_token_ids']} decoded={result['decoded']!r}")
    asset_build.require_new_tokens(new_tokens)
    return result


def build_tiny_qwen2_5_vl(
    out_dir: Path = DEFAULT_OUT, seed: int = 0, force: bool = False, verbose: bool = False, **overrides
) -> Path:
    """Build (or reuse) the tiny Qwen2.5-VL checkpoint in ``out_dir`` and return its path.

    ``overrides`` may change any key of ``DEFAULTS``. Deterministic for a given seed, overrides and library versions.
    """
    params = _params(seed, overrides)

    def make(work: Path) -> dict[str, Any]:
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        random.seed(seed)
        torch.manual_seed(seed)
        corpus = asset_build.build_corpus(params["corpus_sentences"], seed)
        tokenizer = build_tokenizer(params["bpe_vocab_size"], corpus, params["max_position_embeddings"])
        config = _make_config(params, tokenizer)
        with asset_build.quiet_transformers():
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _build_processor(tokenizer, params)
            _yes_no_answerer(model, tokenizer, processor, seed)
            model.generation_config = generation_config(tokenizer, config.text_config.bos_token_id)
            return asset_build.save_vlm_build(work, model, processor, tokenizer, verify_build, params, verbose)

    recipe = asset_build.build_recipe(BUILDER_VERSION, params)
    return asset_build.build_atomically(out_dir, recipe, make, force, verbose)


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(
        argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_qwen2_5_vl, is_complete_build, verify_build
    )


if __name__ == "__main__":
    sys.exit(main())
