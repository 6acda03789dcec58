"""InternVL3 (``transformers.InternVLForConditionalGeneration``, the ``-hf`` checkpoints): prune every 448-px tile.

Geometry. An image is cut into 1..12 dynamic 448 x 448 tiles (the best-fitting aspect ratio) plus a thumbnail of the
whole image when there is more than one tile; every tile is its own InternViT row (CLS + 32 x 32 patches of 14 px).
After the feature layer the CLS token is dropped (``vision_feature_select_strategy="default"``) and a pixel shuffle
concatenates every 2 x 2 patch block into one token before the projector: each tile passes a 16 x 16 grid of 256
tokens to the LLM, token (r, c) standing for patches rows 2r..2r+1 x cols 2c..2c+1. The LLM (Qwen2 / Qwen2.5) sees
``<img>`` + the tokens of all tiles of the image in tile order + ``</img>``, with contiguous 1D positions.

Pruning: every tile is one 16 x 16 grid, pruned on its own, its kept tokens in raster order, tiles in their order
(thumbnail last); the processor emits the kept count between ``<img>`` and ``</img>``. Scores, keys and hidden
states of a token are the mean over its 2 x 2 patches (as on Qwen2.5-VL); a CLS request reads the CLS row of the
tile.

Tiles -> images. The encoder call gets the tiles of all images stacked; which image a tile belongs to is the tile
count per image (``num_patches``) that the processor computed: the patched processor records it (its last call) and
every encoder call checks it against the tiles it got and against the image tokens between each ``<img>`` and
``</img>`` of ``input_ids`` (a mismatch, e.g. inputs built by another processor call, is a PruningError naming what
differs). Budgets are per tile, as LLaVA-NeXT's official per-crop rule: a ratio keeps round(256 x ratio) of every tile;
an int budget N' is per image, int(N' / tiles) tokens for each of its tiles (thumbnail included; N' from 1 tile up to
``max_patches`` + 1 tiles is checked before patching). Prompt-aware methods (HiPrune++) compare every tile with its
image's prompt, the mean LLM input embedding of the prompt's tokens (the projected tile tokens live in that space).
Refused before loading: merging inside the encoder (the pixel shuffle needs the full 32 x 32 patch grid), VisionZip
(CLS tokens in front are not laid out), TRIM (no paired CLIP text tower).

LLM-side methods (FastV, PyramidDrop, SparseVLM: ``hiprune.adapters.llm_pruning``): nothing is pruned before the LLM;
an image is one visual of the drop schedule, all its tiles (thumbnail included) between ``<img>`` and ``</img>``
(those two tokens are text, never dropped), with contiguous 1D positions (renumbered or kept as the method says). As
on Qwen2.5-VL the budget is per image, a ratio of its tokens (256 x tiles) or a count, and the schedule is resolved
for each image's count; it is checked before loading on a one-tile image (256 tokens, the fewest an image has). A
batch whose images differ in tile count runs in groups of equal counts (the evaluation does so).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration

from hiprune.adapters.base import (
    Adapter,
    GridInput,
    LlmPromptEmbeddings,
    PruningError,
    PruningSession,
    patch_attribute,
    register_adapter,
    split_budget,
    stable_ids,
)
from hiprune.adapters.llm_pruning import check_llm_method, install_decoder_drop
from hiprune.methods.base import Method

# HiPrune's object layer by relative depth: CLIP-L's 9 of 24 layers; InternViT-300M has 24 (layer 9), the feature
# layer is its last (the deep layer, as on CLIP-L). Not probed on real weights.
RELATIVE_OBJECT_DEPTH = 9 / 24
DEFAULT_MAX_PATCHES = 12  # dynamic tiles of the most-tiled image (lmms-eval's internvl_hf, the checkpoints' processor)
TILES_ATTRIBUTE = "hiprune_tiles_per_image"  # set on the encoder output: tiles per image, for the input_ids check
TILE_SPLIT = "InternVL's tiles as LLaVA-NeXT's official crops: every tile keeps int(N' / tiles)"


@register_adapter
class InternVLAdapter(LlmPromptEmbeddings, Adapter):
    family = "internvl"
    model_types = (InternVLForConditionalGeneration,)
    stages = ("none", "vision", "llm")  # llm: hiprune.adapters.llm_pruning, an image = all its tiles
    # HiPrune++ compares prompts in the LLM's input-embedding space (the projected tile tokens live there)
    needs_prompt_encoder = False
    has_cls = True
    stage_limits = {"encoder": "its pixel shuffle reads the full 32 x 32 patch grid of every tile, which merging inside "
                               "the encoder would break; use a method that prunes before the LLM"}

    def __init__(self, model: InternVLForConditionalGeneration, max_patches: int = DEFAULT_MAX_PATCHES):
        super().__init__(model)
        self.inner = model.model
        self.config = model.config
        self.vision_config = self.config.vision_config
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError("the InternVL adapter needs vision_feature_select_strategy='default' (CLS dropped)")
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError(f"a single vision_feature_layer is required, got {self.config.vision_feature_layer!r}")
        size, patch = self.vision_config.image_size, self.vision_config.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        self.side = int(size) // int(patch)  # 32 patches per tile side
        self.shuffle = round(1 / float(self.config.downsample_ratio))  # 2: a 2 x 2 block -> 1 token
        if self.side % self.shuffle:
            raise ValueError(f"a {self.side} x {self.side} patch grid cannot be pixel-shuffled by {self.shuffle}")
        self.grid = (self.side // self.shuffle, self.side // self.shuffle)
        self.max_patches = int(max_patches)
        if self.max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {max_patches}")
        self.tokenizer = None  # the processor's, for prompt-aware methods (set by install)
        self.recorded_tiles: list[int] | None = None  # tiles per image of the processor's last call (while installed)

    # --- encoder description -------------------------------------------------------------------------------
    def encoder_layers(self) -> nn.ModuleList:
        return self.inner.vision_tower.encoder.layer

    def num_encoder_layers(self) -> int:
        return len(self.encoder_layers())

    def feature_layer(self) -> int:
        k = self.config.vision_feature_layer
        return k if k >= 0 else self.num_encoder_layers() + 1 + k

    def layer_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.encoder_layers()[layer - 1]

    def attention_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.layer_module(layer).attention

    def default_object_layer(self) -> int:
        return round(RELATIVE_OBJECT_DEPTH * self.num_encoder_layers())

    def tokens_per_tile(self) -> int:
        return self.grid[0] * self.grid[1]

    def max_tiles(self) -> int:
        """Tiles of the most-tiled image: ``max_patches`` dynamic tiles + the thumbnail (none for a single tile)."""
        return self.max_patches + 1 if self.max_patches > 1 else 1

    def describe_encoder(self) -> dict[str, Any]:
        return {
            **super().describe_encoder(),
            "grid": list(self.grid),
            "grids_per_image": f"1..{self.max_patches} dynamic 448-px tiles + a thumbnail (more than one tile), each "
                               "its own grid",
            "cls": "scored, dropped before the pixel shuffle (vision_feature_select_strategy=default)",
            "merge": f"pixel shuffle: {self.shuffle}x{self.shuffle} patches -> 1 token; score = mean of the "
                     f"{self.shuffle**2} patch scores",
            "budget": "per tile: a ratio of every tile, or int(N' / tiles) of an image's int budget N'",
            "default_object_layer": self.default_object_layer(),
        }

    # --- budgets -------------------------------------------------------------------------------------------
    def tile_budgets(self, method: Method, tiles: int) -> list[int]:
        """The method's budget for each tile of an image of ``tiles`` tiles (LLaVA-NeXT's official per-crop rule)."""
        return split_budget(method.budget, [self.tokens_per_tile()] * tiles, "tile", "equal", TILE_SPLIT)

    def tile_keeps(self, method: Method, tiles: int) -> list[int]:
        """Tokens the LLM receives from each tile of an image of ``tiles`` tiles, in tile order."""
        n = self.tokens_per_tile()
        if method.stage != "vision":
            return [n] * tiles
        keeps = [method.kept_count(b) for b in self.tile_budgets(method, tiles)]
        if max(keeps) > n:
            raise ValueError(f"method {method.name!r} keeps {max(keeps)} tokens of a tile with only {n}")
        return keeps

    def image_tokens(self, method: Method, tiles: int) -> int:
        """Visual tokens between an image's ``<img>`` and ``</img>`` (what the processor emits)."""
        return sum(self.tile_keeps(method, tiles))

    def tokens_per_image(self, method: Method) -> None:
        """None: the count depends on the image's tile count (see :meth:`image_tokens`)."""
        self.check_budget(method)
        return None

    def check_budget(self, method: Method) -> None:
        """Every tile count from 1 to :meth:`max_tiles` can take the budget (int(N' / tiles) >= 1, <= 256)."""
        for tiles in sorted({1, self.max_tiles()}):
            self.tile_keeps(method, tiles)

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        super().check_supported(method, prompt_encoder)
        if prompt_encoder is not None:
            raise ValueError(
                f"the {self.family} adapter compares prompts with the LLM's own input embeddings; it takes no prompt "
                "encoder"
            )
        if method.stage == "vision":
            self.check_budget(method)
        if method.stage == "llm":  # a one-tile image: the fewest tokens an image has
            check_llm_method(method, self.config.text_config, self.family, self.tokens_per_tile())

    # --- tiles -> images -----------------------------------------------------------------------------------
    def image_spans(self, input_ids: torch.Tensor) -> list[list[int]]:
        """Per row of ``input_ids``, the image tokens of each of its images (each image's run between ``<img>`` and
        ``</img>``)."""
        spans = []
        for row in (input_ids == self.config.image_token_id).to("cpu", torch.int8):
            edges = torch.diff(torch.cat([row.new_zeros(1), row, row.new_zeros(1)]))
            starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
            spans.append((ends - starts).tolist())
        return spans

    def image_tiles(self, n_tiles: int) -> list[int]:
        """Tiles per image of one encoder call, in image order: the processor's record of its last call, checked
        against the tiles the encoder got (PruningError on a mismatch)."""
        tiles = self.recorded_tiles
        if tiles is None:
            raise PruningError(
                f"the InternVL encoder got {n_tiles} tiles but no processor call recorded each image's tile count: "
                "build the inputs with the processor passed to hiprune.apply (or give the counts: "
                "session.adapter.expect_tiles(num_patches))"
            )
        if sum(tiles) != n_tiles:
            raise PruningError(
                f"the processor's last call cut {len(tiles)} images into {tiles} tiles ({sum(tiles)} in all) but the "
                f"encoder got {n_tiles} tiles: the inputs come from another processor call"
            )
        return list(tiles)

    def check_spans(self, method: Method, input_ids: torch.Tensor, tiles: list[int]) -> None:
        """The image tokens of every image in ``input_ids`` must be what its tiles pass on (PruningError naming the
        image otherwise). generate() may repeat every sample's row (beam search: ``expand`` copies in a row, the
        encoder outputs repeated with them); the copies of a sample must hold the same images."""
        rows = self.image_spans(input_ids)
        found = [span for row in rows for span in row]
        expand, rest = divmod(len(found), len(tiles)) if tiles else (0, len(found))
        if rest or not expand or len(rows) % expand:
            raise PruningError(
                f"input_ids hold {len(found)} images (<img> ... </img> runs of {found} image tokens in {len(rows)} "
                f"rows) but the encoder call pruned {len(tiles)} images of {tiles} tiles"
            )
        image = 0
        for first in range(0, len(rows), expand):
            copies = rows[first : first + expand]
            if any(copy != copies[0] for copy in copies):
                raise PruningError(f"rows {first}..{first + expand - 1} repeat one sample but hold the images {copies}")
            for span in copies[0]:
                if image == len(tiles):
                    raise PruningError(f"input_ids hold more images than the {len(tiles)} the encoder call pruned")
                want = self.image_tokens(method, tiles[image])
                if span != want:
                    raise PruningError(
                        f"image {image}: {span} image tokens in input_ids, but its {tiles[image]} tiles pass {want} "
                        f"under method {method.name!r} (budget {method.budget}): the inputs come from another "
                        "processor call"
                    )
                image += 1

    # --- captures ------------------------------------------------------------------------------------------
    def merged_captures(self, captured: dict[str, torch.Tensor], tiles: int) -> dict[str, torch.Tensor]:
        """[tiles, 1 + side^2(, d)] captures (CLS first) -> [tiles, 256(, d)]: CLS dropped, the mean over every
        2 x 2 patch block in the pixel shuffle's order (token (r, c) <- patch rows 2r, 2r+1 x cols 2c, 2c+1)."""
        out = {}
        s, k = self.side, self.shuffle
        for name, value in captured.items():
            if tuple(value.shape[:2]) != (tiles, 1 + s * s):
                raise PruningError(f"capture {name!r} has shape {tuple(value.shape)}, expected ({tiles}, {1 + s * s})")
            patches = value[:, 1:].reshape(tiles, s // k, k, s // k, k, *value.shape[2:])
            out[name] = patches.mean(dim=(2, 4)).reshape(tiles, (s // k) ** 2, *value.shape[2:])
        return out

    def expect_tiles(self, num_patches: Any) -> None:
        """Record the tile count of every image of the next encoder calls (what the patched processor does on each
        call; for inputs made without it, e.g. the efficiency benchmark's, from the image processor's
        ``num_patches``)."""
        self.recorded_tiles = [int(n) for n in num_patches]

    # --- installation --------------------------------------------------------------------------------------
    def install(self, stack: ExitStack, session: PruningSession, processor: Any | None) -> None:
        stack.callback(setattr, self, "recorded_tiles", None)
        super().install(stack, session, processor)

    def install_processor(self, stack: ExitStack, session: PruningSession, processor: Any) -> None:
        if not all(hasattr(processor, a) for a in ("replace_image_token", "start_image_token", "end_image_token")):
            raise TypeError(f"cannot set the image token count of {type(processor).__name__}")
        method = session.method

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            self.expect_tiles(image_inputs["num_patches"])
            count = self.image_tokens(method, self.recorded_tiles[image_idx])
            return f"{processor.start_image_token}{processor.image_token * count}{processor.end_image_token}"

        patch_attribute(stack, processor, "replace_image_token", replace_image_token)

    def placeholder_counts(self, method: Method) -> dict:
        return {"image": lambda inputs, index: self.image_tokens(method, int(inputs["num_patches"][index]))}

    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        method = session.method
        original = self.inner.get_image_features
        pending: dict[str, Any] = {}

        def forward(*args, **kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")  # generate() encodes before the forward
            tiles = getattr(encoded, TILES_ATTRIBUTE, None)
            if tiles is not None and input_ids is not None:
                self.check_spans(method, input_ids, tiles)
            pending["input_ids"] = input_ids  # a forward that encodes the images itself checks them there
            try:
                return original_forward(*args, **kwargs)
            finally:
                pending.clear()

        def get_image_features(pixel_values: torch.Tensor, *args, **kwargs):
            with self.capture(method) as capture:
                out = original(pixel_values, *args, **kwargs)
                captured = capture.collect()
            features = out.pooler_output  # [tiles, 256, D]
            n_tiles = features.shape[0]
            if features.shape[1] != self.tokens_per_tile():
                raise PruningError(f"expected {self.tokens_per_tile()} tokens per tile, got {features.shape[1]}")
            if method.stage != "vision":
                self.record_unpruned(session, [self.tokens_per_tile()] * n_tiles)
                return out
            tiles = self.image_tiles(n_tiles)
            if pending.get("input_ids") is not None:
                self.check_spans(method, pending["input_ids"], tiles)
            merged = self.merged_captures(captured, n_tiles)
            ids = stable_ids(pixel_values)
            grids, t = [], 0
            for image, count in enumerate(tiles):
                for budget, keep in zip(self.tile_budgets(method, count), self.tile_keeps(method, count)):
                    grids.append(GridInput(
                        self.grid, features[t], {name: value[t] for name, value in merged.items()}, budget, keep,
                        ids[t], visual=image, token_embeds=features[t] if method.needs_prompt else None,
                    ))
                    t += 1
            kept = [grid.features for grid in self.select_grids(session, grids, len(tiles))]
            # [tiles, keep, D]; when tiles keep different counts (an int budget over images of different tile
            # counts) [kept tokens, 1, D]: HF scatters the rows in order, and generate()'s per-sample split (beam
            # search) counts rows, so a row must not straddle two samples
            same = len({k.shape[0] for k in kept}) == 1
            out.pooler_output = torch.stack(kept) if same else torch.cat(kept)[:, None]
            setattr(out, TILES_ATTRIBUTE, tiles)
            return out

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        if method.stage == "llm":  # every image (all its tiles) is one visual of the drop schedule
            # first: it reads the forward's named arguments from the model's own signature
            install_decoder_drop(stack, session, self.inner, self.inner.language_model, [self.config.image_token_id])
        original_forward = self.inner.forward  # as the decoder drop left it: forward() above calls it
        patch_attribute(stack, self.inner, "forward", forward)


__all__ = ["DEFAULT_MAX_PATCHES", "InternVLAdapter"]
