"""Object-layer probe (the paper's Fig. 8 and Table 1): pick HiPrune's object layer for a vision encoder.

    python -m eval.report.probe --images DIR [--model llava15_7b] [--top 0.05] [--masks DIR] [--out results/probe/NAME]
    python -m eval.report.probe --images DIR --model tiny_llava --device cpu --limit 16

For every encoder layer l and every image: the global-attention score of layer l (mean over heads and queries, CLS
key dropped; the same score HiPrune ranks by) picks the top ``--top`` fraction of patch tokens; their features at
the encoder's last layer (its output hidden state, before any post-layernorm) are compared by mean pairwise
Euclidean distance. Averaged over the images, this gives the *dispersion curve*: low where a layer's high-attention
tokens sit on one object (similar features), high where they spread over the image (the deep layers' global,
register-like tokens). The paper splits CLIP-L into shallow (1-4), middle (5-9) and deep (10+) layers from it and
sets the object layer at the transition, l = 9. The suggested layer printed here is the layer just before the
largest rise of the curve (a heuristic for that transition: look at the plot).

Overlap (IoU-style) plot: the mean IoU of the top-token sets of every pair of layers (a layer x layer heatmap)
and of adjacent layers, showing where the attention pattern changes; with ``--masks`` (binary masks, same file
stem as the image, any PIL format; non-zero = object), also the IoU of each layer's top tokens with the object
patches (the mask padded and resized like the image, a patch counts as object when more than half of it is),
as in the paper's Table 1.

Writes <out>/dispersion.{png,pdf}, <out>/overlap.{png,pdf}, <out>/probe.json (per-layer values and the suggestion)
and <out>/probe.csv. A progress bar counts the images; unreadable images are reported and skipped (listed in
probe.json's notes); a sample smaller than MIN_IMAGES images, or a ``--top`` fraction that leaves fewer than two tokens,
is warned about (and noted in probe.json): the curve and the suggested layer are then noisy. Works for fixed-grid
towers (CLIP on LLaVA-1.5; SigLIP on LLaVA-OneVision, base image), InternVL3 (every image as one 448-px tile: its 16 x
16 pixel-shuffled tokens) and Qwen3-VL (every image resized to ``--side`` x ``--side`` px, default 1024: 32 x 32 merged
tokens); on the last two a token's score and feature are the means over its 2 x 2 patches, as the adapter gives them
to HiPrune. Scores come from the adapter's attention modules through hiprune.capture, with SDPA kept for the layer
outputs. Not for Qwen2.5-VL (windowed blocks score per window) or Video-LLaVA / LLaVA-NeXT beyond their CLIP grid.

    python -m eval.report.probe --images DIR --model internvl3_8b --limit 500
    python -m eval.report.probe --images DIR --model qwen3vl_8b --limit 500 [--side 1024]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageFile
from tqdm.auto import tqdm

import hiprune
from eval.config import REPO_ROOT, compose_config
from eval.report.plots import save_figure  # png + pdf, closes the figure
from eval.report.visualize import input_builder, load_vlm
from hiprune.capture import AttentionScores, Capture, Tap

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MIN_IMAGES = 20  # below this, the per-layer means (and the layer of the largest rise) move with the sample


@dataclass
class ProbeResult:
    layers: list[int]
    dispersion: list[float]  # mean pairwise distance per layer (1-based layers)
    dispersion_std: list[float]  # spread over images
    overlap: list[list[float]]  # mean IoU of top-token sets, layer x layer
    mask_iou: list[float] | None  # mean IoU of top tokens with the object mask, per layer
    suggested_layer: int
    top_fraction: float
    top_k: int
    n_images: int
    grid: tuple[int, int]
    notes: list[str] = field(default_factory=list)
    encoder_input: str = ""  # what the encoder saw of each image (ProbeView.input)


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths[:limit] if limit else paths


def read_images(paths: list[Path]) -> tuple[list[Path], list[Image.Image], list[str]]:
    """(readable paths, their RGB images, one message per unreadable file): a broken or truncated file is reported
    and skipped, never decoded partly (strict decoding here, whatever lmms-eval set PIL's LOAD_TRUNCATED_IMAGES to)."""
    kept, images, skipped = [], [], []
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        for path in paths:
            try:
                with Image.open(path) as handle:
                    handle.load()
                    images.append(handle.convert("RGB"))
                kept.append(path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                skipped.append(f"skipped unreadable image {path}: {exc}")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return kept, images, skipped


def sample_warnings(n_images: int, num_tokens: int, top: float) -> list[str]:
    """Warnings about a sample too small for the probe's statistics."""
    out = []
    if n_images < MIN_IMAGES:
        out.append(f"only {n_images} image(s): the dispersion curve and the suggested layer are noisy below "
                   f"{MIN_IMAGES} images" + ("; no spread over images with one" if n_images < 2 else ""))
    if int(num_tokens * top) < 2:
        out.append(f"--top {top} of {num_tokens} tokens is {int(num_tokens * top)} token(s): 2 are used (a distance "
                   "needs two)")
    return out


def suggest_object_layer(dispersion: list[float]) -> int:
    """1-based layer just before the largest increase of the dispersion curve."""
    if len(dispersion) < 2:
        return 1
    rises = [dispersion[i + 1] - dispersion[i] for i in range(len(dispersion) - 1)]
    return int(np.argmax(rises)) + 1


def _iou(a: set[int], b: set[int]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def mask_patches(mask: Image.Image, grid: tuple[int, int], pad_to_square: bool = True) -> set[int]:
    """Patch indices (raster order) covered more than half by a binary mask, after the image's pad + resize."""
    values = np.asarray(mask.convert("L"), dtype=np.float32) > 0
    h, w = values.shape
    if pad_to_square and h != w:  # LLaVA pads the shorter side symmetrically
        side = max(h, w)
        canvas = np.zeros((side, side), dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = values
        values = canvas
    rows, cols = grid
    resized = Image.fromarray((values * 255).astype(np.uint8)).resize((cols * 8, rows * 8), Image.BILINEAR)
    cover = np.asarray(resized, dtype=np.float32).reshape(rows, 8, cols, 8).mean(axis=(1, 3)) / 255.0
    return {int(i) for i in np.flatnonzero(cover.reshape(-1) > 0.5)}


@dataclass
class ProbeView:
    """How the probe reads one family's encoder: the token grid of one image, and per batch of images the per-layer
    scores [B, n] and the last layer's features [B, n, d] of that grid (from the adapter's geometry)."""

    grid: tuple[int, int]
    encode: Callable[[list[Image.Image]], tuple[dict[int, torch.Tensor], torch.Tensor]]
    pad_to_square: bool  # whether the image reaches the encoder padded to a square (masks are padded the same way)
    input: str  # what the encoder sees, for the records


def fixed_grid_view(adapter, processor, model_cfg, device, dtype) -> ProbeView:
    """Fixed-grid towers (CLIP on LLaVA-1.5, SigLIP on LLaVA-OneVision): one token per patch; anyres processors give
    the base image of every sample; the CLS key (where there is one) dropped."""
    builder = input_builder(processor, model_cfg)
    n_layers = adapter.num_encoder_layers()
    front = 1 if adapter.has_cls else 0  # a CLS token ahead of the patches (CLIP), none on SigLIP
    modules = {l: adapter.attention_module(l) for l in range(1, n_layers + 1)}
    grid = tuple(adapter.grid)

    def encode(images):
        pixels = builder.image_processor([img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]
        if pixels.dim() == 5:  # anyres processors (LLaVA-OneVision): the base image of every sample
            pixels = pixels[:, 0]
        with AttentionScores({str(l): m for l, m in modules.items()}) as capture:
            out = adapter.inner.vision_tower(pixels.to(device, dtype), output_hidden_states=True)
            scores = capture.collect()
        features = out.hidden_states[-1][:, front:, :].float()  # last encoder layer, CLS dropped
        if features.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"expected {grid[0] * grid[1]} patch tokens, got {features.shape[1]} (the probe reads "
                               f"one token per patch; the {adapter.family} encoder merges patches before the LLM)")
        return {l: scores[str(l)][:, front:].float() for l in modules}, features

    return ProbeView(grid, encode, builder.pad_to_square, "the image (base image of anyres processors)")


def internvl_view(adapter, processor, model_cfg, device, dtype) -> ProbeView:
    """InternVL3: every image as one 448-px tile (the whole image resized, ``max_patches=1``: no dynamic tiles, no
    thumbnail); scores and last-layer features of its 16 x 16 pixel-shuffled tokens, each the mean over its 2 x 2
    patches (the adapter's merged_captures: what HiPrune ranks on this family), CLS dropped."""
    n_layers = adapter.num_encoder_layers()
    modules = {str(l): adapter.attention_module(l) for l in range(1, n_layers + 1)}

    def encode(images):
        pixels = processor.image_processor([img.convert("RGB") for img in images], max_patches=1,
                                           crop_to_patches=True, return_tensors="pt")["pixel_values"]
        if pixels.shape[0] != len(images):
            raise RuntimeError(f"expected one tile per image, got {pixels.shape[0]} tiles for {len(images)} images")
        with AttentionScores(modules) as capture:
            out = adapter.inner.vision_tower(pixel_values=pixels.to(device, dtype), output_hidden_states=True)
            scores = capture.collect()
        merged = adapter.merged_captures({**scores, "features": out.hidden_states[-1]}, len(images))
        return {int(l): merged[l].float() for l in modules}, merged["features"].float()

    return ProbeView(tuple(adapter.grid), encode, False, "one 448-px tile per image (max_patches=1)")


def qwen3_vl_view(adapter, processor, model_cfg, device, dtype, side: int) -> ProbeView:
    """Qwen3-VL: the grid follows the image size, so every image is resized to ``side`` x ``side`` px (a multiple of
    the 32-px merged token; default 1024: 32 x 32 = 1024 merged tokens, the Qwen2.5-VL reference image); scores and
    last-block outputs per merged token, each the mean over its 2 x 2 patches (the adapter's merged_captures)."""
    unit = adapter.vision_config.patch_size * adapter.merge
    if side % unit:
        raise ValueError(f"--side {side} is not a multiple of Qwen3-VL's {unit}-px merged token")
    n_layers = adapter.num_encoder_layers()
    taps = {adapter.attention_module(l): [Tap(str(l), "attention", "all")] for l in range(1, n_layers + 1)}
    taps.setdefault(adapter.layer_module(n_layers), []).append(Tap("features", "hidden", "all"))

    def encode(images):
        resized = [img.convert("RGB").resize((side, side), Image.BICUBIC) for img in images]
        inputs = processor.image_processor(resized, size={"shortest_edge": side * side, "longest_edge": side * side},
                                           return_tensors="pt")
        grid_thw = inputs["image_grid_thw"]
        with Capture(taps) as capture:
            adapter.inner.visual(inputs["pixel_values"].to(device, dtype), grid_thw=grid_thw.to(device))
            merged = {name: torch.stack(adapter.merged_captures(capture.chunks.get(name), grid_thw))
                      for name in capture.names}
        return {int(name): merged[name].float() for name in merged if name != "features"}, merged["features"].float()

    return ProbeView((side // unit, side // unit), encode, False, f"the image resized to {side} x {side} px")


DEFAULT_SIDE = 1024  # Qwen3-VL: the probe's image side in pixels (32 x 32 merged tokens)


def probe_view(adapter, processor, model_cfg, device, dtype, side: int = DEFAULT_SIDE) -> ProbeView:
    """The probe's reading of ``adapter``'s encoder: a family view, or a fixed-grid tower."""
    if adapter.family == "qwen3_vl":
        return qwen3_vl_view(adapter, processor, model_cfg, device, dtype, side)
    if adapter.family == "internvl":
        return internvl_view(adapter, processor, model_cfg, device, dtype)
    if not isinstance(getattr(adapter, "grid", None), tuple):
        raise ValueError(f"the object-layer probe reads fixed-grid towers, InternVL3 and Qwen3-VL; the "
                         f"{adapter.family} encoder's grid depends on the image size and its blocks are windowed "
                         "(pick the layer by a sweep of method.options.object_layer)")
    return fixed_grid_view(adapter, processor, model_cfg, device, dtype)


@torch.no_grad()
def probe(model, processor, images: list[Image.Image], top: float = 0.05, masks: list[Image.Image | None] | None = None,
          batch_size: int = 8, model_cfg: dict | None = None, side: int = DEFAULT_SIDE) -> ProbeResult:
    """Dispersion and overlap per encoder layer of ``model`` (a VLM with a harness adapter) over ``images``
    (``side``: the image side in pixels on Qwen3-VL, whose grid follows the image size)."""
    if not 0 < top <= 1:
        raise ValueError(f"top must be a fraction in (0, 1], got {top}")
    adapter = hiprune.adapter_for(model)
    n_layers = adapter.num_encoder_layers()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    view = probe_view(adapter, processor, model_cfg or {}, device, dtype, side)
    grid = view.grid
    n = grid[0] * grid[1]
    k = max(2, int(n * top))

    notes = sample_warnings(len(images), n, top)
    distances = [[] for _ in range(n_layers)]
    overlap = np.zeros((n_layers, n_layers))
    mask_iou = np.zeros(n_layers)
    n_masked = 0
    progress = tqdm(total=len(images), desc="probe", unit="image")
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        progress.update(len(chunk))
        scores, features = view.encode(chunk)
        if tuple(features.shape[:2]) != (len(chunk), n):
            raise RuntimeError(f"the {adapter.family} probe view gave features {tuple(features.shape)}, expected "
                               f"({len(chunk)}, {n}, d) for a {grid[0]} x {grid[1]} grid")
        for b in range(len(chunk)):
            tops = []
            for l in range(1, n_layers + 1):
                s = scores[l][b]
                idx = torch.sort(-s, stable=True).indices[:k]
                tops.append(set(idx.tolist()))
                distances[l - 1].append(float(torch.pdist(features[b, idx]).mean()))
            for i in range(n_layers):
                for j in range(n_layers):
                    overlap[i, j] += _iou(tops[i], tops[j])
            mask = None if masks is None else masks[start + b]
            if mask is not None:
                objects = mask_patches(mask, grid, view.pad_to_square)
                mask_iou += np.array([_iou(t, objects) for t in tops])
                n_masked += 1
    progress.close()
    count = len(images)
    if count == 0:
        raise ValueError("the probe needs at least one image")
    dispersion = [float(np.mean(d)) for d in distances]
    return ProbeResult(
        layers=list(range(1, n_layers + 1)),
        dispersion=dispersion,
        dispersion_std=[float(np.std(d)) for d in distances],
        overlap=(overlap / count).tolist(),
        mask_iou=(mask_iou / n_masked).tolist() if n_masked else None,
        suggested_layer=suggest_object_layer(dispersion),
        top_fraction=top,
        top_k=k,
        n_images=count,
        grid=grid,
        notes=notes,
        encoder_input=view.input,
    )


def plot(result: ProbeResult, out_dir: Path, title: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    layers = np.array(result.layers)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    disp, std = np.array(result.dispersion), np.array(result.dispersion_std)
    ax.plot(layers, disp, marker="o", color="#1f77b4", label="mean pairwise distance")
    ax.fill_between(layers, disp - std, disp + std, color="#1f77b4", alpha=0.15, label="± std over images")
    ax.axvline(result.suggested_layer, color="#d62728", ls="--", lw=1,
               label=f"suggested object layer {result.suggested_layer}")
    ax.set_xlabel("encoder layer (1-based)")
    ax.set_ylabel("distance of top-attention tokens")
    ax.set_title(f"{title} dispersion curve: top {result.top_fraction:.0%} tokens "
                 f"({result.top_k}), {result.n_images} images", fontsize=9)
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths += save_figure(fig, out_dir / "dispersion")

    panels = 3 if result.mask_iou is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.8))
    matrix = np.array(result.overlap)
    im = axes[0].imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="lower",
                        extent=(0.5, len(layers) + 0.5, 0.5, len(layers) + 0.5))
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    axes[0].set_title("IoU of top-token sets, layer × layer", fontsize=9)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("layer")
    adjacent = [matrix[i, i + 1] for i in range(len(layers) - 1)]
    axes[1].plot(layers[:-1] + 0.5, adjacent, marker="o", color="#2ca02c")
    axes[1].axvline(result.suggested_layer, color="#d62728", ls="--", lw=1)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("IoU of adjacent layers (l, l+1)", fontsize=9)
    axes[1].set_xlabel("layer")
    axes[1].grid(alpha=0.3)
    if result.mask_iou is not None:
        axes[2].plot(layers, result.mask_iou, marker="o", color="#9467bd")
        axes[2].axvline(result.suggested_layer, color="#d62728", ls="--", lw=1)
        axes[2].set_title("IoU of top tokens with the object mask", fontsize=9)
        axes[2].set_xlabel("layer")
        axes[2].grid(alpha=0.3)
    fig.suptitle(f"{title} overlap of high-attention tokens", fontsize=10)
    fig.tight_layout()
    paths += save_figure(fig, out_dir / "overlap")
    return paths



def write(result: ProbeResult, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "probe.json", out_dir / "probe.csv"
    json_path.write_text(json.dumps(asdict(result), indent=2))
    lines = ["layer,dispersion,dispersion_std,adjacent_iou" + (",mask_iou" if result.mask_iou else "")]
    for i, layer in enumerate(result.layers):
        adjacent = result.overlap[i][i + 1] if i + 1 < len(result.layers) else math.nan
        row = f"{layer},{result.dispersion[i]:.6f},{result.dispersion_std[i]:.6f},{adjacent:.6f}"
        if result.mask_iou:
            row += f",{result.mask_iou[i]:.6f}"
        lines.append(row)
    csv_path.write_text("\n".join(lines) + "\n")
    return [json_path, csv_path]


def main(argv: list[str] | None = None) -> ProbeResult:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--model", default="llava15_7b", help="harness model config (configs/model/NAME.yaml)")
    parser.add_argument("--top", type=float, default=0.05, help="fraction of tokens counted as high-attention "
                        "(the official notebook: 0.05; the paper also uses 0.1 and 0.25)")
    parser.add_argument("--masks", type=Path, help="folder of object masks named like the images (optional)")
    parser.add_argument("--limit", type=int, help="use only the first N images (sorted by name)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--side", type=int, default=DEFAULT_SIDE, help="Qwen3-VL only: every image is resized to "
                        "SIDE x SIDE px (a multiple of 32; its grid follows the image size)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="output folder (default results/probe/<model>)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of the model config (model.dtype=...)")
    args = parser.parse_args(argv)

    paths, images, skipped = read_images(list_images(args.images, args.limit))
    for message in skipped:
        print(f"[probe] {message}")
    if not images:
        raise SystemExit(f"no readable image in {args.images}")
    masks = None
    if args.masks:
        masks = []
        for p in paths:
            found = [m for m in args.masks.glob(f"{p.stem}.*") if m.suffix.lower() in IMAGE_SUFFIXES]
            masks.append(Image.open(found[0]) if found else None)
        if not any(m is not None for m in masks):
            raise SystemExit(f"no mask in {args.masks} is named like an image of {args.images}")
    cfg = compose_config([f"model={args.model}", f"device={args.device}", "method=none", *args.overrides])
    model, processor, _ = load_vlm(cfg)
    result = probe(model, processor, images, top=args.top, masks=masks, batch_size=args.batch_size,
                   model_cfg=cfg.model, side=args.side)
    result.notes = [*skipped, *result.notes]
    for note in result.notes[len(skipped):]:
        print(f"[probe] warning: {note}")
    out = args.out or REPO_ROOT / "results" / "probe" / args.model
    written = plot(result, out, title=str(cfg.model.name)) + write(result, out)
    for layer, value in zip(result.layers, result.dispersion):
        print(f"layer {layer:>2}: dispersion {value:.4f}")
    print(f"suggested object layer: {result.suggested_layer} (the layer before the largest rise of the curve; "
          f"the paper uses 9 for CLIP-L and 16 for Qwen2.5-VL)")
    for path in written:
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
