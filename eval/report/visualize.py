"""Token-selection overlay: which visual tokens a method keeps for one image (or video), and why.

    python -m eval.report.visualize image=photo.jpg model=llava15_7b method=hiprune budget=192
    python -m eval.report.visualize image=photo.jpg model=tiny_llava method=random budget=64 device=cpu
    python -m eval.report.visualize image=photo.jpg model=llava_next_7b method=visionzip budget=640
    python -m eval.report.visualize image=clip.mp4 model=video_llava_7b method=hiprune budget=64   # one panel per frame
    python -m eval.report.visualize image=photo.jpg method=hiprune budget=64 method.options.buffer=square \\
        prompt="What is the man holding?" out=results/plots/visualize/photo_square

Arguments are Hydra-style ``key=value`` overrides of the harness config (configs/config.yaml: model, method,
budget, device, method.options.*, model.*), plus three of this tool's own: ``image=`` (required; a video file for
Video-LLaVA), ``prompt=`` (default "Describe the image.", the question prompt-aware methods score) and ``out=`` (output
path without suffix; default results/plots/visualize/<image>_<model>_<method>_<budget>, so pictures of different
models, methods and budgets do not overwrite each other). Writes <out>.png and <out>.pdf.

The tool runs one prefill of the harness's own lmms-eval model of the family (the same inputs as an evaluation) and
draws what the pruning session recorded, each family as it is:
- LLaVA-1.5: the padded, resized image the tower saw (de-normalised pixel values) with its patch grid.
- LLaVA-NeXT: two panels, the base image and the high-resolution crops in their tiling, each crop with its own grid;
  the layout that ran (official 'spatial' or native, whose grids cover only the unpadded part) is in the title.
- Qwen2.5-VL: the image as the processor resized it, with the merged 2 x 2-patch grid the LLM receives.
- Video-LLaVA: one panel per frame.
Tokens a method drops are darkened; kept tokens are coloured by why they were kept when the method says so (HiPrune:
anchors yellow, buffers orange, registers teal, as in the paper's Fig. 7; a prompt-aware method's text-added tokens
magenta; TRIM's aggregate slot), otherwise outlined in blue. Merging methods (ToMe, VisionZip's contextual tokens,
TRIM's aggregate token): every token that went into a merged token is tinted with that token's colour and the token it
stands at (its representative, whose position it takes) is outlined thickly. Methods inside the LLM (FastV,
PyramidDrop, SparseVLM): every token enters the LLM; a token dropped at a stage is shaded by the decoder layer it
reached.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch, Rectangle
from omegaconf import DictConfig
from PIL import Image, ImageFile
from transformers import AutoModelForImageTextToText, AutoProcessor

import hiprune
from eval.config import REPO_ROOT, ConfigError, compose_config, repo_path
from eval.lmms.base import HiPruneLMM, lmms_model_class, resolve_device, resolve_dtype
from eval.lmms.prompting import IMAGE_PLACEHOLDER, LlavaInputBuilder
from eval.lmms.video_llava import VideoClip, load_video
from eval.report.plots import save_figure
from eval.running.methods import build_from_config

OWN_KEYS = ("image", "prompt", "out")
DEFAULT_PROMPT = "Describe the image."

# Colours of the paper's Fig. 7 for HiPrune's roles; others for roles of other methods.
ROLE_COLOURS = {
    "anchor": "#ffd400",
    "buffer": "#ff8c00",
    "register": "#008b8b",
    "text": "#e0218a",
    "aggregate": "#9400d3",
}
KEPT_COLOUR = "#1f77b4"
MERGE_COLOURS = plt.get_cmap("tab20").colors
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def _pretrained(m: DictConfig) -> str:
    """The checkpoint of the model config ``m``: its Hub id, or a local folder resolved against the repository (which
    must hold a build); a model the harness does not implement yet is refused."""
    if not m.get("implemented", True):
        raise SystemExit(f"model {m.name} is not implemented in the harness yet")
    pretrained = str(m.pretrained)
    if m.get("local"):
        local = repo_path(pretrained)
        if not (local / "config.json").is_file():
            raise SystemExit(f"local model {local} not found; build it first (make assets)")
        pretrained = str(local)
    return pretrained


def load_vlm(cfg: DictConfig):
    """(model, processor, device) for the composed model config; local checkpoints resolved against the repo."""
    m = cfg.model
    pretrained = _pretrained(m)
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


@dataclass
class Tile:
    """Where one token grid of the forward is drawn: ``rows`` x ``cols`` tokens starting at token (row0, col0) of a
    full grid whose cells are ``cell`` = (w, h) pixels, its top-left corner at ``origin`` = (x, y) of the panel."""

    grid: int  # index into Trace.grids
    rows: int
    cols: int
    origin: tuple[float, float]
    cell: tuple[float, float]
    row0: int = 0
    col0: int = 0


@dataclass
class Panel:
    title: str
    image: np.ndarray  # [H, W, 3] floats in [0, 1]
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class GridDraw:
    """What happened to one grid's tokens: ``kept`` grid indices; ``roles`` index -> role of a kept token;
    ``groups`` representative index -> the grid indices merged into that token (merges of 2 or more only);
    ``shade`` index -> label of a dropped token drawn lighter than plain dropped (in-LLM stages)."""

    tokens: int
    kept: set[int]
    roles: dict[int, str] = field(default_factory=dict)
    groups: dict[int, list[int]] = field(default_factory=dict)
    shade: dict[int, str] = field(default_factory=dict)


@dataclass
class Trace:
    panels: list[Panel]
    grids: list[GridDraw]
    notes: list[str] = field(default_factory=list)


def _cells(ax, tile: Tile, tokens: range | list[int]):
    for t in tokens:
        r, c = divmod(int(t), tile.cols)
        yield t, tile.origin[0] + (tile.col0 + c) * tile.cell[0], tile.origin[1] + (tile.row0 + r) * tile.cell[1]


def draw(trace: Trace, title: str = "") -> plt.Figure:
    """Every panel of ``trace`` with its grids: dropped tokens darkened, kept ones coloured by role, merged groups
    tinted per merged token with their representative outlined."""
    n = len(trace.panels)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.6 * rows + 0.8), squeeze=False)
    counts: dict[str, int] = {}
    for ax, panel in zip(axes.flat, trace.panels):
        height, width = panel.image.shape[:2]
        ax.imshow(panel.image, extent=(0, width, height, 0))
        for tile in panel.tiles:
            info = trace.grids[tile.grid]
            member_colour = {}
            for k, (rep_index, members) in enumerate(sorted(info.groups.items())):
                for m in members:
                    member_colour[m] = MERGE_COLOURS[k % len(MERGE_COLOURS)]
            for t, x, y in _cells(ax, tile, range(info.tokens)):
                w, h = tile.cell
                if t in member_colour:
                    ax.add_patch(Rectangle((x, y), w, h, facecolor=member_colour[t], alpha=0.55, lw=0))
                if t not in info.kept:
                    if t in info.shade:
                        ax.add_patch(Rectangle((x, y), w, h, facecolor="black", alpha=0.3, lw=0))
                        counts[info.shade[t]] = counts.get(info.shade[t], 0) + 1
                    elif t not in member_colour:
                        ax.add_patch(Rectangle((x, y), w, h, facecolor="black", alpha=0.6, lw=0))
                        counts["dropped"] = counts.get("dropped", 0) + 1
                    else:
                        counts["merged into a kept token"] = counts.get("merged into a kept token", 0) + 1
                    continue
                role = info.roles.get(t)
                colour = ROLE_COLOURS.get(role, KEPT_COLOUR)
                if role is not None and t not in member_colour:
                    ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, alpha=0.45, lw=0))
                merged = t in info.groups
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white" if merged else colour,
                                       lw=2.0 if merged else 0.8))
                key = "merged token (representative)" if merged else (role or "kept")
                counts[key] = counts.get(key, 0) + 1
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        ax.set_title(textwrap.fill(panel.title, 48), fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = []
    for name, count in counts.items():
        if name == "dropped":
            continue
        if name in ("merged token (representative)",):
            handles.append(Patch(facecolor="none", edgecolor="grey", lw=2, label=f"{name} ({count})"))
        elif name == "merged into a kept token":
            handles.append(Patch(facecolor=MERGE_COLOURS[0], alpha=0.55, label=f"{name} ({count})"))
        elif name.startswith("dropped at"):
            handles.append(Patch(facecolor="black", alpha=0.3, label=f"{name} ({count})"))
        elif name == "kept":
            handles.append(Patch(facecolor="none", edgecolor=KEPT_COLOUR, label=f"kept ({count})"))
        else:
            handles.append(Patch(facecolor=ROLE_COLOURS.get(name, KEPT_COLOUR), alpha=0.7, label=f"{name} ({count})"))
    if counts.get("dropped"):
        handles.append(Patch(facecolor="black", alpha=0.6, label=f"dropped ({counts['dropped']})"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4) or 1, fontsize=8, frameon=False)
    text = "\n".join([textwrap.fill(title, 40 * cols + 30)] + [textwrap.fill(note, 40 * cols + 30) for note in trace.notes])
    if text.strip():
        fig.suptitle(text, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def overlay(image: np.ndarray, grid: tuple[int, int], indices: list[int], roles: dict[str, list[int]],
            title: str = "") -> plt.Figure:
    """One image with one grid (LLaVA-1.5): dropped tokens darkened and kept tokens coloured by role."""
    rows, cols = grid
    height, width = image.shape[:2]
    role_of = {}
    for name, members in roles.items():
        for i in members:
            role_of.setdefault(int(i), name)
    info = GridDraw(rows * cols, {int(i) for i in indices}, role_of)
    tile = Tile(0, rows, cols, (0.0, 0.0), (width / cols, height / rows))
    return draw(Trace([Panel("", image, [tile])], [info]), title)


# ------------------------------------------------------------------------------------------------------------------
# Every family: one prefill of the harness's lmms-eval model, drawn from the pruning session's records
# ------------------------------------------------------------------------------------------------------------------
def load_harness_model(cfg: DictConfig, method) -> HiPruneLMM:
    """The family's lmms-eval model of the harness for the composed config, with ``method`` installed (batch size 1)."""
    m = cfg.model
    pretrained = _pretrained(m)
    model_class = lmms_model_class(str(m.lmms_model))
    loading = {}
    for key in model_class.loading_options:
        if key in m:
            value = m[key]
            local = isinstance(value, str) and m.get("local") and repo_path(value).exists()
            loading[key] = str(repo_path(value)) if local else value
    return model_class(pretrained=pretrained, revision=m.revision, device=str(cfg.device), dtype=str(m.dtype),
                       batch_size=1, attn_implementation=str(m.attn_implementation), method=method, **loading)


def _denormalise(pixels: torch.Tensor, processor) -> np.ndarray:
    return displayed_image(pixels, processor)


def _grid_draws(records, selection, layer_records, image_tokens: list[int]) -> list[GridDraw]:
    """One GridDraw per grid of the forward, from its GridRecords (kept indices, merge sources), the selection's
    roles (one row per grid in record order, when it is one tensor) and, for in-LLM methods, the LayerRecord."""
    draws = []
    roles_ok = selection is not None and selection.roles and selection.indices.shape[0] == len(records)
    for g, record in enumerate(records):
        n = int(record.tokens_in)
        if record.indices is None:
            draws.append(GridDraw(n, set(range(n))))
            continue
        indices = [int(i) for i in record.indices.tolist()]
        info = GridDraw(n, set(indices))
        if roles_ok:
            for name, mask in selection.roles.items():
                for slot, flag in enumerate(mask[g].tolist()):
                    if flag:
                        info.roles.setdefault(indices[slot], name)
        if record.sources is not None:
            members: dict[int, list[int]] = {}
            for token, slot in enumerate(record.sources.tolist()):
                if slot >= 0:
                    members.setdefault(indices[slot], []).append(token)
            info.groups = {rep: m for rep, m in members.items() if len(m) > 1}
            info.kept |= set(info.groups)
        draws.append(info)
    if layer_records:
        last = layer_records[-1]
        if last.indices is not None:
            _apply_llm_stages(draws, last, image_tokens)
    return draws


def _apply_llm_stages(draws: list[GridDraw], record, image_tokens: list[int]) -> None:
    """In-LLM methods: the grids of image i hold its tokens in record order; a token not kept by the last stage is
    shaded by the stage that dropped it."""
    stages = record.stages or [(None, record.indices)]
    offset_grid = 0
    for image, total in enumerate(image_tokens):
        grids, covered = [], 0
        while covered < total and offset_grid < len(draws):
            grids.append(offset_grid)
            covered += draws[offset_grid].tokens
            offset_grid += 1
        if covered != total:
            raise SystemExit(f"cannot map the LLM's kept indices of image {image} onto its grids ({covered} grid "
                             f"tokens, {total} visual tokens in the LLM)")
        dropped_at: dict[int, str] = {}
        previous = set(range(total))
        for layer, indices in stages:
            now = {int(i) for i in indices[image].tolist()}
            for token in previous - now:
                dropped_at[token] = f"dropped at decoder layer {layer}" if layer is not None else "dropped"
            previous = now
        start = 0
        for g in grids:
            info = draws[g]
            info.kept = {t - start for t in previous if start <= t < start + info.tokens}
            info.shade = {t - start: label for t, label in dropped_at.items() if start <= t < start + info.tokens}
            start += info.tokens


def trace(lm: HiPruneLMM, visual: Image.Image | VideoClip, prompt: str = DEFAULT_PROMPT) -> Trace:
    """One prefill of ``lm`` on ``visual`` with ``prompt``; the panels and grids of what its method did."""
    context = f"{IMAGE_PLACEHOLDER}\n{prompt}" if isinstance(visual, Image.Image) else prompt
    batch, expected = lm.build_inputs([context], [[visual]])
    session = lm.session
    session.pop_records()
    session.pop_layer_records()
    if lm.method.needs_prompt:
        session.set_prompts([prompt])
    device = next(lm.model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    for key in [k for k in inputs if k.startswith("pixel_values")]:
        inputs[key] = inputs[key].to(next(lm.model.parameters()).dtype)
    with torch.inference_mode():
        lm.model(**inputs)
    forwards = session.pop_records()
    if len(forwards) != 1:
        raise SystemExit(f"expected one vision forward, the session recorded {len(forwards)}")
    records = list(forwards[0])
    layer_records = session.pop_layer_records()
    family = lm.family
    image_tokens = [r.tokens_in for r in records]
    notes = []
    if family == "llava_next":
        panels, per_image = _next_panels(lm, batch, records)
        image_tokens = per_image
    elif family == "qwen2_5_vl":
        panels = _qwen_panels(lm, visual, batch, records)
    elif family == "video_llava" and isinstance(visual, VideoClip):
        panels = _square_panels(lm, batch["pixel_values_videos"][0], records, "frame")
        image_tokens = [sum(r.tokens_in for r in records)]  # one video: its frames' tokens in order
    else:
        panels = _square_panels(lm, batch["pixel_values"][:1], records, "image")
    grids = _grid_draws(records, session.last_selection, layer_records, image_tokens)
    if lm.method.keeps_cls and records and records[0].indices is not None:
        notes.append("The CLS token is passed on too (counted in the budget).")
    received = sum(int(r.tokens_kept) for r in records)
    notes.append(f"The LLM receives {received} of {sum(int(r.tokens_in) for r in records)} visual tokens"
                 + (" before its first drop." if layer_records else "."))
    del expected
    return Trace(panels, grids, notes)


def _square_panels(lm, pixels: torch.Tensor, records, what: str) -> list[Panel]:
    """LLaVA-1.5 images, Video-LLaVA images or frames: one panel per grid, a square grid over the whole picture."""
    processor = lm.processor.image_processor if hasattr(lm.processor, "image_processor") else lm.processor
    panels = []
    if len(records) != pixels.shape[0]:
        raise SystemExit(f"{len(records)} grids recorded for {pixels.shape[0]} {what}s")
    for g, record in enumerate(records):
        side = round(int(record.tokens_in) ** 0.5)
        if side * side != int(record.tokens_in):
            raise SystemExit(f"{what} {g}: {record.tokens_in} tokens are not a square grid")
        image = _denormalise(pixels[g], processor)
        height, width = image.shape[:2]
        title = f"{what} {g + 1}" if len(records) > 1 else ""
        panels.append(Panel(title, image, [Tile(g, side, side, (0.0, 0.0), (width / side, height / side))]))
    return panels


def _next_panels(lm, batch, records) -> tuple[list[Panel], list[int]]:
    """LLaVA-NeXT: the base image, and the sub-image crops tiled as the anyres grid cut them."""
    adapter = lm.session.adapter
    layout = adapter.image_layout(batch["image_sizes"][0], lm.method)
    if len(layout.grids) != len(records):
        raise SystemExit(f"LLaVA-NeXT: {len(records)} grids recorded, the {layout.layout} layout has "
                         f"{len(layout.grids)}")
    processor = lm.processor.image_processor
    crops = batch["pixel_values"][0]
    side = layout.side
    base = _denormalise(crops[0], processor)
    size = base.shape[0]
    nph, npw = layout.crop_grid
    tiled = np.zeros((nph * size, npw * size, 3))
    for k in range(1, layout.crops):
        r, c = divmod(k - 1, npw)
        tiled[r * size:(r + 1) * size, c * size:(c + 1) * size] = _denormalise(crops[k], processor)
    cell = (size / side, size / side)
    panels = [Panel(f"base image ({layout.layout} layout)", base), Panel(
        f"{nph} x {npw} crops ({layout.layout} layout" + (", unpadded part" if layout.layout == "native" else "")
        + ")", tiled)]
    for g, grid in enumerate(layout.grids):
        if grid.tokens != int(records[g].tokens_in):
            raise SystemExit(f"LLaVA-NeXT grid {g}: {records[g].tokens_in} tokens recorded, the layout has {grid.tokens}")
        if grid.crop == 0:
            panels[0].tiles.append(Tile(g, grid.rows, grid.cols, (0.0, 0.0), cell, grid.row0, grid.col0))
        else:
            r, c = divmod(grid.crop - 1, npw)
            panels[1].tiles.append(Tile(g, grid.rows, grid.cols, (c * size, r * size), cell, grid.row0, grid.col0))
    return panels, [sum(int(r.tokens_in) for r in records)]


def _qwen_panels(lm, visual: Image.Image, batch, records) -> list[Panel]:
    """Qwen2.5-VL: the image as the processor resized it, with the merged grid (2 x 2 patches per token)."""
    t, h, w = (int(v) for v in batch["image_grid_thw"][0])
    merge = int(lm.merge_size)
    rows, cols = h // merge, w // merge
    if len(records) != 1 or int(records[0].tokens_in) != t * rows * cols:
        raise SystemExit(f"Qwen2.5-VL: expected one merged grid of {t * rows * cols} tokens, got "
                         f"{[r.tokens_in for r in records]}")
    shown = lm.prepare_image(visual).convert("RGB").resize((w * lm.patch_size, h * lm.patch_size), Image.BICUBIC)
    image = np.asarray(shown, dtype=np.float32) / 255.0
    cell = (image.shape[1] / cols, image.shape[0] / rows)
    return [Panel(f"resized to {image.shape[1]} x {image.shape[0]}; merged grid {rows} x {cols}", image,
                  [Tile(0, rows, cols, (0.0, 0.0), cell)])]


def output_stem(visual_path: Path, cfg: DictConfig, method) -> Path:
    """results/plots/visualize/<visual>_<model>_<method>_<budget> (full: no budget; schedule: the method's own)."""
    budget = method.budget if method.budget is not None else ("full" if method.stage == "none" else "schedule")
    name = f"{visual_path.stem}_{cfg.model.name}_{method.name}_{budget}"
    return REPO_ROOT / "results" / "plots" / "visualize" / "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


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
    visual_path = Path(own["image"])
    if not visual_path.is_file():
        raise SystemExit(f"image {visual_path} not found")
    cfg = compose_config(overrides)
    try:
        method = build_from_config(cfg.method, cfg.budget)  # validated before the model loads
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from exc
    if visual_path.suffix.lower() in VIDEO_SUFFIXES:
        if str(cfg.model.lmms_model) != "hiprune_video_llava":
            raise SystemExit(f"{visual_path.name} is a video: only Video-LLaVA takes videos (model={cfg.model.name})")
        visual: Image.Image | VideoClip = load_video(str(visual_path), int(cfg.model.num_frames))
    else:
        lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # lmms-eval sets it
        try:
            with Image.open(visual_path) as handle:
                handle.load()
                visual = handle.convert("RGB")
        except OSError as exc:
            raise SystemExit(f"cannot read image {visual_path}: {exc}") from exc
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    try:
        lm = load_harness_model(cfg, method)
    except ValueError as exc:  # a setting the model itself refuses (e.g. a layer it does not have)
        raise SystemExit(f"configuration error: {exc}") from exc
    try:
        result = trace(lm, visual, own.get("prompt", DEFAULT_PROMPT))
    finally:
        lm.close()
    described = ", ".join(f"{k}={v}" for k, v in method.describe().items() if k != "name")
    title = f"{cfg.model.name} · {method.name} ({described})"
    paths = save_figure(draw(result, title), Path(own["out"]) if own.get("out") else output_stem(visual_path, cfg, method))
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
