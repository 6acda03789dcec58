"""Qwen2.5-VL (``transformers.Qwen2_5_VLForConditionalGeneration``): prune the merged visual tokens of every image.

What the LLM sees per image of a (h, w) patch grid: n = (h/2)·(w/2) merged tokens (2x2 patch merge), in raster order
of the merged grid, each with an M-RoPE position (t, row, col) offset by the position where the image starts. A
vision-side method keeps N' = round(n · ratio) of them (half to even, as the official code) or an absolute count,
chosen per image: images of different sizes in one batch each have their own grid and their own kept count.

Scores. Only the attention modules of the requested vision blocks (HiPrune: block ``object_layer``, 1-based, and the
last block) are routed through :class:`hiprune.capture.Capture`; every other block keeps SDPA/flash. Outside
flash mode ``Qwen2_5_VLVisionAttention`` calls the attention function once per chunk of ``cu_seqlens``: once per image
in a full-attention block, once per window in a windowed block (the rerouted modules always take that path, flash
or not). Each call yields one score per key of its chunk (mean over heads, then over that chunk's queries), so a
score is always per image. A windowed block (only a non-default layer: the paper's blocks 16 and 32 attend fully) is
scored as the official code's flash-attention path scores it, over all of the image's patches without the window
mask (``window_scores="image"``, the default: its calls record queries and keys, scored per image afterwards);
``window_scores="window"`` scores each window on its own, as the block attends (the official eager path). The chunks
come in the tower's *window* order, undone with the inverse of ``window_index`` (one entry per group of 4 patches
that the merger fuses); the score of a merged token is the mean of its 4 patches. Features are the merger's outputs,
which transformers already returns in raster order. HiPrune++ compares the mean LLM input embedding of each image's
prompt (``session.set_prompts``, tokenized by the processor's tokenizer) with the merged visual tokens.

Positions. Qwen2.5-VL derives M-RoPE positions from ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw``, which
break once an image has fewer placeholders than its grid. The adapter therefore

* patches the processor's ``replace_image_token`` so it emits the kept count of placeholders per image;
* wraps ``Qwen2_5_VLModel.get_image_features`` (pruning; the kept indices and grids travel on the returned output)
  and ``Qwen2_5_VLModel.forward``: when image features come in (raw pixels, or encoded beforehand as ``generate``
  does), it computes the positions of the shortened sequence itself, passes them on and stores the matching
  ``rope_deltas``;
* patches ``get_rope_index``, which ``generate`` calls before it encodes the images: shortened image groups get exact
  positions for their text and placeholders for the image tokens, which the forward then replaces.

Position modes (``positions`` adapter option):

* ``"original"`` (default, as the official HiPrune Qwen code): every kept token keeps the M-RoPE position it has in
  the unpruned sequence, (start, start + row, start + col); the pruned tokens' positions are simply missing (gaps
  remain), and the text after an image continues where it would without pruning (start + max(rows, cols)).
  ``rope_deltas`` = max position + 1 - shortened length, so decoding continues at exactly the positions of the
  unpruned model (the official code gets the same from the unpruned rope delta and the unpruned cache positions).
* ``"compact"``: the kept tokens of each image are numbered consecutively like text, t = row = col = start,
  start + 1, ..., start + N' - 1, and the text after the image continues at start + N' (the LLaVA-1.5 convention:
  contiguous positions over the shortened sequence). The image's 2D layout is then no longer in the positions.

Choose the mode when applying: ``hiprune.apply(model, method, processor, positions="compact")``.

Not supported (each fails with a PruningError naming the reason): expanding the encoded images for beam search or
``num_return_sequences > 1``, new images after a filled KV cache, ``inputs_embeds`` instead of ``input_ids``. Videos
pass through unpruned (with their own positions).
"""

from __future__ import annotations

import inspect
import itertools
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

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
from hiprune.adapters.llm_pruning import VisualTokenDrop, check_llm_method, install_decoder_drop
from hiprune.capture import Capture, Tap, key_scores
from hiprune.methods.base import Method

POSITION_MODES = ("original", "compact")
# How a windowed block's attention is scored: "image" (default, the official flash-attention path: softmax over all of
# the image's patches, the window mask ignored) | "window" (each window on its own, as the block attends)
WINDOW_SCORES = ("image", "window")
# Set on the encoder outputs the adapter returns; forward() places the kept tokens with them.
KEPT_ATTRIBUTE = "hiprune_kept_indices"
GRID_ATTRIBUTE = "hiprune_grid_thw"
# HiPrune's object layer on Qwen2.5-VL in the paper (1-based vision block; a full-attention block in 3B/7B/32B).
PAPER_OBJECT_LAYER = 16
# LLM-side methods: every kept token keeps its M-RoPE position (t, row, col) of the unpruned sequence, and decoding
# continues with HF's rope_deltas of the unpruned prefill (no official PDrop / SparseVLM code for Qwen2.5-VL renumbers
# 3-D positions; the decoder layers get (cos, sin) only). A recycled token takes the position of a dropped one.
LLM_POSITIONS = "original"
REFERENCE_MERGED_TOKENS = 1024  # the budget check before loading (see Qwen25VLAdapter.reference_tokens)


@register_adapter
class Qwen25VLAdapter(LlmPromptEmbeddings, Adapter):
    family = "qwen2_5_vl"
    model_types = (Qwen2_5_VLForConditionalGeneration,)
    # HiPrune++ on Qwen2.5-VL: mean LLM input embedding of the prompt vs the merged visual tokens (same space).
    needs_prompt_encoder = False
    has_cls = False
    asks_grid_budget = True  # a method with its own ratio rule (VisionZip's port: d + C) resolves each image's budget
    # llm: hiprune.adapters.llm_pruning on the text model; every kept token keeps its M-RoPE position
    stages = ("none", "vision", "llm")
    stage_limits = {"encoder": "its windowed attention and 2x2 patch merger leave no token pairs to merge; use a "
                               "method that prunes before the LLM"}

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, positions: str = "original",
                 window_scores: str = "image"):
        super().__init__(model)
        self.inner = model.model
        self.vision_config = model.config.vision_config
        self.merge = int(self.vision_config.spatial_merge_size)
        if positions not in POSITION_MODES:
            raise ValueError(f"unknown Qwen2.5-VL position mode {positions!r}; expected one of {POSITION_MODES}")
        self.positions = positions
        if window_scores not in WINDOW_SCORES:
            raise ValueError(f"unknown window_scores {window_scores!r}; expected one of {WINDOW_SCORES}")
        self.window_scores = window_scores
        self.tokenizer = None  # the processor's, for prompt-aware methods (set by install)

    # --- encoder description -------------------------------------------------------------------------------
    def num_encoder_layers(self) -> int:
        return int(self.vision_config.depth)

    def feature_layer(self) -> int:
        return self.num_encoder_layers()  # the merger reads the last block's output

    def layer_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.inner.visual.blocks[layer - 1]

    def attention_module(self, layer: int, tower: str = "image") -> nn.Module:
        return self.layer_module(layer).attn

    def full_attention_layers(self) -> list[int]:
        """1-based blocks with full (per-image) attention; the others attend within windows."""
        return [i + 1 for i in self.vision_config.fullatt_block_indexes]

    def describe_encoder(self) -> dict[str, Any]:
        """What methods see, per family: grid, CLS, feature layer, merge."""
        return {
            **super().describe_encoder(),
            "grid": f"per image: (h/{self.merge}, w/{self.merge}) merged tokens of its (h, w) patch grid",
            "cls": "none",
            "merge": f"{self.merge}x{self.merge} patches -> 1 token; score = mean of the {self.merge**2} patch scores",
            "full_attention_layers": self.full_attention_layers(),
            "paper_object_layer": PAPER_OBJECT_LAYER,
            "positions": self.positions,
            "window_scores": self.window_scores,
        }

    def tokens_per_image(self, method: Method) -> int | None:
        """None: on Qwen2.5-VL the count depends on the image's size (see :meth:`tokens_for_grid`)."""
        return None

    def merged_tokens(self, grid_thw) -> int:
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.merge**2

    def budget_for_grid(self, method: Method, grid_thw) -> int:
        """The method's budget resolved for an image of patch grid ``grid_thw``: N' = round(n * ratio), or a count."""
        n = self.merged_tokens(grid_thw)
        try:
            if method.stage == "vision" and method.own_grid_budgets:
                return method.resolve_grid_budget(n)
            return split_budget(method.budget, [n])[0]
        except ValueError as exc:
            raise ValueError(f"{exc} (an image of {n} merged tokens, patch grid {tuple(int(x) for x in grid_thw)})") from exc

    def tokens_for_grid(self, method: Method, grid_thw) -> int:
        """Visual tokens the LLM receives for an image of patch grid ``grid_thw`` (t, h, w) under ``method``."""
        n = self.merged_tokens(grid_thw)
        if method.stage != "vision":
            return n
        keep = method.kept_count(self.budget_for_grid(method, grid_thw))
        if keep > n:
            raise ValueError(f"method {method.name!r} keeps {keep} tokens but the image has only {n} merged tokens")
        return keep

    def reference_tokens(self) -> int:
        """Merged tokens of the image used to check an LLM-side method's budget before loading: one at the
        processor's default ``max_pixels`` limit (12845056 pixels: 3584 x 3584, 16384 merged tokens) is not a typical
        benchmark image, so the check uses 1024 merged tokens (a 896 x 896 image); every image is checked again with
        its own count when it runs."""
        return REFERENCE_MERGED_TOKENS

    def check_supported(self, method: Method, prompt_encoder: Any = None) -> None:
        if method.stage == "llm":
            if prompt_encoder is not None:
                raise ValueError(f"method {method.name!r} takes no prompt encoder")
            if self.positions != LLM_POSITIONS:
                raise ValueError(
                    f"method {method.name!r} prunes inside the LLM, where kept tokens keep their M-RoPE positions; "
                    f"positions={self.positions!r} applies to methods that prune before the LLM"
                )
            check_llm_method(method, self.model.config.text_config, self.family, self.reference_tokens(),
                             positions=LLM_POSITIONS)
            return
        super().check_supported(method, prompt_encoder)
        if prompt_encoder is not None:
            raise ValueError(
                f"the {self.family} adapter compares prompts with the LLM's own input embeddings; "
                "it takes no prompt encoder"
            )
        if method.needs_prompt and (method.prompt_patch_layer is not None or method.prompt_pooling not in (None, "mean")):
            raise ValueError(
                f"method {method.name!r} asks for CLIP-tower prompt embeddings (patch layer "
                f"{method.prompt_patch_layer!r}, pooling {method.prompt_pooling!r}); the {self.family} adapter compares "
                "the mean LLM input embedding of the prompt with the merged visual tokens"
            )

    # --- installation --------------------------------------------------------------------------------------
    def install_model(self, stack: ExitStack, session: PruningSession) -> None:
        method = session.method
        original_features = self.inner.get_image_features
        if method.stage != "vision":

            def record_only(pixel_values, image_grid_thw=None, *args, **kwargs):
                out = original_features(pixel_values, image_grid_thw, *args, **kwargs)
                self.record_unpruned(session, [self.merged_tokens(g) for g in image_grid_thw])
                return out

            patch_attribute(stack, self.inner, "get_image_features", record_only)
            if method.stage == "llm":
                self.install_decoder_drop(stack, session)
            return

        def get_image_features(pixel_values, image_grid_thw=None, *args, return_dict=None, **kwargs):
            if image_grid_thw is None:
                raise PruningError("Qwen2.5-VL image features need image_grid_thw")
            with self.capture(method) as capture:
                out = original_features(pixel_values, image_grid_thw, *args, return_dict=True, **kwargs)
                captured = {name: self.merged_captures(capture.chunks.get(name), image_grid_thw) for name in capture.names}
            features, kept = self._select(session, list(out.pooler_output), captured, pixel_values, image_grid_thw)
            out.pooler_output = tuple(features)
            setattr(out, KEPT_ATTRIBUTE, kept)  # per image, kept raster indices into its merged grid
            setattr(out, GRID_ATTRIBUTE, image_grid_thw)  # generate() drops image_grid_thw after encoding
            return out if return_dict is not False else out.to_tuple()

        patch_attribute(stack, self.inner, "get_image_features", get_image_features)
        self._install_positions(stack)

    def install_decoder_drop(self, stack: ExitStack, session: PruningSession) -> VisualTokenDrop:
        """LLM-side methods: every image is one visual; its kept tokens keep their M-RoPE positions."""
        return install_decoder_drop(
            stack, session, self.inner, self.inner.language_model, [self.model.config.image_token_id],
            positions=LLM_POSITIONS, visual_inputs=("pixel_values", "pixel_values_videos"),
            refused_token_ids={self.model.config.video_token_id: "videos are not pruned inside the LLM on "
                               f"{self.family} (images only)"},
        )

    def placeholder_counts(self, method: Method) -> dict:
        return {"image": lambda inputs, index: self.tokens_for_grid(method, inputs["image_grid_thw"][index])}

    # --- captures ------------------------------------------------------------------------------------------
    def capture(self, method: Method, tower: str = "image") -> Capture:
        """The method's requests; with window_scores="image", an attention request on a windowed block records the
        block's queries and keys instead, scored per image over all its patches by :meth:`merged_captures`."""
        capture = super().capture(method, tower)
        if self.window_scores == "window" or method.stage != "vision":
            return capture
        layers = self.resolve_layers(method)
        windowed = {self.attention_module(layers[name]) for name, request in method.requests().items()
                    if request.kind == "attention" and layers[name] not in self.full_attention_layers()}
        for module in windowed:
            for k, tap in enumerate(capture.taps[module]):
                if tap.kind == "attention":
                    if tap.queries != "all":
                        raise PruningError(f"attention request {tap.name!r} reads the {tap.queries!r} query rows of a "
                                           "windowed block; only window_scores='window' scores those")
                    capture.taps[module][k] = Tap(tap.name, "query_key")
        return capture

    def image_scores(self, chunks: list[torch.Tensor], grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """A windowed block's per-window [2, 1, H, T_w, Dh] queries and keys (window order) -> per image a [1, T_i]
        score over all of the image's patches without the window mask (the images lie one after the other)."""
        qk = torch.cat(chunks, dim=3)
        counts = [int(g.prod()) for g in grid_thw]
        if qk.shape[3] != sum(counts):
            raise PruningError(f"captured queries and keys of {qk.shape[3]} patches for {sum(counts)} patches")
        return [key_scores(q, k, None, 1.0) for q, k in (part.unbind(0) for part in torch.split(qk, counts, dim=3))]

    def merged_captures(self, chunks: list[torch.Tensor] | None, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """What a vision block recorded, in window order -> per image [n_i] (scores) or [n_i, d] (keys, hidden
        states) per merged token in raster order: the mean over the patches of each merged token.

        chunks: the block's records in call order: per-chunk [1, T] scores or [1, T, d] keys (one call per image,
        or per window in a windowed block), or its [P, d] output hidden states (one call).
        """
        if not chunks:
            raise PruningError("the captured vision block did not run in this forward pass")
        if chunks[0].dim() == 5:  # queries and keys of a windowed block: scored per image first
            chunks = self.image_scores(chunks, grid_thw)
        flat = [c.reshape(-1) if c.dim() == 2 and c.shape[0] == 1 else c.reshape(-1, *c.shape[-1:]) for c in chunks]
        values = torch.cat(flat)  # [patches(, d)], window order
        unit = self.merge**2
        n_patches = int(grid_thw.prod(-1).sum())
        if values.shape[0] != n_patches:
            raise PruningError(f"captured {values.shape[0]} patch scores for {n_patches} patches")
        window_index, _ = get_vision_window_index(
            grid_thw.cpu(),
            spatial_merge_size=self.merge,
            window_size=self.vision_config.window_size,
            patch_size=self.vision_config.patch_size,
        )
        raster = torch.argsort(window_index.to(values.device))
        merged = values.view(-1, unit, *values.shape[1:])[raster].mean(dim=1)  # raster order per image
        if not torch.isfinite(merged).all():
            raise PruningError("vision attention scores contain NaN or inf")
        return list(torch.split(merged, [self.merged_tokens(g) for g in grid_thw]))

    # --- selection -----------------------------------------------------------------------------------------
    def _select(self, session, features, captured, pixel_values, grid_thw):
        """Every image is one grid (images with the same grid and budget share a select call); kept features
        and kept indices per image."""
        method = session.method
        grids = [tuple(int(x) for x in g) for g in grid_thw]
        if any(t != 1 for t, _, _ in grids):
            raise PruningError(f"image grids must have one temporal patch, got {grids}")
        patch_counts = [t * h * w for t, h, w in grids]
        offsets = [0, *itertools.accumulate(patch_counts)]
        ids = [stable_ids(pixel_values[a:b].reshape(1, -1))[0] for a, b in itertools.pairwise(offsets)]
        inputs = []
        for i, (_, h, w) in enumerate(grids):
            shape = (h // self.merge, w // self.merge)
            if features[i].shape[0] != shape[0] * shape[1]:
                raise PruningError(f"image {i}: {features[i].shape[0]} merged features for a {shape} grid")
            inputs.append(GridInput(
                shape, features[i], {name: values[i] for name, values in captured.items()},
                self.budget_for_grid(method, grids[i]), self.tokens_for_grid(method, grids[i]), ids[i], visual=i,
                token_embeds=features[i],  # merged visual tokens live in the LLM's embedding space
            ))
        outputs = self.select_grids(session, inputs, len(grids))
        return [o.features for o in outputs], [o.indices for o in outputs]

    # --- positions -----------------------------------------------------------------------------------------
    def _install_positions(self, stack: ExitStack) -> None:
        inner = self.inner
        original_forward = inner.forward
        original_video = inner.get_video_features
        signature = inspect.signature(original_forward)

        def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                           second_per_grid_ts=None, attention_mask=None, **kwargs):
            # generate() calls this before it encodes the images, so the kept indices are not known yet: text
            # positions are exact, kept image tokens get placeholders that forward() replaces.
            pending = kwargs.get("pixel_values") is not None
            return self.rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                   attention_mask, kept=None, provisional=pending)

        def get_video_features(pixel_values_videos, video_grid_thw=None, *args, return_dict=None, **kwargs):
            # videos are not pruned; their grids travel with the features (generate() drops video_grid_thw)
            out = original_video(pixel_values_videos, video_grid_thw, *args, return_dict=True, **kwargs)
            setattr(out, GRID_ATTRIBUTE, video_grid_thw)
            return out if return_dict is not False else out.to_tuple()

        def forward(*args, **kwargs):
            call = _bind(signature, args, kwargs)
            extra = call.pop("kwargs")
            encoder = dict(call.get("mm_encoder_outputs") or {})
            if call.get("pixel_values") is not None:
                encoder["image"] = inner.get_image_features(
                    call["pixel_values"], call.get("image_grid_thw"), return_dict=True, **extra
                )
                call["pixel_values"] = None
            image = encoder.get("image")
            if image is None:
                return original_forward(**call, **extra)  # no new image in this step (decoding, text only)
            kept = getattr(image, KEPT_ATTRIBUTE, None)
            if kept is None or len(kept) != len(image.pooler_output):
                raise PruningError(
                    "image features without the adapter's kept indices reached the LLM (encoded outside the adapter, "
                    "or expanded for beam search / num_return_sequences > 1, which the Qwen2.5-VL adapter does not "
                    "support): their positions are unknown"
                )
            if call.get("pixel_values_videos") is not None:
                encoder["video"] = inner.get_video_features(
                    call["pixel_values_videos"], call.get("video_grid_thw"), return_dict=True, **extra
                )
                call["pixel_values_videos"] = None
            if call.get("input_ids") is None:
                raise PruningError("pruned Qwen2.5-VL inputs need input_ids to place the kept image tokens")
            cache = call.get("cache")
            if cache is not None and cache.get_seq_length() > 0:
                raise PruningError("new images after a filled KV cache are not supported by the Qwen2.5-VL adapter")
            video = encoder.get("video")
            image_grid = call.get("image_grid_thw")
            video_grid = call.get("video_grid_thw")
            positions, deltas = self.rope_index(
                call["input_ids"],
                call.get("mm_token_type_ids"),
                image_grid if image_grid is not None else getattr(image, GRID_ATTRIBUTE),
                video_grid if video_grid is not None or video is None else getattr(video, GRID_ATTRIBUTE, None),
                call.get("second_per_grid_ts"),
                call.get("attention_mask"),
                kept=kept,
            )
            given = call.get("position_ids")
            if given is not None and given.dim() == 3 and given.shape[0] == 4:  # generate: text row + 3 M-RoPE rows
                positions = torch.cat([given[:1], positions.to(given.device, given.dtype)])
            call["position_ids"] = positions
            call["mm_encoder_outputs"] = encoder
            inner.rope_deltas = deltas
            return original_forward(**call, **extra)

        patch_attribute(stack, inner, "get_rope_index", get_rope_index)
        patch_attribute(stack, inner, "get_video_features", get_video_features)
        patch_attribute(stack, inner, "forward", forward)

    def rope_index(
        self,
        input_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kept: list[torch.Tensor] | None = None,
        provisional: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions [3, B, S] and rope deltas [B, 1] of a sequence whose images hold only their kept tokens.

        Follows ``Qwen2_5_VLModel.get_rope_index`` (text 1D, images and videos (t, row, col) from the position where
        they start, the next text at start + max(rows, cols)), except for the pruned images:

        kept: per image (in order over the batch) the kept raster indices into its merged grid. In "original" mode
            a kept token gets the unpruned position at its index; in "compact" mode the image's tokens are numbered
            like text. Without ``kept`` (``provisional=True``) image tokens whose count differs from their grid get
            placeholder positions (text positions stay exact); without either, such images are an error.
        """
        batch, length = input_ids.shape
        device = input_ids.device
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids)
            mm_token_type_ids[input_ids == self.model.config.image_token_id] = 1
            mm_token_type_ids[input_ids == self.model.config.video_token_id] = 2
        positions = torch.zeros(3, batch, length, dtype=input_ids.dtype, device=device)
        images = iter(range(len(image_grid_thw) if image_grid_thw is not None else 0))
        videos = iter(video_grid_thw) if video_grid_thw is not None else iter(())
        seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else iter([1] * length)
        tokens_per_second = getattr(self.vision_config, "tokens_per_second", 1)  # Qwen3-VL: per-frame grids (t = 1)
        deltas = []
        for b in range(batch):
            valid = attention_mask[b].bool() if attention_mask is not None else torch.ones(length, dtype=torch.bool, device=device)
            types = mm_token_type_ids[b][valid].tolist()
            pieces, current = [], 0
            for key, group in itertools.groupby(types):
                size = len(list(group))
                if key == 0:
                    pieces.append(torch.arange(size, device=device).view(1, -1).expand(3, -1) + current)
                    current += size
                elif key == 1:
                    i = next(images, None)
                    if i is None:
                        raise PruningError("more image token groups in input_ids than images in image_grid_thw")
                    piece, current = self._image_positions(i, image_grid_thw[i], size, current, kept, provisional, device)
                    pieces.append(piece)
                elif key == 2:
                    grid = next(videos)
                    piece = self.inner.get_vision_position_ids(
                        current, grid, 1, self.merge, tokens_per_second * next(seconds), device=device
                    )
                    pieces.append(piece)
                    current += max(int(grid[1]), int(grid[2])) // self.merge
                else:
                    raise PruningError(f"unsupported modality type {key} in mm_token_type_ids")
            sample = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long, device=device)
            positions[:, b, valid] = sample.to(positions.dtype)
            deltas.append((int(sample.max()) + 1 if sample.numel() else 0) - len(types))
        return positions, torch.tensor(deltas, device=device).unsqueeze(1)

    def _image_positions(self, i, grid_thw, size, start, kept, provisional, device):
        """Positions [3, size] of image i's tokens starting at ``start``, and where the next token starts."""
        n = self.merged_tokens(grid_thw)
        if self.positions == "compact":
            if kept is not None and kept[i].numel() != size:
                raise PruningError(_count_mismatch(i, size, kept[i].numel()))
            return torch.arange(size, device=device).view(1, -1).expand(3, -1) + start, start + size
        full = self.inner.get_vision_position_ids(start, grid_thw, 1, self.merge, 1, device=device)  # [3, n]
        end = start + max(int(grid_thw[1]), int(grid_thw[2])) // self.merge
        if kept is not None:
            index = kept[i].to(device)
            if index.numel() != size:
                raise PruningError(_count_mismatch(i, size, index.numel()))
        elif size == n:
            index = torch.arange(n, device=device)
        elif provisional:
            index = torch.arange(size, device=device)  # placeholders; replaced in forward()
        else:
            raise PruningError(
                f"image {i} has {size} placeholder tokens for {n} merged tokens but no kept indices are known; "
                "pass pixel_values (or the pruned encoder outputs) in the same forward"
            )
        if size > n:
            raise PruningError(f"image {i}: {size} placeholder tokens exceed its {n} merged tokens")
        return full[:, index], end


def _count_mismatch(image: int, placeholders: int, kept: int) -> str:
    return (
        f"image {image}: {placeholders} placeholder tokens but {kept} kept features; build the inputs with the "
        "processor passed to hiprune.apply (it then emits the kept count per image)"
    )


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a call as one dict of named parameters; extra keywords stay under "kwargs"."""
    bound = signature.bind(*args, **kwargs)
    call = dict(bound.arguments)
    call["kwargs"] = dict(call.get("kwargs") or {})
    return call


__all__ = ["POSITION_MODES", "Qwen25VLAdapter"]
