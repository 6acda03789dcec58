#!/usr/bin/env python
"""Train the small scene VLM (HF LLaVA architecture) on procedural scenes, on CPU, in under 30 minutes.

The model is a plain ``LlavaForConditionalGeneration``: a CLIP vision tower trained from scratch (128 px, patch 16
-> 8 x 8 = 64 patch tokens + CLS, 12 layers, so HiPrune's default object layer 9 and the feature layer -2 = 11 are
distinct layers), LLaVA's two-layer GELU projector and a small Llama, with a locally trained BPE tokenizer and the
Vicuna-v1 chat template of scripts/build_tiny_llava.py. Everything is trained end to end.

Training uses exactly what the harness uses at evaluation (eval.lmms.prompting.LlavaInputBuilder): the Vicuna-v1
conversation with LLaVA's conv_llava_v1 system prompt (prompt_style=llava_v1, pinned in configs/model/scene_llava.yaml),
"<image>\\n" + question + lmms-eval's post prompt, LLaVA's chunk-wise tokenisation,
pad-to-square + PIL preprocessing (the normalised pixels are checked against the builder's image processor). The
loss is next-token cross entropy on the answer tokens and </s> only (teacher forcing), plus an auxiliary per-patch
loss on the vision features (which colour-shape covers each patch, which object centre lies in it), from a linear
head that is dropped after training: dense supervision that makes a from-scratch ViT learn in minutes on CPU.
Each scene gets several questions; the vision tower runs once per scene.

Curriculum (a from-scratch ViT + LLM otherwise needs far more steps than 30 CPU minutes allow):
  A. the LLM learns the task on *symbolic* image tokens (embeddings of each patch's ground-truth labels);
  V. the vision tower + projector learn to produce those tokens from pixels (label heads + regression);
  B. everything end to end on pixels; the best validation checkpoint (end of V or a stage-B evaluation) is kept.
The symbolic embeddings and label heads are scaffolding and are not saved. Validation is greedy exact match
computed by teacher forcing (every answer token and </s> is the argmax), on the val split.

Step counts are fixed, so a run is deterministic for a seed and thread count; wall-clock and CPU time are recorded
(training.json, TRAINING.md). The test-split accuracies (full model and pruned) are measured on the stored files
through the harness's input builder + generate. On a machine shared with other jobs, 2 torch threads can be several
times slower than 1 (threads wait on each other when a core is taken away); the committed weights were made with
--threads 1, see TRAINING.md.

    HF_HUB_OFFLINE=1 python -m scripts.train_scene_vlm --out models/scene-llava --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

from eval.lmms.prompting import LlavaInputBuilder, tokenize_with_images
from scripts import asset_build, scenes
from scripts import build_tiny_llava as tiny

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUT = REPO_ROOT / "models" / "scene-llava"

ARCH = {
    "image_size": scenes.IMAGE_SIZE,
    "patch_size": 16,
    "vision_num_hidden_layers": 12,
    "vision_hidden_size": 96,
    "vision_intermediate_size": 288,
    "vision_num_attention_heads": 4,
    "text_hidden_size": 128,
    "text_num_hidden_layers": 3,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 4,
    "text_intermediate_size": 320,
    "max_position_embeddings": 512,
    "bpe_vocab_size": 400,
}

TRAIN = {
    "n_train_scenes": 15000,
    "pope_per_scene": 4,  # presence questions per scene and step (yes / no alternating), drawn afresh each time
    "qa_per_scene": 2,  # short-answer questions per scene and step (incl. the scene's designated one)
    "scenes_per_step": 32,
    "steps_a": 1200,  # A: LLM on symbolic image tokens
    "lr_a": 2e-3,
    "warmup_a": 100,
    "steps_v": 1200,  # V: vision tower + projector onto the symbolic tokens
    "lr_v": 2e-3,
    "warmup_v": 100,
    "steps_b": 600,  # B: end to end
    "lr_b": 5e-4,
    "warmup_b": 50,
    "min_lr_ratio": 0.05,
    "weight_decay": 0.05,
    "mse_weight": 1.0,
    "aux_weight_b": 0.5,
    "grad_clip": 1.0,
    "n_val_pope": 300,
    "n_val_qa": 300,
    "eval_every": 150,
}


# ----------------------------------------------------------------------------------------------------------------
# tokenizer, processor, model
# ----------------------------------------------------------------------------------------------------------------


def corpus() -> list[str]:
    """Everything the model will ever read or write, so that words are whole BPE pieces."""
    lines = [tiny.VICUNA_SYSTEM_PROMPT, "USER:", "ASSISTANT:", scenes.POST_PROMPT.strip()]
    answers = ["yes", "no", *scenes.COLOURS, *scenes.SHAPES, *[str(v) for v in scenes.COUNT_VALUES]]
    for c, s in scenes.CLASSES:
        lines.append(scenes.pope_question(c, s))
    for s in scenes.SHAPES:
        lines += [scenes.colour_question(s), scenes.count_question(s)]
    for c in scenes.COLOURS:
        lines.append(scenes.shape_question(c))
    full = [
        f"{tiny.VICUNA_SYSTEM_PROMPT} USER: <image>\n{q}{scenes.POST_PROMPT} ASSISTANT: {a}"
        for q, a in zip(lines, answers * 4)
    ]
    return (lines + full + [" ".join(answers)]) * 20


def build_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        **asset_build.clip_image_processor_kwargs(ARCH["image_size"]),
        do_pad=True,  # pad to square with the mean colour, as the official LLaVA-1.5 evaluation (and this training)
    )
    return asset_build.llava_style_processor(
        LlavaProcessor, tokenizer, ARCH["patch_size"], tiny.CHAT_TEMPLATE, image_processor=image_processor
    )


def build_model(tokenizer, seed: int):
    from transformers import LlavaForConditionalGeneration

    p = {**tiny.DEFAULTS, **{k: v for k, v in ARCH.items() if k in tiny.DEFAULTS}}
    config = tiny._make_configs(p, tokenizer)
    config.vision_config.attention_dropout = 0.0
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = asset_build.greedy_generation_config(tokenizer, max_new_tokens=8)
    return model


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


def patch_labels(scene: scenes.Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (raster order): the class covering most of it (0 = none, else 1 + class index) and the class of
    the object whose centre lies in it (0 = none). Computed from the object list by rendering a label map."""
    from PIL import Image, ImageDraw

    size, patch = ARCH["image_size"], ARCH["patch_size"]
    label = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(label)
    for o in scene.objects:
        k = 1 + scenes.CLASSES.index((o.colour, o.shape))
        if o.shape == "circle":
            draw.ellipse([o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r], fill=k)
        else:
            draw.polygon(scenes._polygon(o.shape, o.cx, o.cy, o.r, o.angle), fill=k)
    arr = (
        np.asarray(label)
        .reshape(size // patch, patch, size // patch, patch)
        .transpose(0, 2, 1, 3)
        .reshape(-1, patch * patch)
    )
    cover = np.zeros(arr.shape[0], dtype=np.int64)
    for i, row in enumerate(arr):
        counts = np.bincount(row, minlength=len(scenes.CLASSES) + 1)
        counts[0] = 0
        if counts.max() >= 0.15 * patch * patch:
            cover[i] = counts.argmax()
    centre = np.zeros(arr.shape[0], dtype=np.int64)
    side = size // patch
    for o in scene.objects:
        r, c = min(int(o.cy // patch), side - 1), min(int(o.cx // patch), side - 1)
        centre[r * side + c] = 1 + scenes.CLASSES.index((o.colour, o.shape))
    return cover, centre


class Encoder:
    """(question, answer) -> token ids exactly as the harness builds the prompt, plus the answer and </s>."""

    def __init__(self, builder: LlavaInputBuilder, n_image_tokens: int):
        self.builder = builder
        self.tok = builder.tokenizer
        self.n_image_tokens = n_image_tokens
        self.cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def __call__(self, question: str, answer: str) -> tuple[list[int], int]:
        key = (question, answer)
        if key not in self.cache:
            prompt = self.builder.prompt(question + scenes.POST_PROMPT, 1)
            ids = tokenize_with_images(self.tok, prompt, self.builder.image_token_id, self.n_image_tokens)
            target = self.tok(" " + answer, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            self.cache[key] = (ids + target, len(ids))
        return self.cache[key]


def pixels(images: list, builder: LlavaInputBuilder, check: bool = False) -> torch.Tensor:
    """uint8 [N, 3, H, W] from square PIL images at the model's size (normalised on the fly in ``normalise``)."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2)
    out = torch.from_numpy(np.ascontiguousarray(arr))
    if check:  # the fast path must equal the harness's image processor exactly
        ref = builder.image_processor(images, return_tensors="pt")["pixel_values"]
        diff = (normalise(out) - ref).abs().max().item()
        if diff > 1e-5:
            raise RuntimeError(f"training preprocessing differs from the harness's by {diff}")
    return out


_MEAN = torch.tensor(tiny.CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(tiny.CLIP_STD).view(1, 3, 1, 1)


def normalise(u8: torch.Tensor) -> torch.Tensor:
    return ((u8.float() * (1 / 255)) - _MEAN) / _STD


def _train_chunk(args: tuple[int, int, int]) -> dict:
    """Scenes [start, stop) of the training split: uint8 pixels, per-patch labels, object lists, designated QA."""
    start, stop, seed = args
    images, cover, centre, classes, designated = [], [], [], [], []
    for i in range(start, stop):
        scene, qa = scenes.train_scene(i, seed)
        images.append(np.asarray(scenes.render(scene)))
        a, b = patch_labels(scene)
        cover.append(a)
        centre.append(b)
        classes.append(scene.classes())
        designated.append(qa)
    return {
        "images": np.stack(images).transpose(0, 3, 1, 2).copy(),
        "cover": np.stack(cover),
        "centre": np.stack(centre),
        "classes": classes,
        "designated": designated,
    }


def build_train_set(n: int, seed: int, workers: int) -> dict:
    """The training split's first n scenes, built in ``workers`` processes (each scene is seeded on its own)."""
    step = 1000
    jobs = [(a, min(n, a + step), seed) for a in range(0, n, step)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_train_chunk, jobs)
    else:
        parts = [_train_chunk(j) for j in jobs]
    return {
        "images": torch.from_numpy(np.concatenate([p["images"] for p in parts])),
        "cover": torch.from_numpy(np.concatenate([p["cover"] for p in parts])),
        "centre": torch.from_numpy(np.concatenate([p["centre"] for p in parts])),
        "classes": [c for p in parts for c in p["classes"]],
        "designated": [d for p in parts for d in p["designated"]],
    }


def check_pixels(builder: LlavaInputBuilder, seed: int, n: int = 8) -> float:
    """The training pixels (uint8 render, normalised here) must equal the harness's image processor output."""
    images = [scenes.render(scenes.train_scene(i, seed)[0]) for i in range(n)]
    return pixels(images, builder, check=True).shape[0]


def questions_for(rng: random.Random, data: dict, i: int, k_pope: int, k_qa: int) -> list[tuple[str, str]]:
    """Fresh questions for scene i each time it is drawn: its designated question (if any) + presence + QA."""
    extra = [data["designated"][i]] if data["designated"][i] else []
    drawn = scenes.training_questions(rng, data["classes"][i], k_pope, k_qa)
    return (extra + [qa for qa in drawn if qa not in extra])[: k_pope + k_qa]


def eval_rows(rows: list[dict], encoder: Encoder, builder: LlavaInputBuilder):
    images = pixels([r["image"] for r in rows], builder, check=True)
    qs = [[encoder(r["question"], r["answer"])] for r in rows]
    return images, qs


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------


def vision_tokens(model, u8: torch.Tensor):
    """Projected feature-layer tokens [B, N, D_text] (what LLaVA feeds the LLM) and the feature layer [B, N, D_vis]."""
    out = model.model.get_image_features(
        pixel_values=normalise(u8),
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        output_hidden_states=True,
    )
    return torch.stack(list(out.pooler_output)), out.hidden_states[model.config.vision_feature_layer][:, 1:]


def answer_logits(model, feats: torch.Tensor, seqs_per_image: list[list[tuple[list[int], int]]]):
    """Answer-token logits (teacher forcing) for every question of every image, given its image tokens.

    Computes what ``LlavaForConditionalGeneration`` computes for each full sequence (image tokens scattered into the
    <image> positions, causal Llama), in three cached stages so that shared work runs once: the constant prompt
    head (system prompt, "USER: ") once per batch, the image tokens once per image, and only the question + answer
    tail once per question. Tails are right-padded, so no attention mask is needed (causal).
    ``check_forward`` compares this against the plain HF forward.
    Returns (logits [T, V], targets [T], owner [T] = question index of each target token).
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    embed = model.model.get_input_embeddings()
    image_id = model.config.image_token_id
    n_images, n_img = feats.shape[:2]
    seqs = [q for qs in seqs_per_image for q in qs]
    owner_image = torch.tensor([i for i, qs in enumerate(seqs_per_image) for _ in qs])
    head_len = seqs[0][0].index(image_id)
    head = seqs[0][0][:head_len]
    for s, _ in seqs:
        if (
            s[:head_len] != head
            or s[head_len : head_len + n_img] != [image_id] * n_img
            or image_id in s[head_len + n_img :]
        ):
            raise ValueError("every training sequence must share the prompt head and have one image block after it")
    cache = DynamicCache(config=lm.config)
    lm(inputs_embeds=embed(torch.tensor([head])), cache=cache, use_cache=True)
    cache.batch_select_indices(torch.zeros(n_images, dtype=torch.long))
    positions = torch.arange(head_len, head_len + n_img).unsqueeze(0)
    lm(inputs_embeds=feats, cache=cache, use_cache=True, position_ids=positions)
    cache.batch_select_indices(owner_image)
    offset = head_len + n_img
    tails = [s[offset:] for s, _ in seqs]
    width = max(len(t) for t in tails)
    ids = torch.full((len(tails), width), model.config.text_config.pad_token_id or 0, dtype=torch.long)
    rows, cols, tgt = [], [], []
    for r, ((s, start), t) in enumerate(zip(seqs, tails)):
        ids[r, : len(t)] = torch.tensor(t)
        for p in range(start, len(s)):  # the logit at p-1 predicts token p
            rows.append(r)
            cols.append(p - 1 - offset)
            tgt.append(s[p])
    positions = torch.arange(offset, offset + width).unsqueeze(0)
    hidden = lm(inputs_embeds=embed(ids), cache=cache, use_cache=True, position_ids=positions).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return logits, torch.tensor(tgt), torch.tensor(rows)


def forward(model, u8: torch.Tensor, seqs_per_image):
    feats, _ = vision_tokens(model, u8)
    return answer_logits(model, feats, seqs_per_image)


@torch.no_grad()
def check_forward(model, u8: torch.Tensor, seqs_per_image, tol: float = 1e-4) -> float:
    """The staged training forward must give the plain HF forward's logits (one sequence at a time)."""
    logits, _, _ = forward(model, u8, seqs_per_image)
    ref = []
    for i, qs in enumerate(seqs_per_image):
        for s, start in qs:
            full = model(input_ids=torch.tensor([s]), pixel_values=normalise(u8[i : i + 1])).logits[0]
            ref.append(full[start - 1 : len(s) - 1])
    diff = (logits - torch.cat(ref)).abs().max().item()
    if diff > tol:
        raise RuntimeError(f"staged training forward differs from the HF forward by {diff}")
    return diff


class SymbolicTokens(torch.nn.Module):
    """Training scaffold (not saved): an image token made from the patch's ground-truth labels, embedding(cover) +
    embedding(centre). Stage A teaches the LLM to answer from these; stages V and B teach the vision tower +
    projector to produce them from pixels."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.cover = torch.nn.Embedding(n_classes, dim)
        self.centre = torch.nn.Embedding(n_classes, dim)
        for e in (self.cover, self.centre):
            torch.nn.init.normal_(e.weight, std=0.02)

    def forward(self, cover: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        return self.cover(cover) + self.centre(centre)


def exact(logits: torch.Tensor, tgt: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Per sequence: every answer token (and </s>) is the argmax -> greedy decoding returns exactly the answer."""
    wrong = torch.zeros(n, dtype=torch.long).index_add_(0, owner, (logits.argmax(-1) != tgt).long())
    return wrong == 0


@torch.no_grad()
def evaluate(model, images, qs, batch: int = 100) -> float:
    model.eval()
    hits = []
    for s in range(0, len(qs), batch):
        logits, tgt, owner = forward(model, images[s : s + batch], qs[s : s + batch])
        hits.append(exact(logits, tgt, owner, len(qs[s : s + batch])))
    model.train()
    return torch.cat(hits).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# harness-path evaluation (what lmms-eval runs: the input builder + generate)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(model, processor, rows: list[dict], batch: int = 50, prune=None) -> list[str]:
    """Greedy answers through the harness's own input builder + ``model.generate`` (optionally under a method)."""
    import contextlib

    import hiprune

    builder = LlavaInputBuilder(processor, prompt_style="llava_v1")  # the prompt the scene model was trained with
    tok = processor.tokenizer
    answers = []
    with hiprune.apply(model, prune) if prune is not None else contextlib.nullcontext() as session:
        n_tokens = session.tokens_per_image() if session is not None else model.config.image_seq_length
        for s in range(0, len(rows), batch):
            chunk = rows[s : s + batch]
            inputs = builder(
                [r["question"] + scenes.POST_PROMPT for r in chunk], [[r["image"]] for r in chunk], n_tokens
            )
            out = model.generate(
                **inputs, max_new_tokens=8, do_sample=False, pad_token_id=builder.pad_id, eos_token_id=tok.eos_token_id
            )
            answers += [
                a.strip() for a in tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            ]
    return answers


def pope_metrics(rows, answers) -> dict:
    tp = sum(1 for r, a in zip(rows, answers) if r["answer"] == "yes" and a.lower() == "yes")
    fp = sum(1 for r, a in zip(rows, answers) if r["answer"] == "no" and a.lower() == "yes")
    fn = sum(1 for r, a in zip(rows, answers) if r["answer"] == "yes" and a.lower() != "yes")
    acc = sum(1 for r, a in zip(rows, answers) if a.lower() == r["answer"]) / len(rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    by_cat = {}
    for cat in scenes.POPE_CATEGORIES:
        sub = [(r, a) for r, a in zip(rows, answers) if r["category"] == cat]
        by_cat[cat] = sum(1 for r, a in sub if a.lower() == r["answer"]) / max(1, len(sub))
    return {"accuracy": acc, "f1": f1, "precision": precision, "recall": recall, "by_category": by_cat}


def qa_metrics(rows, answers) -> dict:
    hit = [a.lower().strip(".") == r["answer"] for r, a in zip(rows, answers)]
    by_type = {}
    for t in scenes.QA_TYPES:
        sub = [h for h, r in zip(hit, rows) if r["category"] == t]
        by_type[t] = sum(sub) / max(1, len(sub))
    return {"exact_match": sum(hit) / len(hit), "by_type": by_type}


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def schedule(step: int, steps: int, base: float, warmup: int, min_ratio: float | None) -> float:
    """Linear warm-up, then cosine decay to base * min_ratio (constant when min_ratio is None)."""
    warm = min(1.0, step / max(1, warmup))
    if min_ratio is None:
        return base * warm
    progress = min(1.0, max(0.0, (step - warmup) / max(1, steps - warmup)))
    return base * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params, lr: float):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8), params


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-8)


@torch.no_grad()
def evaluate_symbolic(model, sym, cover, centre, qs, batch: int = 100) -> float:
    hits = []
    for s in range(0, len(qs), batch):
        logits, tgt, owner = answer_logits(model, sym(cover[s : s + batch], centre[s : s + batch]), qs[s : s + batch])
        hits.append(exact(logits, tgt, owner, len(qs[s : s + batch])))
    return torch.cat(hits).float().mean().item()


def train(args) -> dict:
    """Three stages (one script, one seed):

    A. LLM on symbolic image tokens (ground-truth patch labels -> embeddings): learns to read an image block
       and answer, without waiting for a vision tower;
    V. vision tower + projector alone: per-patch label heads + regression onto the (frozen) symbolic tokens;
    B. everything end to end on pixels: answer loss + the two stage-V losses, best validation checkpoint kept.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal optimizer states otherwise slow CPU steps down several-fold
    seed_everything(args.seed)
    t_start = time.perf_counter()
    c_start = time.process_time()
    timings = {}

    tokenizer = tiny.build_tokenizer(ARCH["bpe_vocab_size"], corpus(), model_max_length=ARCH["max_position_embeddings"])
    processor = build_processor(tokenizer)
    builder = LlavaInputBuilder(processor, prompt_style="llava_v1")  # the trained prompt; pil, pad_to_square
    model = build_model(tokenizer, args.seed)
    encoder = Encoder(builder, model.config.image_seq_length)

    t0 = time.perf_counter()
    seed = scenes.SPLIT_SEEDS["train"] + args.seed
    check_pixels(builder, seed)
    data = build_train_set(args.n_train, seed, args.workers)
    n_train = len(data["classes"])
    val_rows = scenes.pope_rows(TRAIN["n_val_pope"], scenes.SPLIT_SEEDS["val"]) + scenes.qa_rows(
        TRAIN["n_val_qa"], scenes.SPLIT_SEEDS["val"] + 1
    )
    val_images, val_qs = eval_rows(val_rows, encoder, builder)
    val_labels = [patch_labels(r["scene"]) for r in val_rows]
    val_cover = torch.from_numpy(np.stack([a for a, _ in val_labels]))
    val_centre = torch.from_numpy(np.stack([b for _, b in val_labels]))
    n_vp = TRAIN["n_val_pope"]
    timings["data_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[data] {n_train} train scenes, {len(val_rows)} val rows in {timings['data_seconds']:.0f}s", flush=True)

    n_classes = len(scenes.CLASSES) + 1
    sym = SymbolicTokens(model.config.text_config.hidden_size, n_classes)
    aux_head = torch.nn.Linear(model.config.vision_config.hidden_size, 2 * n_classes)
    gen = torch.Generator().manual_seed(args.seed)
    qrng = random.Random(f"questions:{args.seed}")
    state = {"order": torch.randperm(n_train, generator=gen), "cursor": 0, "epoch": 0}
    history: list[dict] = []

    def next_batch(size: int) -> torch.Tensor:
        if state["cursor"] + size > n_train:
            state["order"], state["cursor"] = torch.randperm(n_train, generator=gen), 0
            state["epoch"] += 1
        idx = state["order"][state["cursor"] : state["cursor"] + size]
        state["cursor"] += size
        return idx

    def questions(idx: torch.Tensor):
        return [
            [encoder(q, a) for q, a in questions_for(qrng, data, i, TRAIN["pope_per_scene"], TRAIN["qa_per_scene"])]
            for i in idx.tolist()
        ]

    def aux_loss(layer: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = aux_head(layer).reshape(-1, 2, n_classes)
        return F.cross_entropy(logits[:, 0], data["cover"][idx].reshape(-1)) + F.cross_entropy(
            logits[:, 1], data["centre"][idx].reshape(-1)
        )

    def validate(stage: str, step: int, symbolic: bool = False) -> dict:
        model.eval()
        if symbolic:
            hits = evaluate_symbolic(model, sym, val_cover, val_centre, val_qs)
            pope = qa = None
            acc = hits
        else:
            pope = evaluate(model, val_images[:n_vp], val_qs[:n_vp])
            qa = evaluate(model, val_images[n_vp:], val_qs[n_vp:])
            acc = None
        model.train()
        entry = {"stage": stage, "step": step, "seconds": round(time.perf_counter() - t_start, 1)}
        entry.update({"val_symbolic_exact": acc} if symbolic else {"val_pope_acc": pope, "val_qa_em": qa})
        history.append(entry)
        print(f"[val] {entry}", flush=True)
        return entry

    def run_stage(
        name: str, steps: int, lr: float, warmup: int, min_ratio, params, loss_fn, every: int = 0, on_eval=None
    ):
        opt, params = make_optimizer(params, lr)
        t_stage, ema = time.perf_counter(), None
        for step in range(1, steps + 1):
            for g in opt.param_groups:
                g["lr"] = schedule(step, steps, lr, warmup, min_ratio)
            loss, parts = loss_fn(next_batch(args.batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, TRAIN["grad_clip"])
            opt.step()
            parts = {k: v.item() for k, v in parts.items()}
            ema = parts if ema is None else {k: 0.95 * ema[k] + 0.05 * v for k, v in parts.items()}
            if step % 50 == 0:
                shown = " ".join(f"{k} {v:.3f}" for k, v in ema.items())
                print(
                    f"[{name}] step {step}/{steps} {time.perf_counter() - t_stage:.0f}s epoch {state['epoch']} {shown}",
                    flush=True,
                )
            if on_eval is not None and every and (step % every == 0 or step == steps):
                on_eval(step)
        timings[f"stage_{name}_seconds"] = round(time.perf_counter() - t_stage, 1)

    model.train()
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    vision_params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())

    # A: the LLM learns the task on symbolic image tokens
    def loss_a(idx):
        logits, tgt, _ = answer_logits(model, sym(data["cover"][idx], data["centre"][idx]), questions(idx))
        loss = F.cross_entropy(logits, tgt)
        return loss, {"lm": loss}

    run_stage("A", args.steps_a, TRAIN["lr_a"], TRAIN["warmup_a"], None, lm_params + list(sym.parameters()), loss_a)
    validate("A", args.steps_a, symbolic=True)
    sym.requires_grad_(False)

    # V: the vision tower + projector learn to produce those tokens from pixels
    def loss_v(idx):
        feats, layer = vision_tokens(model, data["images"][idx])
        aux = aux_loss(layer, idx)
        mse = relative_mse(feats, sym(data["cover"][idx], data["centre"][idx]))
        return aux + TRAIN["mse_weight"] * mse, {"aux": aux, "mse": mse}

    run_stage(
        "V",
        args.steps_v,
        TRAIN["lr_v"],
        TRAIN["warmup_v"],
        TRAIN["min_lr_ratio"],
        vision_params + list(aux_head.parameters()),
        loss_v,
    )
    entry = validate("V", args.steps_v)

    # B: end to end on pixels; the end of V is the first candidate for the kept checkpoint
    check_forward(model, data["images"][:2], questions(torch.arange(2)))
    best = {
        "score": entry["val_pope_acc"] + entry["val_qa_em"],
        "step": 0,
        "entry": entry,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }

    def loss_b(idx):
        feats, layer = vision_tokens(model, data["images"][idx])
        logits, tgt, _ = answer_logits(model, feats, questions(idx))
        lm = F.cross_entropy(logits, tgt)
        aux = aux_loss(layer, idx)
        mse = relative_mse(feats, sym(data["cover"][idx], data["centre"][idx]))
        return lm + TRAIN["aux_weight_b"] * (aux + TRAIN["mse_weight"] * mse), {"lm": lm, "aux": aux, "mse": mse}

    def keep_best(step):
        entry = validate("B", step)
        score = entry["val_pope_acc"] + entry["val_qa_em"]
        if score > best["score"]:
            best.update(
                score=score,
                step=step,
                entry=entry,
                state={k: v.detach().clone() for k, v in model.state_dict().items()},
            )

    run_stage(
        "B",
        args.steps_b,
        TRAIN["lr_b"],
        TRAIN["warmup_b"],
        TRAIN["min_lr_ratio"],
        list(model.parameters()) + list(aux_head.parameters()),
        loss_b,
        every=args.eval_every,
        on_eval=keep_best,
    )
    model.load_state_dict(best["state"])
    model.eval()
    children = os.times()
    info = {
        "seed": args.seed,
        "threads": args.threads,
        "data_workers": args.workers,
        "steps": {"A": args.steps_a, "V": args.steps_v, "B": args.steps_b},
        "epochs_completed": state["epoch"],
        "best_step_B": best["step"],
        "val_pope_accuracy": best["entry"]["val_pope_acc"],
        "val_qa_exact_match": best["entry"]["val_qa_em"],
        **timings,
        "wall_seconds_total": round(time.perf_counter() - t_start, 1),
        "cpu_seconds_total": round(
            time.process_time() - c_start + children.children_user + children.children_system, 1
        ),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "history": history,
    }
    return {"model": model, "processor": processor, "info": info}


def save(out: Path, model, processor, info: dict) -> None:
    """Write the checkpoint: weights stored as float16 safetensors (half the size; the model is float32 and its
    config says so, so ``from_pretrained`` loads float32 by default; the documented accuracies are measured on
    the reloaded files, see ``finalize``), processor, tokenizer, chat template and training.json."""
    import copy

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy.deepcopy(model).to(torch.float16).save_pretrained(tmp)
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config", {}), config.get("vision_config", {})):
        if "dtype" in section:
            section["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.chmod(0o644)
    (tmp / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def load(path: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


# Rows the tests evaluate (tests/test_scene_model.py): the first rows of the test split, full model and pruned.
TEST_SUBSET = {"pope": 300, "qa": 300}
PRUNED = [("random", 32), ("hiprune", 32), ("random", 16), ("hiprune", 16), ("random", 8), ("hiprune", 8)]


def test_metrics(model, processor, n_pope: int, n_qa: int, methods=()) -> dict:
    """Test-split accuracy through the harness path (LlavaInputBuilder + generate), full model and under methods;
    also on the subset the tests use."""
    import hiprune

    t0 = time.perf_counter()
    pope = scenes.pope_rows(n_pope, scenes.SPLIT_SEEDS["test"])
    qa = scenes.qa_rows(n_qa, scenes.SPLIT_SEEDS["test"] + 1)
    out = {"n_pope": n_pope, "n_qa": n_qa}
    for name, budget in [("none", None), *methods]:
        method = None if name == "none" else hiprune.build_method(name, budget=budget)
        pope_answers = generate_answers(model, processor, pope, prune=method)
        qa_answers = generate_answers(model, processor, qa, prune=method)
        key = "full" if name == "none" else f"{name}@{budget}"
        out[key] = {"pope": pope_metrics(pope, pope_answers), "qa": qa_metrics(qa, qa_answers)}
        sub_p, sub_q = TEST_SUBSET["pope"], TEST_SUBSET["qa"]
        out[key]["subset"] = {
            "pope_accuracy": pope_metrics(pope[:sub_p], pope_answers[:sub_p])["accuracy"],
            "qa_exact_match": qa_metrics(qa[:sub_q], qa_answers[:sub_q])["exact_match"],
            "n_pope": sub_p,
            "n_qa": sub_q,
        }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def training_md(info: dict) -> str:
    """TRAINING.md of the model folder, from training.json."""
    t, a, tr, v = info["test"], info["arch"], info["train"], info["versions"]
    side = a["image_size"] // a["patch_size"]
    vision = (
        f"CLIP ViT from scratch: {a['image_size']} px, patch {a['patch_size']} -> {side} x {side} = {side * side} "
        f"patch tokens + CLS, {a['vision_num_hidden_layers']} layers, hidden {a['vision_hidden_size']}, "
        f"MLP {a['vision_intermediate_size']}, {a['vision_num_attention_heads']} heads; feature layer -2 "
        f"(= {a['vision_num_hidden_layers'] - 1}), HiPrune object layer 9"
    )
    llm = (
        f"Llama: {a['text_num_hidden_layers']} layers, hidden {a['text_hidden_size']}, MLP {a['text_intermediate_size']}, "
        f"{a['text_num_attention_heads']} heads, context {a['max_position_embeddings']}"
    )
    stages = " / ".join(str(info.get(f"stage_{k}_seconds")) for k in "AVB")
    lines = [
        "# scene-llava: how these weights were made",
        "",
        "A small `LlavaForConditionalGeneration` trained from scratch on CPU on procedural scenes of coloured shapes",
        "(`scripts/scenes.py`), for offline checks where pruning quality must show in accuracy. Made by:",
        "",
        "```bash",
        f"HF_HUB_OFFLINE=1 {info['command']}",
        "```",
        "",
        (
            f"- seed {info['seed']}; torch threads {info['threads']}, {info['data_workers']} processes building the "
            "training scenes;"
        ),
        f"  torch {v['torch']}, transformers {v['transformers']}, Python {v['python']}",
        (
            f"- time: {info['wall_seconds_total'] / 60:.1f} min wall clock, {info['cpu_seconds_total'] / 60:.1f} min CPU "
            "(this process + data"
        ),
        (
            "  workers) for data + training + validation, on a shared 2-core machine (load average at the end "
            f"{info['load_average_at_end']});"
        ),
        f"  stages A / V / B {stages} s, data {info.get('data_seconds')} s",
        f"- {info['n_parameters']:,} parameters, stored as float16 safetensors, loaded as float32 (the config's dtype);",
        "  accuracies below are measured on the stored files",
        "",
        "## Architecture",
        "",
        "| part | config |",
        "|---|---|",
        f"| vision | {vision} |",
        "| projector | LLaVA's linear-GELU-linear |",
        f"| LLM | {llm} |",
        (
            "| tokenizer | local byte-fallback BPE (scripts/build_tiny_llava.py's recipe) on the task's sentences; "
            "Vicuna-v1 chat template |"
        ),
        "| processor | pad to square with the mean colour, bicubic resize, CLIP mean/std (LlavaImageProcessorPil) |",
        "",
        "## Training (scripts/train_scene_vlm.py)",
        "",
        (
            f"{tr['n_train_scenes']} training scenes, {tr['scenes_per_step']} scenes per step, each with "
            f"{tr['pope_per_scene']} presence and {tr['qa_per_scene']} short-answer questions drawn afresh every time;"
        ),
        (
            "the prompt and preprocessing are the harness's (Vicuna v1 with system prompt, `<image>\\n` + question + "
            "lmms-eval's"
        ),
        "post prompt, chunk-wise tokenisation, pad-to-square, PIL). Loss on the answer tokens and `</s>` only.",
        "",
        (
            f"- A ({info['steps']['A']} steps): the LLM learns the task on *symbolic* image tokens (embeddings of each "
            "patch's"
        ),
        "  ground-truth labels: which colour-shape covers it, which object centre lies in it);",
        (
            f"- V ({info['steps']['V']} steps): vision tower + projector learn to produce those tokens from pixels "
            "(per-patch label"
        ),
        "  heads + regression onto the frozen symbolic tokens);",
        (
            f"- B ({info['steps']['B']} steps): everything end to end on pixels (answer loss + the stage-V losses at "
            f"weight {tr['aux_weight_b']}); the best validation checkpoint (step {info['best_step_B']}) is kept."
        ),
        "",
        "The label heads and symbolic embeddings are training scaffolding and are not saved.",
        (
            f"Validation (300 + 300 rows): POPE {info['val_pope_accuracy']:.3f}, "
            f"QA exact match {info['val_qa_exact_match']:.3f}."
        ),
        "",
        f"## Test split ({t['n_pope']} POPE + {t['n_qa']} QA rows, harness input builder + greedy generate)",
        "",
        "| method | tokens | POPE acc | POPE F1 | adversarial | popular | random | QA EM | color | shape | count |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, result in t.items():
        if not isinstance(result, dict) or "pope" not in result:
            continue
        p, q = result["pope"], result["qa"]
        name, _, budget = key.partition("@")
        cells = [
            name if name != "full" else "none",
            budget or str(side * side),
            *(f"{x:.3f}" for x in (p["accuracy"], p["f1"], *(p["by_category"][c] for c in scenes.POPE_CATEGORIES))),
            *(f"{x:.3f}" for x in (q["exact_match"], *(q["by_type"][k] for k in scenes.QA_TYPES))),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Chance: POPE 0.5 (balanced yes/no); QA about 0.28 (colour 1/4, shape 1/3, count 1/4; answers balanced per type).",
        (
            f"tests/test_scene_model.py checks the first {TEST_SUBSET['pope']} + {TEST_SUBSET['qa']} rows against the "
            "`subset` numbers in training.json."
        ),
        "",
    ]
    return "\n".join(lines)


def finalize(out: Path, info: dict, n_pope: int, n_qa: int) -> dict:
    """Reload the stored checkpoint, measure test accuracies (full + pruned) on it, write training.json + TRAINING.md."""
    model, processor = load(out)
    info["test"] = test_metrics(model, processor, n_pope, n_qa, PRUNED)
    (Path(out) / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (Path(out) / "TRAINING.md").write_text(training_md(info))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-a", type=int, default=TRAIN["steps_a"], help="stage A steps (LLM on symbolic tokens)")
    ap.add_argument("--steps-v", type=int, default=TRAIN["steps_v"], help="stage V steps (vision tower + projector)")
    ap.add_argument("--steps-b", type=int, default=TRAIN["steps_b"], help="stage B steps (end to end)")
    ap.add_argument("--n-train", type=int, default=TRAIN["n_train_scenes"])
    ap.add_argument("--batch", type=int, default=TRAIN["scenes_per_step"], help="scenes per step")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a contended machine)")
    ap.add_argument("--eval-every", type=int, default=TRAIN["eval_every"], help="stage-B steps between validations")
    ap.add_argument("--workers", type=int, default=2, help="processes building the training scenes")
    ap.add_argument("--n-test-pope", type=int, default=600)
    ap.add_argument("--n-test-qa", type=int, default=600)
    ap.add_argument(
        "--finalize-only", action="store_true", help="re-measure and re-document an existing --out checkpoint"
    )
    args = ap.parse_args(argv)

    if args.finalize_only:
        info = json.loads((args.out / "training.json").read_text())
        info = finalize(args.out, info, args.n_test_pope, args.n_test_qa)
        print(json.dumps(info["test"]["full"], indent=1))
        return 0

    result = train(args)
    model, processor, info = result["model"], result["processor"], result["info"]
    import transformers

    info.update(
        {
            "command": "python -m scripts.train_scene_vlm " + " ".join(argv if argv is not None else sys.argv[1:]),
            "arch": ARCH,
            "train": {
                **TRAIN,
                "n_train_scenes": args.n_train,
                "scenes_per_step": args.batch,
                "steps_a": args.steps_a,
                "steps_v": args.steps_v,
                "steps_b": args.steps_b,
            },
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        }
    )
    save(args.out, model, processor, info)
    info = finalize(args.out, info, args.n_test_pope, args.n_test_qa)
    print(
        json.dumps(
            {
                "full": info["test"]["full"],
                **{k: info[k] for k in ("wall_seconds_total", "cpu_seconds_total", "best_step_B")},
            },
            indent=1,
        )
    )
    print(f"[done] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
