"""Token-selection overlay: which visual tokens a method keeps for one image, and why.

    python -m eval.report.visualize image=photo.jpg model=llava15_7b method=hiprune budget=192
    python -m eval.report.visualize image=photo.jpg model=tiny_llava method=random budget=64 device=cpu
    python -m eval.report.visualize image=photo.jpg method=hiprune budget=64 method.options.buffer=square \\
        prompt="What is the man holding?" out=results/plots/visualize/photo_square

Arguments are Hydra-style ``key=value`` overrides of the harness config (configs/config.yaml: model, method,
budget, device, method.options.*, model.*), plus three of this tool's own: ``image=`` (required), ``prompt=``
(default "Describe the image.", used by prompt-aware methods) and ``out=`` (output path without suffix; default
results/plots/visualize/<image>_<method>_<budget>). Writes <out>.png and <out>.pdf.

The picture is what the model sees (after padding to square and resizing, de-normalised from the pixel values),
with the patch grid on top: tokens the method drops are darkened; kept tokens are coloured by why they were kept
when the method says so (HiPrune: anchors yellow, buffers orange, registers teal, as in the paper's Fig. 7; a
prompt-aware method's text-added tokens magenta), otherwise outlined in blue.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch, Rectangle
from omegaconf import DictConfig
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import hiprune
from eval.config import REPO_ROOT, ConfigError, compose_config, repo_path
from eval.lmms.base import resolve_device, resolve_dtype
from eval.lmms.prompting import LlavaInputBuilder
from eval.running.methods import build_from_config

OWN_KEYS = ("image", "prompt", "out")
DEFAULT_PROMPT = "Describe the image."

# Colours of the paper's Fig. 7 for HiPrune's roles; others for roles of other methods.
ROLE_COLOURS = {
    "anchor": "#ffd400",
    "buffer": "#ff8c00",
    "register": "#008b8b",
    "text": "#e0218a",
}
KEPT_COLOUR = "#1f77b4"


def load_vlm(cfg: DictConfig):
    """(model, processor, device) for the composed model config; local checkpoints resolved against the repo."""
    m = cfg.model
    if not m.get("implemented", True):
        raise SystemExit(f"model {m.name} is not implemented in the harness yet")
    pretrained = str(m.pretrained)
    if m.get("local"):
        local = repo_path(pretrained)
        if not (local / "config.json").is_file():
            raise SystemExit(f"local model {local} not found; build it first (make assets)")
        pretrained = str(local)
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(m.dtype), device)
    processor = AutoProcessor.from_pretrained(pretrained, revision=m.revision)
    model = AutoModelForImageTextToText.from_pretrained(
        pretrained, revision=m.revision, dtype=dtype, attn_implementation=m.attn_implementation
    ).to(device).eval()
    return model, processor, device


def input_builder(processor, model_cfg: DictConfig | dict):
    get = model_cfg.get
    return LlavaInputBuilder(processor, prompt_style=get("prompt_style", "vicuna_v1"),
                             image_backend=get("image_backend", "pil"), pad_to_square=get("pad_to_square", True))


def displayed_image(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """[3, H, W] normalised pixel values -> [H, W, 3] floats in [0, 1], what the vision tower saw."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
    image = pixel_values.detach().float().cpu() * std + mean
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def select_tokens(model, processor, method, image: Image.Image, prompt: str = DEFAULT_PROMPT,
                  model_cfg: DictConfig | dict | None = None) -> dict[str, Any]:
    """Run one prefill with ``method`` installed; returns the displayed image, grid, kept indices and roles."""
    builder = input_builder(processor, model_cfg or {})
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with hiprune.apply(model, method) as session:
        batch = builder([prompt], [[image]], session.tokens_per_image())
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.inference_mode():
            model(**batch)
        grid = tuple(session.adapter.grid)
        n = grid[0] * grid[1]
        selection = session.last_selection
        if selection is None:  # nothing pruned (method none)
            indices, roles = torch.arange(n), {}
        else:
            indices = selection.indices[0].detach().cpu()
            roles = {name: mask[0].detach().cpu() for name, mask in selection.roles.items()}
    return {
        "image": displayed_image(batch["pixel_values"][0], builder.image_processor),
        "grid": grid,
        "indices": indices.tolist(),
        "roles": {name: [int(i) for i, keep in zip(indices.tolist(), mask.tolist()) if keep] for name, mask in roles.items()},
        "method": method.describe(),
    }


def overlay(image: np.ndarray, grid: tuple[int, int], indices: list[int], roles: dict[str, list[int]],
            title: str = "") -> plt.Figure:
    """The image with dropped tokens darkened and kept tokens coloured by role."""
    rows, cols = grid
    height, width = image.shape[:2]
    cell_h, cell_w = height / rows, width / cols
    kept = {int(i) for i in indices}
    role_of = {}
    for name, members in roles.items():
        for i in members:
            role_of.setdefault(int(i), name)
    fig, ax = plt.subplots(figsize=(6, 6 * height / width + 0.6))
    ax.imshow(image, extent=(0, width, height, 0))
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        x, y = c * cell_w, r * cell_h
        if index not in kept:
            ax.add_patch(Rectangle((x, y), cell_w, cell_h, facecolor="black", alpha=0.6, lw=0))
            continue
        role = role_of.get(index)
        colour = ROLE_COLOURS.get(role, KEPT_COLOUR)
        if role is not None:
            ax.add_patch(Rectangle((x, y), cell_w, cell_h, facecolor=colour, alpha=0.45, lw=0))
        ax.add_patch(Rectangle((x, y), cell_w, cell_h, fill=False, edgecolor=colour, lw=0.8))
    counts = {name: len(members) for name, members in roles.items()}
    handles = [Patch(facecolor=ROLE_COLOURS.get(name, KEPT_COLOUR), alpha=0.7, label=f"{name} ({counts[name]})")
               for name in roles if counts[name]]
    unassigned = len(kept - set(role_of))
    if unassigned:
        handles.append(Patch(facecolor="none", edgecolor=KEPT_COLOUR, label=f"kept ({unassigned})"))
    handles.append(Patch(facecolor="black", alpha=0.6, label=f"dropped ({rows * cols - len(kept)})"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=len(handles), fontsize=8,
              frameon=False)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out.with_suffix(f".{ext}")
        fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own, overrides = {}, []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value overrides, got {arg!r} (see --help)")
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    if "image" not in own:
        raise SystemExit("image=PATH is required (see --help)")
    return own, overrides


def main(argv: list[str] | None = None) -> list[Path]:
    own, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    image_path = Path(own["image"])
    if not image_path.is_file():
        raise SystemExit(f"image {image_path} not found")
    cfg = compose_config(overrides)
    try:
        method = build_from_config(cfg.method, cfg.budget)  # validated before the model loads
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from exc
    model, processor, _ = load_vlm(cfg)
    with Image.open(image_path) as handle:
        image = handle.copy()
    result = select_tokens(model, processor, method, image, own.get("prompt", DEFAULT_PROMPT), cfg.model)
    described = ", ".join(f"{k}={v}" for k, v in result["method"].items() if k != "name")
    title = f"{cfg.model.name} · {result['method']['name']} ({described}) · {len(result['indices'])} of " \
            f"{result['grid'][0] * result['grid'][1]} tokens"
    fig = overlay(result["image"], result["grid"], result["indices"], result["roles"], title)
    budget = result["method"].get("budget") or "all"
    out = Path(own.get("out") or REPO_ROOT / "results" / "plots" / "visualize" /
               f"{image_path.stem}_{result['method']['name']}_{budget}")
    paths = save(fig, out)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
