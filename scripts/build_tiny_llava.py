#!/usr/bin/env python
"""Build a tiny, random-initialised LLaVA-1.5-shaped checkpoint, fully offline.

The result is a directory loadable with ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` that has the *geometry* of llava-hf/llava-1.5-7b-hf (CLIP ViT
336px / patch 14 -> 24x24 = 576 patch tokens + CLS, ``vision_feature_layer=-2``,
``vision_feature_select_strategy="default"``, Vicuna-v1 chat template, ``<image>`` expanded to 576
tokens by the processor) but tiny widths, so the whole directory is ~1-2 MB and runs on CPU in
well under a second per forward pass.  Nothing is trained except the tokenizer's BPE merges (on a
built-in, generated corpus); all weights are random (fixed seed).

Usage::

    HF_HUB_OFFLINE=1 python scripts/build_tiny_llava.py [--out DIR] [--seed 0] [--force]

Library use (e.g. from tests)::

    from scripts.build_tiny_llava import build_tiny_llava
    build_tiny_llava(tmp_path / "tiny-llava", seed=0)

The build is written to a temporary sibling directory, verified (reload + ``generate``) and then
renamed into place, so a half-written build is never visible at ``out_dir``.  ``build_info.json``
is written last and marks a complete build; re-running with the same parameters is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-llava"

# Bump when the build recipe changes so stale builds are rebuilt automatically.
BUILDER_VERSION = 1
BUILD_INFO = "build_info.json"

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# OpenAI CLIP normalisation constants (what LLaVA-1.5's CLIPImageProcessor uses).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

DEFAULTS: dict[str, Any] = {
    # vision tower (CLIP ViT-L/14-336 geometry, tiny widths)
    "image_size": 336,
    "patch_size": 14,
    "vision_num_hidden_layers": 12,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_attention_heads": 4,
    # language model (tiny Llama with grouped-query attention)
    "text_hidden_size": 64,
    "text_num_hidden_layers": 2,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 2,
    "text_intermediate_size": 128,
    "max_position_embeddings": 2048,
    # tokenizer
    "bpe_vocab_size": 600,  # trained BPE vocab (incl. <unk>/<s>/</s>); 256 byte-fallback tokens are added on top
    "corpus_sentences": 400,
    # misc
    "torch_dtype": "float32",
    "verify": True,
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
# corpus + tokenizer
# ----------------------------------------------------------------------------------------------

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray"]
_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "line", "dot", "cross", "ring", "diamond"]
_OBJECTS = [
    "cat",
    "dog",
    "car",
    "bus",
    "person",
    "man",
    "woman",
    "child",
    "tree",
    "house",
    "table",
    "chair",
    "cup",
    "bottle",
    "sign",
    "ball",
    "bird",
    "horse",
    "boat",
    "train",
    "plane",
    "phone",
    "book",
    "clock",
]
_PLACES = ["street", "kitchen", "park", "room", "field", "beach", "road", "table", "sky", "water"]
_POSITIONS = ["left", "right", "top", "bottom", "center", "corner", "middle", "front", "back"]
_SIZES = ["small", "large", "big", "tiny", "tall", "short", "wide", "long"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def build_corpus(n_sentences: int, seed: int) -> list[str]:
    """A deterministic corpus of short English sentences about images (plus the chat scaffolding)."""
    rng = random.Random(seed)
    fixed = [
        VICUNA_SYSTEM_PROMPT,
        "USER:",
        "ASSISTANT:",
        f"{VICUNA_SYSTEM_PROMPT} USER: <image>\nWhat is shown in the image? ASSISTANT: A cat.",
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Yes No yes no A B C D True False",
        *["yes no yes no no yes"] * 20,  # whole-word pieces: the tiny model's answer head needs them
        "0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100",
        "Describe the image in detail. Please provide a short description for this region.",
        "What is the color of the object? How many objects are there? Where is it?",
    ]

    def pick(xs: list[str]) -> str:
        return rng.choice(xs)

    templates = [
        lambda: f"There is a {pick(_SIZES)} {pick(_COLOURS)} {pick(_SHAPES)} in the {pick(_POSITIONS)} of the image.",
        lambda: f"The image shows a {pick(_COLOURS)} {pick(_OBJECTS)} on the {pick(_PLACES)}.",
        lambda: f"Is there a {pick(_OBJECTS)} in the image? {pick(['Yes', 'No'])}.",
        lambda: f"What color is the {pick(_OBJECTS)}? It is {pick(_COLOURS)}.",
        lambda: f"How many {pick(_SHAPES)}s are there? {pick(_NUMBERS).capitalize()}.",
        lambda: f"How many {pick(_OBJECTS)}s can you see? {rng.randint(0, 12)}",
        lambda: f"Is the {pick(_SHAPES)} {pick(_COLOURS)}? Answer the question using a single word or phrase.",
        lambda: f"A {pick(_SIZES)} {pick(_OBJECTS)} is next to a {pick(_COLOURS)} {pick(_OBJECTS)}.",
        lambda: f"USER: <image>\nWhat is on the {pick(_POSITIONS)}? ASSISTANT: A {pick(_COLOURS)} {pick(_SHAPES)}.",
        lambda: f"The {pick(_OBJECTS)} is {pick(['near', 'behind', 'under', 'above', 'beside'])} the {pick(_OBJECTS)}.",
        lambda: f"{pick(_NUMBERS).capitalize()} {pick(_COLOURS)} {pick(_SHAPES)}s and {rng.randint(0, 99)} dots.",
        lambda: f"Which shape is {pick(_COLOURS)}? (A) {pick(_SHAPES)} (B) {pick(_SHAPES)} (C) {pick(_SHAPES)}",
        lambda: f"The answer is {pick(['yes', 'no', 'A', 'B', 'C', 'D'])}.",
        lambda: f"This photo was taken in a {pick(_PLACES)} with a {pick(_OBJECTS)} and a {pick(_OBJECTS)}.",
    ]
    sentences = list(fixed)
    while len(sentences) < n_sentences:
        sentences.append(rng.choice(templates)())
    return sentences


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
    tok.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    learned = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in trained["merges"]]

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


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def _make_configs(p: dict[str, Any], tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    grid = p["image_size"] // p["patch_size"]
    vision_config = CLIPVisionConfig(
        hidden_size=p["vision_hidden_size"],
        intermediate_size=p["vision_intermediate_size"],
        num_hidden_layers=p["vision_num_hidden_layers"],
        num_attention_heads=p["vision_num_attention_heads"],
        image_size=p["image_size"],
        patch_size=p["patch_size"],
        num_channels=3,
        hidden_act="quick_gelu",  # as openai/clip-vit-large-patch14-336
        projection_dim=p["vision_hidden_size"],
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p["text_hidden_size"],
        intermediate_size=p["text_intermediate_size"],
        num_hidden_layers=p["text_num_hidden_layers"],
        num_attention_heads=p["text_num_attention_heads"],
        num_key_value_heads=p["text_num_key_value_heads"],
        max_position_embeddings=p["max_position_embeddings"],
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    # LlavaConfig (5.x, @strict dataclass) has no pad_token_id field of its own; set it as an
    # attribute so it is serialised (llava-hf checkpoints carry it at top level too).
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _yes_no_answerer(model, tokenizer, processor, seed: int) -> None:
    """Random weights, but greedy decoding answers "yes" or "no" and then stops.

    POPE-style tasks score only an exact "yes"/"no", so a model that babbles scores 0 whatever the pruning does.
    Here the answer still comes from the random network, and from the image: the yes/no logits are +-s * (h . r)
    where h is the final hidden state and r the direction along which h varies most over a few calibration
    images (made orthogonal to the mean h, so neither answer dominates). Changing the visual tokens (pruning)
    changes h and can flip answers; accuracy stays at chance because nothing is trained.

    "yes" and "no" embeddings carry a strong shared marker direction m and </s> reads m: after either answer
    token the next step emits </s>. Every other token's output row is zero.
    """
    import torch
    from PIL import Image

    yes, no, eos = (_single_token_id(tokenizer, w) for w in ("yes", "no", tokenizer.eos_token))
    gen = torch.Generator().manual_seed(seed)
    width = model.lm_head.weight.shape[1]
    prompt = f"{VICUNA_SYSTEM_PROMPT} USER: <image>\nIs there a red circle in the image? ASSISTANT:"
    images = [
        Image.fromarray((torch.rand(64, 96, 3, generator=gen) * 255).to(torch.uint8).numpy()) for _ in range(16)
    ]
    with torch.no_grad():
        batch = processor(text=[prompt] * len(images), images=images, return_tensors="pt")
        hidden = model.model(**batch).last_hidden_state[:, -1].float()  # final-norm output at the answer position
        mean = hidden.mean(0)
        _, _, vh = torch.linalg.svd(hidden - mean, full_matrices=False)
        r = vh[0] - (vh[0] @ mean) / (mean @ mean) * mean
        r = r / r.norm()
        marker = torch.randn(width, generator=gen)
        marker = marker - (marker @ r) * r
        marker = marker / marker.norm()
        spread = (hidden - mean) @ r
        scale = 8.0 / spread.abs().median().clamp_min(1e-6)  # typical |yes - no| logit gap ~ 16
        head = model.lm_head.weight
        head.zero_()
        head[yes] = r * scale
        head[no] = -r * scale
        head[eos] = marker * 4.0
        embeddings = model.get_input_embeddings().weight
        for token in (yes, no):
            embeddings[token] = marker * 50.0 + 0.1 * torch.randn(width, generator=gen)


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise RuntimeError(f"{word!r} must be a single token for the tiny model's answer head, got {ids}")
    return ids[0]


def _build_processor(tokenizer, p: dict[str, Any]):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": p["image_size"]},
        resample=3,  # PIL BICUBIC
        do_center_crop=True,
        crop_size={"height": p["image_size"], "width": p["image_size"]},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
        do_pad=False,  # llava-hf's processor does not pad-to-square (original LLaVA-1.5 eval does)
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


# ----------------------------------------------------------------------------------------------
# build / verify
# ----------------------------------------------------------------------------------------------


def _params(seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **overrides}
    if p["image_size"] % p["patch_size"]:
        raise ValueError("image_size must be a multiple of patch_size")
    return {"seed": seed, **p}


def _recipe(params: dict[str, Any]) -> dict[str, Any]:
    """The part of the build parameters that determines the artefact (``verify`` does not)."""
    from importlib.metadata import version  # cheap: no torch/transformers import just to check a build

    return {
        "builder_version": BUILDER_VERSION,
        "params": {k: v for k, v in params.items() if k != "verify"},
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
        "torch": version("torch").split("+")[0],
    }


def is_complete_build(out_dir: Path, seed: int = 0, **overrides) -> bool:
    """True if ``out_dir`` holds a finished build made with the same recipe."""
    info_path = Path(out_dir) / BUILD_INFO
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return False
    if info.get("recipe") != _recipe(_params(seed, overrides)):
        return False
    return all((Path(out_dir) / f).is_file() for f in info.get("files", [])) and bool(info.get("files"))


def verify_build(out_dir: Path, verbose: bool = True) -> dict[str, Any]:
    """Reload from disk (offline) and run one image+prompt through ``generate``."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    with _quiet_transformers():
        model = LlavaForConditionalGeneration.from_pretrained(out_dir, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(out_dir, local_files_only=True)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8))  # non-square on purpose
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    result = {
        "prompt": prompt,
        "input_len": int(inputs["input_ids"].shape[1]),
        "n_image_tokens": n_image_tokens,
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "output_len": int(out.shape[1]),
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
    if out.shape[1] <= inputs["input_ids"].shape[1]:
        raise RuntimeError("verification failed: generate() returned no new tokens")
    return result


@contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning logs and tqdm bars ("Loading weights", "Writing model shards")."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_tiny_llava(out_dir: Path, seed: int = 0, force: bool = False, verbose: bool = False, **overrides) -> Path:
    """Build (or reuse) the tiny LLaVA checkpoint in ``out_dir`` and return its path.

    ``overrides`` may change any key of ``DEFAULTS`` (e.g. ``vision_num_hidden_layers=4``).
    Skips the work when ``out_dir`` already holds a complete build with the same recipe, unless
    ``force``.  Deterministic: same seed + overrides + library versions -> identical files.
    """
    out_dir = Path(out_dir).resolve()
    params = _params(seed, overrides)
    if not force and is_complete_build(out_dir, seed, **overrides):
        if verbose:
            print(f"[build] {out_dir} already holds a complete build (seed={seed}); skipping (use --force to rebuild)")
        return out_dir

    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it 0700; the final dir should be world-readable
    try:
        random.seed(seed)
        torch.manual_seed(seed)

        corpus = build_corpus(params["corpus_sentences"], seed)
        tokenizer = build_tokenizer(
            params["bpe_vocab_size"], corpus, model_max_length=params["max_position_embeddings"]
        )
        config = _make_configs(params, tokenizer)

        with _quiet_transformers():
            torch.manual_seed(seed)
            dtype = getattr(torch, params["torch_dtype"])
            model = LlavaForConditionalGeneration(config).to(dtype).eval()
            processor = _build_processor(tokenizer, params)
            _yes_no_answerer(model, tokenizer, processor, seed)
            model.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                do_sample=False,
                max_new_tokens=16,
            )
            model.save_pretrained(work)
            processor.save_pretrained(work)
            n_params = sum(t.numel() for t in model.parameters())
            result = verify_build(work, verbose=verbose) if params["verify"] else None

        files = sorted(str(f.relative_to(work)) for f in work.rglob("*") if f.is_file())
        info = {
            "recipe": _recipe(params),
            "n_parameters": n_params,
            "vocab_size": len(tokenizer),
            "image_token_id": config.image_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "files": files,
            "sha256": {f: _sha256(work / f) for f in files},
            "verify": result and {k: result[k] for k in ("input_len", "n_image_tokens", "new_token_ids")},
        }
        # NB: no timestamps -> the whole directory is byte-for-byte reproducible.
        (work / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

        if not force and is_complete_build(out_dir, seed, **overrides):
            # another process finished the same build while we were working: keep theirs
            shutil.rmtree(work, ignore_errors=True)
            return out_dir
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(backup)
            work.rename(out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    if verbose:
        size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
        print(f"[build] wrote {out_dir} ({size / 1e6:.2f} MB, {n_params:,} params) in {time.perf_counter() - t0:.1f}s")
        for f in sorted(out_dir.iterdir()):
            print(f"        {f.name:32s} {f.stat().st_size:>10,d} B")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    ap.add_argument("--verify-existing", action="store_true", help="when skipping, still run the reload/generate check")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    skipped = not args.force and is_complete_build(args.out, args.seed)
    out = build_tiny_llava(args.out, seed=args.seed, force=args.force, verbose=True)
    if skipped and args.verify_existing:
        verify_build(out, verbose=True)
    print(f"[build] done in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
