#!/usr/bin/env python
"""Build a tiny, random-initialised LLaVA-1.5-shaped checkpoint, fully offline.

The result is a directory loadable with ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` that has the *geometry* of llava-hf/llava-1.5-7b-hf (CLIP ViT
336px / patch 14 -> 24x24 = 576 patch tokens + CLS, ``vision_feature_layer=-2``,
``vision_feature_select_strategy="default"``, Vicuna-v1 chat template, ``<image>`` expanded to 576
tokens by the processor) but tiny widths, so the whole directory is ~1-2 MB and runs on CPU in
well under a second per forward pass.  Nothing is trained except the tokenizer's BPE merges (on a
built-in, generated corpus); all weights are random (fixed seed).

The Vicuna-v1 chat template and the Llama tokenizer defined here are also those of the tiny LLaVA-NeXT and
Video-LLaVA (scripts/build_tiny_llava_next.py, scripts/build_tiny_video_llava.py) and of the scene model
(scripts/train_scene_vlm.py); what all builders share is in scripts/asset_build.py.

Usage::

    HF_HUB_OFFLINE=1 python -m scripts.build_tiny_llava [--out DIR] [--seed 0] [--force]

Library use (e.g. from tests)::

    from scripts.build_tiny_llava import build_tiny_llava
    build_tiny_llava(tmp_path / "tiny-llava", seed=0)

The build is written to a temporary sibling directory, verified (reload + ``generate``) and then
renamed into place, so a half-written build is never visible at ``out_dir``.  ``build_info.json``
is written last and marks a complete build; re-running with the same parameters is a no-op.
"""

from __future__ import annotations

import random
import sys
from functools import partial
from pathlib import Path
from typing import Any

from scripts import asset_build
from scripts.asset_build import (  # noqa: F401  (this module's API)
    CLIP_MEAN,
    CLIP_STD,
    VICUNA_SYSTEM_PROMPT,
    build_corpus,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-llava"

# Bump when the build recipe changes so stale builds are rebuilt automatically.
BUILDER_VERSION = 1

# CLIP ViT-L/14-336 geometry with the tiny widths the LLaVA-family builders share.
DEFAULTS: dict[str, Any] = {
    "image_size": 336,
    "patch_size": 14,
    **asset_build.TINY_CLIP_LLAMA,
    "max_position_embeddings": 2048,
}

# Vicuna v1 template, structured like llava-hf/llava-1.5-7b-hf's (list-of-content messages with
# {"type": "image"} / {"type": "text"} items; images rendered before the text of a turn), plus the
# Vicuna system prompt (used unless the conversation starts with its own "system" message):
#   "<system> USER: <image>\n<question> ASSISTANT: <answer></s>USER: ... ASSISTANT:"
CHAT_TEMPLATE = (
    "{%- set default_system = '" + VICUNA_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_text = messages[0]['content'] -%}"
    "{%- else -%}{%- set system_text = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_text = default_system -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- system_text + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- if message['content'] is string -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{- message['content'] + '</s>' -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] + ' ' -}}{%- endif -%}"
    "{%- else -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{- content['text'] -}}{%- if not loop.last -%}{{- ' ' -}}{%- endif -%}{%- endfor -%}{{- '</s>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{- content['text'] + ' ' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def build_tokenizer(
    bpe_vocab_size: int,
    corpus: list[str],
    image_token: str = "<image>",
    pad_token: str = "<pad>",
    model_max_length: int = 2048,
):
    """Train a Llama-style (Metaspace + byte-fallback) BPE and wrap it as a transformers LlamaTokenizer.

    ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 <0x00>..<0xFF> (byte fallback, like Llama), then the
    learned pieces, then the added special tokens <image> and <pad> (like llava-hf: 32000/32001).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # split=True while training so merges never cross word boundaries (like sentencepiece);
    # LlamaTokenizer re-creates the pre-tokenizer (Metaspace, prepend "first", split=False).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        special_tokens=specials,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["\u2581", "\n"],
    )
    learned, merges = asset_build.train_bpe(tok, trainer, corpus)

    vocab: dict[str, int] = {}
    for t in specials:
        vocab[t] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)

    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=pad_token,
        add_bos_token=True,
        add_eos_token=False,
        add_prefix_space=True,
        legacy=False,
        image_token=image_token,  # -> tokenizer.image_token / image_token_id (model-specific special token)
        model_max_length=model_max_length,
        padding_side="left",
    )
    # Make sure both added tokens exist as special, non-splittable tokens.
    tokenizer.add_special_tokens({"pad_token": pad_token})
    tokenizer.add_tokens([image_token], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_for(params: dict[str, Any]):
    """The tokenizer of a build: BPE trained on the generated corpus of the build's seed (LLaVA-family builders)."""
    corpus = build_corpus(params["corpus_sentences"], params["seed"])
    return build_tokenizer(params["bpe_vocab_size"], corpus, model_max_length=params["max_position_embeddings"])


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def _make_configs(p: dict[str, Any], tokenizer):
    from transformers import LlavaConfig

    return asset_build.llava_style_config(LlavaConfig, p, tokenizer)


def _yes_no_answerer(model, tokenizer, processor, seed: int) -> None:
    """Greedy decoding answers "yes" or "no" from the image, then </s> (asset_build.install_yes_no_head),
    calibrated on 16 random images of one size in one batch."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    prompt = f"{VICUNA_SYSTEM_PROMPT} USER: <image>\nIs there a red circle in the image? ASSISTANT:"
    images = [
        Image.fromarray((torch.rand(64, 96, 3, generator=gen) * 255).to(torch.uint8).numpy()) for _ in range(16)
    ]
    with torch.no_grad():
        batch = processor(text=[prompt] * len(images), images=images, return_tensors="pt")
        hidden = model.model(**batch).last_hidden_state[:, -1]  # final-norm output at the answer position
    asset_build.install_yes_no_head(model, tokenizer, hidden, gen)


def _build_processor(tokenizer, p: dict[str, Any]):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        **asset_build.clip_image_processor_kwargs(p["image_size"]),
        do_pad=False,  # llava-hf's processor does not pad-to-square (original LLaVA-1.5 eval does)
    )
    return asset_build.llava_style_processor(
        LlavaProcessor, tokenizer, p["patch_size"], CHAT_TEMPLATE, image_processor=image_processor
    )


# ----------------------------------------------------------------------------------------------
# build / verify
# ----------------------------------------------------------------------------------------------


def _params(seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    params = asset_build.build_params(DEFAULTS, seed, overrides)
    asset_build.require_whole_patches(params)
    return params


def is_complete_build(out_dir: Path, seed: int = 0, **overrides) -> bool:
    """True if ``out_dir`` holds a finished build made with the same recipe."""
    return asset_build.is_complete_build(out_dir, asset_build.build_recipe(BUILDER_VERSION, _params(seed, overrides)))


def verify_build(out_dir: Path, verbose: bool = True) -> dict[str, Any]:
    """Reload from disk (offline) and run one image+prompt through ``generate``."""
    import numpy as np
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    model, processor = asset_build.load_checkpoint(LlavaForConditionalGeneration, Path(out_dir))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8))  # non-square on purpose
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    new_tokens = asset_build.generate_new_tokens(model, inputs, max_new_tokens=3)
    result = {
        "prompt": prompt,
        "input_len": int(inputs["input_ids"].shape[1]),
        "n_image_tokens": n_image_tokens,
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "output_len": int(inputs["input_ids"].shape[1] + len(new_tokens)),
        "new_token_ids": new_tokens.tolist(),
        "decoded": processor.decode(new_tokens, skip_special_tokens=False),
        "image_processor_class": type(processor.image_processor).__name__,
        "tokenizer_class": type(processor.tokenizer).__name__,
    }
    if verbose:
        print(
            f"[verify] processor={type(processor).__name__} image_processor={result['image_processor_class']} "
            f"tokenizer={result['tokenizer_class']}"
        )
        print(f"[verify] prompt={prompt!r}")
        print(
            f"[verify] input_len={result['input_len']} (image tokens={n_image_tokens}, "
            f"text tokens={result['input_len'] - n_image_tokens}) pixel_values={result['pixel_values_shape']}"
        )
        print(f"[verify] generated ids={result['new_token_ids']} decoded={result['decoded']!r}")
    asset_build.require_new_tokens(new_tokens)
    return result


def build_tiny_llava(out_dir: Path, seed: int = 0, force: bool = False, verbose: bool = False, **overrides) -> Path:
    """Build (or reuse) the tiny LLaVA checkpoint in ``out_dir`` and return its path.

    ``overrides`` may change any key of ``DEFAULTS`` (e.g. ``vision_num_hidden_layers=4``).
    Skips the work when ``out_dir`` already holds a complete build with the same recipe, unless
    ``force``.  Deterministic: same seed + overrides + library versions -> identical files.
    """
    params = _params(seed, overrides)

    def make(work: Path) -> dict[str, Any]:
        import torch
        from transformers import LlavaForConditionalGeneration

        random.seed(seed)
        torch.manual_seed(seed)
        tokenizer = tokenizer_for(params)
        config = _make_configs(params, tokenizer)
        with asset_build.quiet_transformers():
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(config).to(getattr(torch, params["torch_dtype"])).eval()
            processor = _build_processor(tokenizer, params)
            _yes_no_answerer(model, tokenizer, processor, seed)
            model.generation_config = asset_build.greedy_generation_config(tokenizer)
            verify = partial(verify_build, verbose=verbose) if params["verify"] else None
            info = asset_build.save_and_verify(
                work, model, processor, tokenizer, verify, ("input_len", "n_image_tokens", "new_token_ids")
            )
        return {**info, "image_token_id": config.image_token_id}

    recipe = asset_build.build_recipe(BUILDER_VERSION, params)
    return asset_build.build_atomically(out_dir, recipe, make, force, verbose)


def main(argv: list[str] | None = None) -> int:
    return asset_build.run_builder_cli(
        argv, __doc__.split("\n\n")[0], DEFAULT_OUT, build_tiny_llava, is_complete_build, verify_build
    )


if __name__ == "__main__":
    sys.exit(main())
