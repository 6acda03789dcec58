"""LLaVA-NeXT / llava-v1.6 (``transformers.LlavaNextForConditionalGeneration``): anyres crops pruned one by one.

An image is encoded as a base image (the whole image resized to 336 x 336) plus the crops of an anyres grid of
``nph x npw`` sub-images (a 2 x 2 grid for a square-ish image: 5 crops). Every crop is a 24 x 24 CLIP grid. As for
LLaVA-1.5, pruning happens after the projector and before the LLM: the adapter wraps
``LlavaNextModel.get_image_features`` (the attention capture runs around the vision tower) and replaces
``pack_image_features`` (which lays the crops out for the LLM) while installed, and makes the processor emit exactly
the number of ``<image>`` tokens the layout produces. HF's generate, KV cache, left padding and contiguous position
ids then work unchanged.

Two layouts (``hiprune.apply(model, method, processor, layout=...)``; the default is the official HiPrune pruning
layout; the evaluation's ``layout=auto``, ``resolve_layout``, runs ``native`` for method ``none``, as the paper's
vanilla rows, and ``official`` for every pruning method):

official -- what the authors' code does (it forces LLaVA's ``mm_patch_merge_type='spatial'``):
    every crop, base included, is pruned on its own 24 x 24 grid with ``int(N' / crops)`` tokens (crops = 1 +
    nph * npw; a 2 x 2 grid gives 5: 640 -> 128 each); no unpadding, no ``image_newline`` tokens. Order: the base
    image's kept tokens (raster order), then the kept tokens of all sub-images in raster order over the *stitched*
    (nph * 24) x (npw * 24) grid (row by row across crop borders, not crop by crop). Unpruned: 5 x 576 = 2880 tokens.
    A float budget is a ratio per crop: each crop keeps round(576 * ratio).

native -- HF's own layout (LLaVA's ``spatial_unpad``): the base image's 576 tokens, then the stitched sub-image grid
    with the rows / columns that only show padding removed ("unpadding", HF's ``unpad_image``), one
    ``image_newline`` token after each of its rows. Each crop is pruned on its unpadded part only (a rectangle of its
    24 x 24 grid; a crop entirely in the padding has no tokens and is skipped). The budget N' is spread over the
    grids as equally as their sizes allow (water-filling: equal shares of int(remaining / open grids), a grid smaller
    than its share keeps all its tokens and the rest is shared among the others), so the same split as 'official'
    when nothing is padded. The newline tokens are always kept and not counted in the budget (as in the official
    code's ``spatial_unpad`` branch); a budget above the image's token count keeps everything. Order: base kept tokens,
    then for every unpadded row its kept tokens left to right followed by its newline. A float budget is a ratio per
    grid. With method ``none`` the model runs untouched.

Every grid goes through the method on its own (grids of equal shape and budget share one ``select`` call; rows are
independent), with its own attention scores (CLS key dropped) and a sample id derived from the image's pixels and
the crop index. Prompt-aware methods (HiPrune++) compare every crop with the prompt of its image (one prompt per
image, ``session.set_prompts``), using the tower's last-layer patch features through the prompt encoder's projection.

Kept-token records (``session.records``): one ``GridRecord`` per grid, per image: the base image first, then the
sub-image crops in raster order over the crop grid (native: only crops with unpadded tokens); ``indices`` index the
grid the method saw (native: the crop's unpadded rectangle, raster order).
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from hiprune.adapters.base import (
    GridInput,
    GridOutput,
    PruningError,
    PruningSession,
    derived_id,
    patch_attribute,
    register_adapter,
    split_budget,
    splits_visuals,
    spread_budget,
    stable_ids,
)
from hiprune.adapters.clip_tower import ClipTowerAdapter
from hiprune.adapters.llm_pruning import check_llm_method, install_decoder_drop
from hiprune.methods.base import Method

__all__ = [
    "LAYOUTS", "LAYOUT_CHOICES", "CropGrid", "ImageLayout", "LlavaNextAdapter", "resolve_layout", "spread_budget",
]

LAYOUTS = ("official", "native")
# "auto" (the evaluation default): the paper's vanilla rows are the standard model, its pruned rows the official layout
LAYOUT_CHOICES = (*LAYOUTS, "auto")
REDUCING = ("vision", "encoder")  # stages whose tokens leave the encoder already reduced, per crop
def resolve_layout(layout: str, method: Method) -> str:
    """The layout a run uses: ``auto`` is ``native`` (the standard model: unpadding and newline tokens) for a method
    that leaves the model unmodified (``none``) and ``official`` (the authors' 'spatial' pruning layout) for every
    other method; ``official`` / ``native`` as given."""
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"unknown LLaVA-NeXT layout {layout!r}; choose one of {LAYOUT_CHOICES}")
    if layout == "auto":
        return "native" if method.stage == "none" else "official"
    return layout


@dataclass(frozen=True)
class CropGrid:
    """The token grid of one crop that a method sees."""

    crop: int  # 0 = base image, 1.. = sub-image crops in raster order over the crop grid
    rows: int
    cols: int
    row0: int = 0  # top-left token of the grid inside the crop's full side x side grid (native: unpadded part)
    col0: int = 0
    budget: int = 0  # the method's budget for this grid
    keep: int = 0  # tokens the LLM receives from it: method.kept_count(budget) (HiPrune++ additive adds some)

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class ImageLayout:
    """Where every visual token of one image goes, and how many the method keeps per grid."""

    layout: str
    crop_grid: tuple[int, int]  # (nph, npw) sub-image crops
    side: int  # tokens per crop side (24)
    grids: tuple[CropGrid, ...]  # base first, then sub-image crops (native: only crops with unpadded tokens)
    unpadded: tuple[int, int, int, int]  # (row0, col0, rows, cols) of the kept part of the stitched grid
    newlines: int  # image_newline tokens (native: one per unpadded row; official: 0)

    @property
    def crops(self) -> int:
        return 1 + self.crop_grid[0] * self.crop_grid[1]

    @property
    def kept(self) -> list[int]:
        return [g.keep for g in self.grids]

    @property
    def total(self) -> int:
        """Visual tokens the LLM receives for this image (what the processor emits)."""
        return sum(self.kept) + self.newlines

    @property
    def full(self) -> int:
        """Visual tokens of the same layout without pruning."""
        return sum(g.tokens for g in self.grids) + self.newlines


def _size_list(image_size: Any) -> list[int]:
    if hasattr(image_size, "tolist"):
        image_size = image_size.tolist()
    return [int(x) for x in image_size]


@register_adapter
class LlavaNextAdapter(ClipTowerAdapter):
    family = "llava_next"
    model_types = (LlavaNextForConditionalGeneration,)
    stages = ("none", "vision", "encoder", "llm")  # llm: hiprune.adapters.llm_pruning, an image = all its crops
    passes_cls = True  # official layout: methods with keeps_cls (VisionZip) as the VisionZip code lays them out

    def __init__(self, model: LlavaNextForConditionalGeneration, layout: str = "official"):
        super().__init__(model)
        if not self.config.image_grid_pinpoints:
            raise ValueError("LLaVA-NeXT config has no image_grid_pinpoints")
        self.side = self.grid[0]
        self.layout = layout
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown LLaVA-NeXT layout {self.layout!r}; choose one of {LAYOUTS}")

    def describe_encoder(self) -> dict[str, Any]:
        merge = {"official": "spatial: base + crops, no unpadding, no newline tokens",
                 "native": "spatial_unpad + image_newline (HF)"}[self.layout]
        return {**super().describe_encoder(), "grids_per_image": "1 base + anyres crops, each its own grid",
                "layout": self.layout, "merge": merge}

    # --- layout --------------------------------------------------------------------------------------------
    def reference_image_size(self) -> list[int]:
        """(height, width) of the image that defines ``tokens_per_image``: one filling the largest anyres grid
        exactly (the real checkpoints: 672 x 672, a 2 x 2 grid, 2880 tokens unpruned in the official layout)."""
        height, width = max(self.config.image_grid_pinpoints, key=lambda hw: (hw[0] * hw[1], hw[0]))
        return [int(height), int(width)]

    def image_layout(self, image_size: Any, method: Method) -> ImageLayout:
        """Layout and per-grid kept counts of an image of ``image_size`` (height, width) under ``method``."""
        size = _size_list(image_size)
        side = self.side
        nph, npw = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, self.vision_config.image_size)
        nph, npw = int(nph), int(npw)
        crops = [(1 + i * npw + j, i, j) for i in range(nph) for j in range(npw)]
        if self.layout == "official":
            grids = [CropGrid(0, side, side)] + [CropGrid(c, side, side) for c, _, _ in crops]
            unpadded = (0, 0, nph * side, npw * side)
            newlines = 0
        else:
            height, width = nph * side, npw * side
            index = torch.arange(height * width).view(1, height, width)
            kept = unpad_image(index, size)[0]
            rows, cols = kept.shape  # an extreme aspect ratio can leave 0 columns: HF still emits the newlines
            r0, c0 = divmod(int(kept[0, 0]), width) if kept.numel() else (0, 0)
            unpadded = (r0, c0, rows, cols)
            newlines = rows
            grids = [CropGrid(0, side, side)]
            for c, i, j in crops:
                top, bottom = max(r0, i * side), min(r0 + rows, (i + 1) * side)
                left, right = max(c0, j * side), min(c0 + cols, (j + 1) * side)
                if bottom > top and right > left:
                    grids.append(CropGrid(c, bottom - top, right - left, top - i * side, left - j * side))
        budgets = self._grid_budgets(method, [g.tokens for g in grids], 1 + nph * npw)
        front = self.front(method)
        keep = [method.kept_count(b) + front for b in budgets] if method.stage in REDUCING else budgets
        for grid, b, k in zip(grids, budgets, keep):
            if k - front > grid.tokens:
                raise ValueError(
                    f"method {method.name!r} keeps {k} tokens of a crop grid with only {grid.tokens} "
                    f"(budget {method.budget}, {grid.rows}x{grid.cols} grid)"
                )
        grids = tuple(CropGrid(g.crop, g.rows, g.cols, g.row0, g.col0, b, k) for g, b, k in zip(grids, budgets, keep))
        return ImageLayout(self.layout, (nph, npw), side, grids, unpadded, newlines)

    def image_layouts(self, image_sizes: Any, method: Method) -> list[ImageLayout]:
        """Layouts of the images of one encoder call, in order (a family may lay some images out otherwise)."""
        return [self.image_layout(size, method) for size in image_sizes]

    @staticmethod
    def front(method: Method) -> int:
        """Tokens without a grid position in front of every grid's selection: its CLS token (keeps_cls methods)."""
        return 1 if method.stage == "vision" and method.keeps_cls else 0

    def _grid_budgets(self, method: Method, capacities: list[int], crops: int) -> list[int]:
        if method.stage not in REDUCING:
            return list(capacities)
        if self.layout == "official":
            return split_budget(method.budget, capacities, "crop", "equal",
                                "official LLaVA-NeXT layout: every crop keeps int(N' / crops)")
        return split_budget(method.budget, capacities, "crop", "fill")

    def tokens_per_image(self, method: Method, image_size: Any = None) -> int:
        """Visual tokens the LLM receives for an image of ``image_size`` (default: the reference image)."""
        size = self.reference_image_size() if image_size is None else image_size
        return self.image_layout(size, method).total

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        if method.stage == "llm":  # the reference image's tokens (official: 5 x 576 = 2880) at the LLM's input
            check_llm_method(method, self.config.text_config, self.family, self.tokens_per_image(method))
            return
        super().check_supported(method, prompt_encoder)
        if splits_visuals(method) and self.layout != "official":
            raise ValueError(
                f"method {method.name!r} splits an image's budget over its full crops: it runs the official "
                "'spatial' layout only (layout=official), not the unpadded native layout"
            )
        if method.keeps_cls and self.layout != "official":
            raise ValueError(
                f"method {method.name!r} passes every crop's CLS token on: it runs the official 'spatial' layout "
                "only (layout=official), as the VisionZip code lays it out, not the unpadded native layout"
            )
        if method.stage == "encoder" and self.layout != "official":
            raise ValueError(
                f"method {method.name!r} merges inside the vision encoder, crop by crop: it runs the official "
                "'spatial' layout only (layout=official), not the unpadded native layout"
            )

    # --- installation --------------------------------------------------------------------------------------
    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        method = session.method
        self.tokens_per_image(method)  # validates the budget against the reference grid before anything runs
        original_features = self.inner.get_image_features
        original_pack = self.inner.pack_image_features
        passthrough = self.layout == "native" and method.stage != "vision"  # HF's own layout, untouched
        pending: dict[str, Any] = {}
        merging = self.install_merging(stack, session) if method.stage == "encoder" else None

        def get_image_features(pixel_values: torch.Tensor, image_sizes: torch.Tensor, *args, **kwargs):
            if merging is not None:
                return merged_image_features(pixel_values, image_sizes, *args, **kwargs)
            crops = self._crops_per_image(pixel_values, image_sizes)
            with self.capture(method) as capture:
                pending["active"] = True
                try:
                    out = original_features(pixel_values, image_sizes, *args, **kwargs)
                    packed = dict(pending)
                finally:
                    pending.clear()
                captured = capture.collect()
            if passthrough:
                grids = [g.tokens for layout in self.image_layouts(image_sizes, method) for g in layout.grids]
                self.record_unpruned(session, grids)
                return out
            if "features" not in packed:
                raise PruningError("LLaVA-NeXT get_image_features did not pack image features (transformers changed?)")
            out.pooler_output = self._pack(session, packed["features"], image_sizes, packed["newline"], captured, crops,
                                           out)
            return out

        pack_signature = inspect.signature(original_pack)

        def pack_image_features(image_features, image_sizes, *args, **kwargs):
            if not pending:
                raise PruningError("pack_image_features was called outside get_image_features while pruning is installed")
            if passthrough:
                return original_pack(image_features, image_sizes, *args, **kwargs)
            # Stash the per-crop features; get_image_features lays them out once the tower's outputs are at hand.
            newline = pack_signature.bind(image_features, image_sizes, *args, **kwargs).arguments.get("image_newline")
            pending.update(features=image_features, newline=newline)
            return list(image_features), torch.zeros(len(image_features), dtype=torch.long)

        def merged_image_features(pixel_values: torch.Tensor, image_sizes: torch.Tensor, *args, **kwargs):
            """Encoder-stage methods: every crop leaves the tower with its budget; images whose crops have different
            budgets (int(N' / crops) depends on the crop count) run through the tower in separate calls."""
            layouts = self.image_layouts(image_sizes, method)
            groups: dict[int, list[int]] = {}
            for i, layout in enumerate(layouts):
                groups.setdefault(layout.grids[0].budget, []).append(i)
            per_image: list[tuple[torch.Tensor, list[GridOutput]] | None] = [None] * len(layouts)
            out = None
            for budget, members in groups.items():
                merging.expect(budget)
                pending["active"] = True
                try:
                    out = original_features(pixel_values[members], image_sizes[members], *args, **kwargs)
                    packed = dict(pending)
                finally:
                    pending.clear()
                outputs = iter(merging.finish())
                for i, features in zip(members, packed["features"]):  # [crops, keep, D] per image
                    rows = [next(outputs) for _ in range(features.shape[0])]
                    for row, crop_features in zip(rows, features):
                        row.features = crop_features
                    per_image[i] = (features.reshape(-1, features.shape[-1]), rows)
            self.record_outputs(session, [self.side * self.side] * sum(len(rows) for _, rows in per_image),
                                [row for _, rows in per_image for row in rows])
            for i, (tokens, layout) in enumerate(zip(per_image, layouts)):
                if tokens[0].shape[0] != layout.total:
                    raise PruningError(f"image {i}: {tokens[0].shape[0]} merged visual tokens, expected {layout.total}")
            # base crop first, then the sub-image crops in crop order, each in the method's own token order
            out.pooler_output = [tokens for tokens, _ in per_image]
            return out

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        patch_attribute(stack, self.inner, "pack_image_features", pack_image_features)
        if method.stage == "llm":  # every image (all its crops, as laid out) is one visual of the drop schedule
            install_decoder_drop(stack, session, self.inner, self.inner.language_model, [self.config.image_token_id],
                                 **self.decoder_drop_options())

    def decoder_drop_options(self) -> dict[str, Any]:
        """The family's further options of ``install_decoder_drop`` (LLaVA-OneVision: its videos are refused)."""
        return {}

    def placeholder_counts(self, method: Method) -> dict:
        return {"image": lambda inputs, index: self.image_layout(inputs["image_sizes"][index], method).total}

    def crop_counts(self, image_sizes: Any) -> list[int]:
        """Crops (base + anyres crops) HF encodes for each image of one encoder call."""
        counts = []
        for size in image_sizes:
            nph, npw = get_anyres_image_grid_shape(
                _size_list(size), self.config.image_grid_pinpoints, self.vision_config.image_size
            )
            counts.append(1 + int(nph) * int(npw))
        return counts

    def _crops_per_image(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per image its crops [C, 3, H, W], as HF's get_image_features slices them."""
        if pixel_values.dim() != 5:
            raise PruningError(f"expected pixel_values [images, crops, 3, H, W], got shape {tuple(pixel_values.shape)}")
        return [pixels[:count] for pixels, count in zip(pixel_values, self.crop_counts(image_sizes))]

    def _pack(self, session, image_features, image_sizes, image_newline, captured, crops, out) -> list[torch.Tensor]:
        method = session.method
        side = self.side
        layouts = self.image_layouts(image_sizes, method)
        if len(image_features) != len(layouts):
            raise PruningError(f"{len(image_features)} images of features for {len(layouts)} image sizes")
        patches = self.patch_captures(captured, sum(f.shape[0] for f in image_features))
        embeds = self.patch_embeds(session, out) if method.needs_prompt else None
        front = self.front(method)
        cls = self.cls_tokens(out.hidden_states) if front else None  # [rows, D]: every crop's CLS, projected

        # One grid per crop (native: its unpadded part), cut out of its crop's side x side tokens.
        grids: list[GridInput] = []
        placed: list[tuple[int, CropGrid]] = []  # (image, crop grid) of every grid
        offset = 0
        for i, (features, layout, pixels) in enumerate(zip(image_features, layouts, crops)):
            if features.shape[0] != layout.crops or features.shape[1] != side * side:
                raise PruningError(
                    f"image {i}: expected {layout.crops} crops of {side * side} tokens for a "
                    f"{layout.crop_grid[0]}x{layout.crop_grid[1]} grid, got features {tuple(features.shape)}"
                )
            image_id = stable_ids(pixels.reshape(1, -1))[0]
            for grid in layout.grids:
                def cut(tensor: torch.Tensor, grid=grid) -> torch.Tensor:  # [side * side, ...] -> the grid's tokens
                    window = tensor.view(side, side, *tensor.shape[1:])
                    window = window[grid.row0 : grid.row0 + grid.rows, grid.col0 : grid.col0 + grid.cols]
                    return window.reshape(grid.tokens, *tensor.shape[1:])

                row = offset + grid.crop
                grids.append(GridInput(
                    (grid.rows, grid.cols), cut(features[grid.crop]),
                    {name: cut(value[row]) for name, value in patches.items()}, grid.budget, grid.keep - front,
                    derived_id(image_id, grid.crop), visual=i,
                    token_embeds=None if embeds is None else cut(embeds[row]),
                    tile=None if grid.crop == 0 else divmod(grid.crop - 1, layout.crop_grid[1]),
                ))
                placed.append((i, grid, None if cls is None else cls[row : row + 1]))
            offset += features.shape[0]

        if method.stage == "vision":
            kept = [(o.indices, o.features) for o in self.select_grids(session, grids, len(layouts))]
        else:
            self.record_unpruned(session, [grid.features.shape[0] for grid in grids])
            kept = [(torch.arange(g.features.shape[0], device=g.features.device), g.features) for g in grids]

        per_image: list[list[tuple[CropGrid, torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [[] for _ in layouts]
        for (i, grid, crop_cls), (indices, features) in zip(placed, kept):
            per_image[i].append((grid, indices, features, crop_cls))
        trailing = method.trailing_count if method.stage == "vision" else (lambda budget: 0)
        packed = [self._assemble(layout, grids, image_newline, trailing) for layout, grids in zip(layouts, per_image)]
        for i, (tensor, layout) in enumerate(zip(packed, layouts)):
            if tensor.shape[0] != layout.total:
                raise PruningError(f"image {i}: packed {tensor.shape[0]} visual tokens, expected {layout.total}")
        return packed

    def _assemble(self, layout: ImageLayout, grids, image_newline, trailing) -> torch.Tensor:
        """Base tokens first, then the sub-image tokens (and newlines) in raster order over the stitched grid.

        Methods that pass every crop's CLS token on (keeps_cls) and end each crop's selection with merged tokens
        (``trailing(budget)`` of them), official layout, as the VisionZip code lays them out: the base crop's [CLS,
        its selection], then the sub-crops' positioned tokens over the stitched grid, then the sub-crops' CLS tokens,
        then their trailing tokens (crop order)."""
        side = self.side
        npw = layout.crop_grid[1]
        r0, c0, _, cols = layout.unpadded
        base = [features if cls is None else torch.cat([cls.to(features), features])
                for grid, _, features, cls in grids if grid.crop == 0]
        parts, positions, tail_cls, tail = [], [], [], []
        for grid, indices, features, cls in grids:
            if grid.crop == 0:
                continue
            extra = trailing(grid.budget) if indices.shape[0] else 0
            if extra:
                tail.append(features[indices.shape[0] - extra :])
                indices, features = indices[: indices.shape[0] - extra], features[: features.shape[0] - extra]
            if cls is not None:
                tail_cls.append(cls)
            ci, cj = divmod(grid.crop - 1, npw)
            r = ci * side + grid.row0 + indices // grid.cols
            c = cj * side + grid.col0 + indices % grid.cols
            if layout.layout == "official":
                positions.append(r * (npw * side) + c)
            else:  # position in the unpadded grid with one newline column on the right
                positions.append((r - r0) * (cols + 1) + (c - c0))
            parts.append(features)
        if layout.newlines:
            if image_newline is None:
                raise PruningError("the native LLaVA-NeXT layout needs the model's image_newline parameter")
            reference = base[0]
            newline = image_newline.to(reference.device, reference.dtype)
            parts.append(newline.expand(layout.newlines, -1))
            positions.append(torch.arange(layout.newlines, device=reference.device) * (cols + 1) + cols)
        after = [t.to(base[0]) for t in tail_cls + tail]
        if not parts:
            return torch.cat([base[0], *after])
        order = torch.cat([p.to(base[0].device) for p in positions]).argsort(stable=True)
        return torch.cat([base[0], torch.cat(parts)[order], *after])
