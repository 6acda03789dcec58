"""What the offline asset builders in scripts/ share, so that each builder keeps only its model family or task.

- build records: parameters with overrides, the recipe that ``build_info.json`` stores, and the check that an output
  folder already holds a complete build of a recipe (re-running a builder is then a no-op);
- atomic output: a folder is built in a temporary sibling and renamed into place, a file is written next to its
  target and renamed over it, so that a half-written asset is never visible;
- model pieces: the generated tokenizer corpus, tiny CLIP / Llama configs and CLIP image preprocessing, the
  "yes"/"no" answer head that lets a random model answer POPE-style questions, greedy generation, save + reload check;
- a command line common to the model builders.

scripts/ is a package: builders import this module as ``scripts.asset_build`` and run from the repository root as
``python -m scripts.<builder>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

# The builders run offline; set before transformers is imported (an explicit setting in the environment wins).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUILD_INFO = "build_info.json"

# OpenAI CLIP normalisation constants (LLaVA's CLIPImageProcessor and Qwen2.5-VL's preprocessor_config.json).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# SigLIP's normalisation (LLaVA-OneVision's and Qwen3-VL's preprocessor_config.json).
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# The tiny CLIP + Llama checkpoints (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA) share their widths, so that one tiny CLIP
# text tower (scripts/build_tiny_clip.py, sized from the tiny LLaVA) fits each of their vision towers.
TINY_CLIP_LLAMA: dict[str, Any] = {
    # vision tower: CLIP ViT's 12 layers (pruning picks layers by index), tiny widths
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
    # tokenizer
    "bpe_vocab_size": 600,  # trained BPE vocab (incl. <unk>/<s>/</s>); 256 byte-fallback tokens are added on top
    "corpus_sentences": 400,
    # misc
    "torch_dtype": "float32",
    "verify": True,
}


# ----------------------------------------------------------------------------------------------
# build records
# ----------------------------------------------------------------------------------------------


def build_params(defaults: dict[str, Any], seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The seed and ``defaults`` updated with ``overrides``; an override that is not a default is a typo."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: {sorted(defaults)}")
    return {"seed": seed, **defaults, **overrides}


def require_whole_patches(params: dict[str, Any]) -> None:
    if params["image_size"] % params["patch_size"]:
        raise ValueError("image_size must be a multiple of patch_size")


def build_recipe(builder_version: int, params: dict[str, Any]) -> dict[str, Any]:
    """What determines the files of a build (``verify`` does not), as ``build_info.json`` records it."""
    from importlib.metadata import version  # cheap: no torch/transformers import just to check a build

    return {
        "builder_version": builder_version,
        "params": {k: v for k, v in params.items() if k != "verify"},
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
        "torch": version("torch").split("+")[0],
    }


def is_complete_build(out_dir: Path, recipe: dict[str, Any]) -> bool:
    """True if ``out_dir`` holds a finished build (``build_info.json`` is written last) of ``recipe``."""
    info_path = Path(out_dir) / BUILD_INFO
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return False
    if info.get("recipe") != recipe:
        return False
    return bool(info.get("files")) and all((Path(out_dir) / f).is_file() for f in info["files"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# atomic output
# ----------------------------------------------------------------------------------------------


@contextmanager
def staged_directory(out_dir: Path, keep_existing: Callable[[], bool] = lambda: False) -> Iterator[Path]:
    """Yield an empty sibling folder of ``out_dir`` to build in; when the block succeeds, it replaces ``out_dir``.

    The swap is a rename, so ``out_dir`` never shows a half-written build; on an error the staged folder is removed.
    If ``keep_existing()`` is true once the block is done (another process finished the same build meanwhile), the
    staged folder is dropped and ``out_dir`` kept.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it 0700; the final folder should be world-readable
    try:
        yield work
        if keep_existing():
            shutil.rmtree(work, ignore_errors=True)
        elif out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(backup)
            work.rename(out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file next to ``path``, then rename it over ``path`` (readers see whole files)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _single_threaded(make: Callable[[Path], dict], work: Path) -> dict:
    """``make(work)`` with one torch thread: multi-threaded reductions sum in a varying order, which made two builds
    of the same seed differ in the last bits of some weights."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make(work)
    finally:
        torch.set_num_threads(threads)


def build_atomically(
    out_dir: Path, recipe: dict[str, Any], make: Callable[[Path], dict], force: bool = False, verbose: bool = False
) -> Path:
    """Build ``out_dir`` unless it already holds a complete build of ``recipe`` (or ``force``); returns its path.

    ``make(work)`` writes the files into a staged folder and returns what ``build_info.json`` records besides the
    recipe, the file list and their sha256; ``build_info.json`` is written last and marks a complete build.
    """
    out_dir = Path(out_dir).resolve()
    if not force and is_complete_build(out_dir, recipe):
        if verbose:
            print(
                f"[build] {out_dir} already holds a complete build (seed={recipe['params']['seed']}); "
                "skipping (use --force to rebuild)"
            )
        return out_dir

    t0 = time.perf_counter()
    # keep_existing: another process may have finished the same build while this one was working; keep theirs
    with staged_directory(out_dir, keep_existing=lambda: not force and is_complete_build(out_dir, recipe)) as work:
        extra = _single_threaded(make, work)
        files = sorted(str(f.relative_to(work)) for f in work.rglob("*") if f.is_file())
        info = {"recipe": recipe, **extra, "files": files, "sha256": {f: sha256_file(work / f) for f in files}}
        # NB: no timestamps -> the whole folder is byte-for-byte reproducible.
        (work / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    if verbose:
        size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
        n_params = info.get("n_parameters", 0)
        print(f"[build] wrote {out_dir} ({size / 1e6:.2f} MB, {n_params:,} params) in {time.perf_counter() - t0:.1f}s")
        for f in sorted(out_dir.iterdir()):
            print(f"        {f.name:32s} {f.stat().st_size:>10,d} B")
    return out_dir


# ----------------------------------------------------------------------------------------------
# tokenizer corpus
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


def train_bpe(tokenizer, trainer, corpus: list[str]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Train a ``tokenizers`` BPE on ``corpus``: (vocab items in id order, merges as pairs), for a transformers
    tokenizer class to wrap."""
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in trained["merges"]]
    return vocab, merges


# ----------------------------------------------------------------------------------------------
# model pieces
# ----------------------------------------------------------------------------------------------


def clip_vision_config(p: dict[str, Any]):
    """A CLIP ViT with the widths of ``p`` (keys of TINY_CLIP_LLAMA plus image_size / patch_size)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
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


def llama_text_config(p: dict[str, Any], tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
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


def llava_style_config(config_class, p: dict[str, Any], tokenizer, **extra):
    """``config_class`` (LlavaConfig, LlavaNextConfig, VideoLlavaConfig) over a CLIP tower and a Llama, as llava-hf's:
    feature layer -2, "default" selection (CLS dropped), GELU projector; ``extra``: the family's own fields."""
    side = p["image_size"] // p["patch_size"]
    config = config_class(
        vision_config=clip_vision_config(p),
        text_config=llama_text_config(p, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=side * side,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
        **extra,
    )
    # LLaVA configs (5.x, @strict dataclasses) have no pad_token_id field of their own; set it as an attribute so
    # it is serialised (llava-hf checkpoints carry it at top level too).
    config.pad_token_id = tokenizer.pad_token_id
    return config


def llava_style_processor(processor_class, tokenizer, patch_size: int, chat_template: str, **extra):
    """``processor_class`` (LlavaProcessor, LlavaNextProcessor, VideoLlavaProcessor) set as llava-hf's: ``<image>``
    expands to one token per patch (the processor counts the CLS token, then drops it for the "default" feature
    selection); ``extra``: ``image_processor=`` and the family's own fields (``video_processor=``, ...)."""
    return processor_class(
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        image_token="<image>",
        num_additional_image_tokens=1,
        **extra,
    )


def clip_image_processor_kwargs(image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor's preprocessing (resize the short side, centre crop, normalise) for square ``image_size``."""
    return {
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }


def calibration_images(n: int, seed: int, sizes=((64, 96), (96, 64), (80, 80))):
    """n random RGB PIL images of a few sizes (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)
    ]


def single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise RuntimeError(f"{word!r} must be a single token for the tiny model's answer head, got {ids}")
    return ids[0]


def install_yes_no_head(model, tokenizer, hidden, generator, marker_orthogonal_to_mean: bool = False) -> None:
    """Random weights, but greedy decoding answers "yes" or "no" and then stops (the tokenizer's eos token).

    POPE-style tasks score only an exact "yes"/"no", so a model that babbles scores 0 whatever the pruning does.
    Here the answer still comes from the random network, and from the image: the yes/no logits are +-s * (h . r)
    where h is the final hidden state and r the direction along which h varies most over the calibration inputs
    (``hidden`` [n, width], the final-norm output at the answer position; r is made orthogonal to the mean h, so
    neither answer dominates). Changing the visual tokens (pruning) changes h and can flip answers; accuracy stays
    at chance because nothing is trained.

    "yes" and "no" embeddings carry a strong shared marker direction m and the eos row reads m: after either answer
    token the next step emits eos. ``marker_orthogonal_to_mean`` also keeps m orthogonal to the mean answer
    state, so that eos cannot win at the answer position itself. Every other token's output row is zero.
    ``generator`` draws the marker and the embeddings' noise.
    """
    import torch

    yes, no, eos = (single_token_id(tokenizer, w) for w in ("yes", "no", tokenizer.eos_token))
    width = model.lm_head.weight.shape[1]
    with torch.no_grad():
        hidden = hidden.float()
        mean = hidden.mean(0)
        _, _, vh = torch.linalg.svd(hidden - mean, full_matrices=False)
        r = vh[0] - (vh[0] @ mean) / (mean @ mean) * mean
        r = r / r.norm()
        marker = torch.randn(width, generator=generator)
        marker = marker - (marker @ r) * r
        if marker_orthogonal_to_mean:
            m = mean / mean.norm()
            marker = marker - (marker @ m) * m
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
            embeddings[token] = marker * 50.0 + 0.1 * torch.randn(width, generator=generator)


def calibrate_yes_no_head(model, tokenizer, processor, prompt: str, images, generator,
                          marker_orthogonal_to_mean: bool = False) -> None:
    """``install_yes_no_head`` calibrated on ``images``, one at a time (their prompts differ in length): the final
    hidden state at the answer position of ``prompt`` with each image."""
    import torch

    hidden = []
    with torch.no_grad():
        for image in images:
            batch = processor(text=[prompt], images=[image], return_tensors="pt")
            hidden.append(model.model(**batch).last_hidden_state[:, -1])
    install_yes_no_head(model, tokenizer, torch.cat(hidden), generator, marker_orthogonal_to_mean)


def greedy_generation_config(tokenizer, max_new_tokens: int = 16, **token_ids):
    """Greedy decoding with the tokenizer's bos / eos / pad ids; ``token_ids`` (e.g. ``eos_token_id=[...]``) win."""
    from transformers import GenerationConfig

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **token_ids,
    }
    return GenerationConfig(**ids, do_sample=False, max_new_tokens=max_new_tokens)


@contextmanager
def quiet_transformers():
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


def save_and_verify(
    work: Path,
    model,
    processor,
    tokenizer,
    verify: Callable[[Path], dict[str, Any]] | None,
    recorded: Sequence[str],
) -> dict[str, Any]:
    """Save model + processor into ``work``, run ``verify(work)`` on the saved files (unless None) and return what
    ``build_info.json`` records about them (the ``recorded`` keys of the check's result among them)."""
    model.save_pretrained(work)
    processor.save_pretrained(work)
    result = verify(work) if verify else None
    return {
        "n_parameters": sum(t.numel() for t in model.parameters()),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "verify": result and {k: result[k] for k in recorded},
    }


def save_vlm_build(work: Path, model, processor, tokenizer, verify: Callable[..., dict[str, Any]],
                   params: dict[str, Any], verbose: bool) -> dict[str, Any]:
    """``save_and_verify`` as the vision-language builders call it: ``verify(work, verbose=)`` unless the build's
    ``params["verify"]`` is off, its prompt length, image-token count and answer recorded, plus the image token id."""
    check = partial(verify, verbose=verbose) if params["verify"] else None
    info = save_and_verify(work, model, processor, tokenizer, check, ("input_len", "n_image_tokens", "new_token_ids"))
    return {**info, "image_token_id": model.config.image_token_id}


def load_checkpoint(model_class, out_dir: Path):
    """(model in eval mode, processor) reloaded from ``out_dir`` offline, as a user of the asset would."""
    from transformers import AutoProcessor

    with quiet_transformers():
        model = model_class.from_pretrained(out_dir, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(out_dir, local_files_only=True)
    return model, processor


def generate_new_tokens(model, inputs, max_new_tokens: int):
    """The tokens greedy ``generate`` appends to the single prompt of ``inputs``."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


def require_new_tokens(new_tokens) -> None:
    if len(new_tokens) == 0:
        raise RuntimeError("verification failed: generate() returned no new tokens")


def check_generation(model, inputs, verbose: bool = False, max_new_tokens: int = 3) -> dict[str, Any]:
    """Greedy ``generate`` on ``inputs`` (one prompt with ``pixel_values``) must add tokens; returns the prompt length,
    image-token count, pixel shape and new tokens (printed when ``verbose``)."""
    new_tokens = generate_new_tokens(model, inputs, max_new_tokens=max_new_tokens)
    result = {
        "input_len": int(inputs["input_ids"].shape[1]),
        "n_image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "new_token_ids": new_tokens.tolist(),
    }
    if verbose:
        print(f"[verify] {result}")
    require_new_tokens(new_tokens)
    return result


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def run_builder_cli(
    argv: list[str] | None,
    description: str,
    default_out: Path,
    build: Callable[..., Path],
    is_complete: Callable[[Path, int], bool] | None = None,
    verify: Callable[..., Any] | None = None,
) -> int:
    """``--out``, ``--seed``, ``--force`` for ``build(out, seed=, force=, verbose=True)``; with ``is_complete`` and
    ``verify`` also ``--verify-existing`` (run the reload + generate check on a build that was skipped)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=default_out, help=f"output directory (default: {default_out})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    if verify:
        ap.add_argument(
            "--verify-existing", action="store_true", help="when skipping, still run the reload/generate check"
        )
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    skipped = bool(verify) and not args.force and is_complete(args.out, args.seed)
    out = build(args.out, seed=args.seed, force=args.force, verbose=True)
    if skipped and args.verify_existing:
        verify(out, verbose=True)
    print(f"[build] done in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0
