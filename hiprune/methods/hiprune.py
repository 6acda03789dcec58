"""HiPrune (arXiv 2508.00553): training-free visual token pruning from the vision encoder's own attention.

Per grid of N = rows x cols patch tokens and a budget N':
  1. anchors   - the k_a = round(N' * alpha / 5) tokens with the highest *object* score (a middle encoder layer);
  2. buffers   - the grid neighbours of every anchor (shape and boundary handling configurable);
  3. registers - the remaining N' - |anchors U buffers| tokens with the highest *deep* score (the feature layer);
  4. keep      - all of them, sorted, so kept tokens stay in raster order.

Defaults reproduce the authors' evaluation code ("official"): clamped cross-shaped buffers. ``boundary="drop"``
follows the paper's Eq. 5 instead. ``registers="none"`` is the token-type ablation "w/o Register" (paper Table 6b),
whose spending of the freed budget the paper does not state; the harness's reading: the whole budget goes to anchors
with their buffers, anchors taken in object-score order until N' tokens are chosen (see
:func:`_fill_with_anchors_and_buffers`). Ties in a score are broken towards the lower token index (stable sort), so a
selection is deterministic and independent of batch composition and device; the official code uses
``torch.topk``, whose tie order is unspecified (ties do not occur in practice with real attention scores).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from hiprune.methods.base import (
    FEATURE_LAYER,
    Method,
    Request,
    Selection,
    Stage,
    VisionTokens,
    gather_tokens,
    rank_descending,
    register_method,
)
from hiprune.scores import all_finite
from hiprune.scores import check_finite as require_finite  # the name check_finite is a parameter here

BOUNDARIES = ("clamp", "drop")

# Buffer shapes as (row offset, column offset) from the anchor; the official cross is a-1, a+1, a-c, a+c.
BUFFER_OFFSETS: dict[str, tuple[tuple[int, int], ...]] = {
    "cross": ((0, -1), (0, 1), (-1, 0), (1, 0)),
    "square": ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
    "row": ((0, -1), (0, 1)),
    "column": ((-1, 0), (1, 0)),
    # ablations (paper Tables 6b and 11): the cross rotated by 45 degrees, and no buffers at all
    "rot_cross": ((-1, -1), (-1, 1), (1, -1), (1, 1)),
    "none": (),
}

ROLES = ("anchor", "buffer", "register")
_BUFFER, _ANCHOR = 1, 2  # per-token role codes of the selection (0: not chosen by anchors or buffers)
REGISTER_MODES = ("deep", "none")
ATTENTION_PATTERNS = ("global", "cls")


def anchor_count(budget: int, alpha: float) -> int:
    """k_a = round(budget * alpha / 5), Python's round (half to even): 192 -> 4, 128 -> 3, 64 -> 1 at alpha 0.1.

    The 5 is one anchor plus its 4 cross buffers: alpha is the budget share meant for anchors and buffers.
    """
    return round(budget * alpha / 5)


def max_anchor_and_buffer_count(budget: int, alpha: float, buffer: str = "cross") -> int:
    """Worst case of |anchors U buffers|: every anchor with all its neighbours distinct and inside the grid."""
    _check_name("buffer", buffer, tuple(BUFFER_OFFSETS))
    return anchor_count(budget, alpha) * (1 + len(BUFFER_OFFSETS[buffer]))


def select_hiprune(
    object_scores: torch.Tensor,
    deep_scores: torch.Tensor,
    grid: tuple[int, int],
    budget: int,
    alpha: float = 0.1,
    boundary: str = "clamp",
    buffer: str = "cross",
    registers: str = "deep",
    check_finite: bool = True,
) -> torch.Tensor:
    """Kept token indices [B, budget] (int64, sorted ascending, distinct per row).

    Arguments and errors as in :func:`select_hiprune_with_roles`.
    """
    indices, _ = select_hiprune_with_roles(object_scores, deep_scores, grid, budget, alpha, boundary, buffer,
                                           registers, check_finite)
    return indices


def select_hiprune_with_roles(
    object_scores: torch.Tensor,
    deep_scores: torch.Tensor,
    grid: tuple[int, int],
    budget: int,
    alpha: float = 0.1,
    boundary: str = "clamp",
    buffer: str = "cross",
    registers: str = "deep",
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HiPrune selection for B grids at once; every row is computed independently of the others.

    object_scores, deep_scores: [B, N] per-token scores (CLS removed), N == rows * cols, raster order.
    grid: (rows, cols).
    budget: tokens kept per row, 1 <= budget <= N.
    alpha: share of the budget for anchors and buffers; k_a = round(budget * alpha / 5) anchors.
    boundary: "clamp" (official: neighbours clamped to [0, N-1], no row-wrap check, so a top-row anchor keeps
        token 0) or "drop" (paper Eq. 5: neighbours outside the grid or on another row are discarded).
    buffer: neighbour shape, "cross" (4, default), "square" (8), "row" (2), "column" (2); ablations "rot_cross"
        (the 4 diagonal neighbours) and "none" (anchors without buffers).
    registers: "deep" (default: the rest of the budget by deep score) or "none" (ablation "w/o Register": no deep
        score is used, alpha is ignored, and anchors with their buffers fill the whole budget, see
        :func:`_fill_with_anchors_and_buffers`).
    check_finite: raise on NaN / inf scores, which needs one read-back of a flag from the device. False: the caller
        has checked or will check the scores (the adapters check every captured score once per vision forward, at
        the read-back of the kept indices for the records), and the selection reads nothing back from the device at
        the paper's settings.

    Returns (indices, roles): indices [B, budget] int64 sorted ascending; roles maps "anchor", "buffer",
    "register" to [B, budget] bool masks aligned with indices, exactly one True per position. An anchor that is
    also another anchor's neighbour counts as an anchor.

    Raises ValueError on malformed input, and when a row's anchors and buffers alone exceed the budget.
    """
    rows, cols = _validate(object_scores, deep_scores, grid, budget, alpha, boundary, buffer, check_finite)
    _check_name("registers", registers, REGISTER_MODES)
    batch, n = object_scores.shape
    device = object_scores.device
    # Compare in float32 so half-precision scores rank the same way on every device.
    object_scores = object_scores.float()
    deep_scores = deep_scores.float()
    if registers == "none":
        return _fill_with_anchors_and_buffers(object_scores, rows, cols, budget, boundary, BUFFER_OFFSETS[buffer])

    # Few kernels and no read-back at the paper's settings (a GPU at batch 1 is launch-bound here): one sort for the
    # anchors, one for the kept set, one over the kept indices, and one code per token for the roles.
    # 1. Anchors: top-k_a object scores (a stable descending sort: ties to the lower index).
    k_a = anchor_count(budget, alpha)
    anchors = torch.sort(object_scores, dim=1, descending=True, stable=True).indices[:, :k_a]  # [B, k_a]

    # 2. Buffers: the anchors' neighbours. code: 0 not chosen, BUFFER, ANCHOR (an anchor that is also another
    #    anchor's neighbour counts as an anchor: anchors are written last).
    neighbours = _neighbours(anchors, rows, cols, boundary, BUFFER_OFFSETS[buffer])  # [B, k_a * m]
    code = torch.zeros(batch, n, dtype=torch.uint8, device=device)
    code.scatter_(1, neighbours, _BUFFER)
    code.scatter_(1, anchors, _ANCHOR)
    chosen = code != 0

    # Reading the count back waits for the device; skip it when even the worst case fits (always at the paper's
    # settings, since HiPrune.validate rejects integer budgets whose worst case does not fit).
    if max_anchor_and_buffer_count(budget, alpha, buffer) > budget:
        chosen_count = chosen.sum(dim=1)
        if bool((chosen_count > budget).any()):
            raise ValueError(
                f"HiPrune anchors + buffers exceed the budget: {k_a} anchors with {buffer!r} buffers cover "
                f"{int(chosen_count.max())} distinct tokens but the budget is {budget}; use a smaller alpha (now "
                f"{alpha}) or a larger budget"
            )

    # 3. Registers: the best deep scores among tokens not yet chosen, and 4. keep everything chosen. Chosen tokens
    #    rank first (+inf; the scores are finite), so the first `budget` of one stable descending sort are the
    #    chosen tokens and then the best unchosen ones by deep score, ties to the lower index: the registers. -inf-
    #    like exclusion (not "score - 1") keeps chosen tokens from being picked twice for any score range.
    ranked = torch.sort(deep_scores.masked_fill(chosen, math.inf), dim=1, descending=True, stable=True).indices
    indices = ranked[:, :budget].sort(dim=1).values  # raster order

    role = code.gather(1, indices)
    roles = {"anchor": role == _ANCHOR, "buffer": role == _BUFFER, "register": role == 0}
    return indices, roles


def _fill_with_anchors_and_buffers(
    object_scores: torch.Tensor, rows: int, cols: int, budget: int, boundary: str,
    offsets: tuple[tuple[int, int], ...],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """"w/o Register": anchors in object-score order, each followed by its buffers, until ``budget`` distinct tokens.

    The candidate sequence is a1, buffers(a1), a2, buffers(a2), ... over every token ranked by object score (ties
    to the lower index); a token counts at its first appearance, and the first ``budget`` distinct tokens are kept.
    So every anchor whose group starts before the budget runs out is kept with all of its buffers, except that the
    last group may be cut after some of its buffers (in the shape's offset order). Roles: anchors are the tokens
    ranked among the groups that were started, buffers the other kept tokens.
    """
    batch, n = object_scores.shape
    device = object_scores.device
    group = 1 + len(offsets)
    order = rank_descending(object_scores)  # [B, N]: every token, by object score
    neighbours = _neighbours(order, rows, cols, boundary, offsets).view(batch, n, len(offsets))
    sequence = torch.cat([order.unsqueeze(-1), neighbours], dim=-1).flatten(1)  # [B, N * group]
    slot = torch.arange(sequence.shape[1], device=device).expand(batch, -1)
    first = torch.full((batch, n), sequence.shape[1], dtype=torch.long, device=device)
    first.scatter_reduce_(1, sequence, slot, reduce="amin")  # first slot of every token (each is someone's anchor)
    kept_by_slot = first.sort(dim=1).indices[:, :budget]  # tokens in order of first appearance; slots are distinct
    last_slot = first.gather(1, kept_by_slot).max(dim=1).values  # [B]
    groups_started = last_slot // group + 1  # anchors whose group began within the kept slots
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, -1))
    indices = kept_by_slot.sort(dim=1).values
    anchor = rank.gather(1, indices) < groups_started.unsqueeze(1)
    return indices, {"anchor": anchor, "buffer": ~anchor, "register": torch.zeros_like(anchor)}


def _neighbours(
    anchors: torch.Tensor, rows: int, cols: int, boundary: str, offsets: tuple[tuple[int, int], ...]
) -> torch.Tensor:
    """[B, k_a] anchor indices -> [B, k_a * len(offsets)] neighbour indices, all inside [0, rows * cols).

    "drop" replaces every invalid neighbour by its own anchor, which is selected anyway, so the result keeps a
    fixed shape without adding anything.
    """
    n = rows * cols
    a = anchors.unsqueeze(-1)  # [B, k_a, 1]
    if boundary == "clamp":
        # Official: flat offsets a + dr*cols + dc, clamped; a left/right neighbour may wrap to the adjacent row.
        result = (a + _flat_offsets(offsets, cols, anchors.device)).clamp(0, n - 1)
    else:
        d_row, d_col = _offset_tensors(offsets, anchors.device)
        r, c = a // cols + d_row, a % cols + d_col
        inside = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        result = torch.where(inside, r * cols + c, a)
    return result.flatten(1)


@functools.lru_cache(maxsize=64)
def _offset_tensors(offsets: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets as tensors on ``device``, made once per (shape, device): a host-to-device copy per
    call would stall the launch queue on GPUs."""
    return (torch.tensor([dr for dr, _ in offsets], dtype=torch.long, device=device),
            torch.tensor([dc for _, dc in offsets], dtype=torch.long, device=device))


@functools.lru_cache(maxsize=64)
def _flat_offsets(offsets: tuple[tuple[int, int], ...], cols: int, device: torch.device) -> torch.Tensor:
    """dr * cols + dc of every offset, made once per (shape, grid width, device) like :func:`_offset_tensors`."""
    return torch.tensor([dr * cols + dc for dr, dc in offsets], dtype=torch.long, device=device)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_name(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown HiPrune {what} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"HiPrune alpha must be a number in [0, 1], got {alpha!r}")


def _validate(
    object_scores: torch.Tensor,
    deep_scores: torch.Tensor,
    grid: tuple[int, int],
    budget: int,
    alpha: float,
    boundary: str,
    buffer: str,
    check_finite: bool = True,
) -> tuple[int, int]:
    if object_scores.dim() != 2:
        raise ValueError(f"object scores must be [B, N], got shape {tuple(object_scores.shape)}")
    if deep_scores.shape != object_scores.shape:
        raise ValueError(
            f"object and deep scores must have the same shape, got {tuple(object_scores.shape)} "
            f"and {tuple(deep_scores.shape)}"
        )
    if object_scores.device != deep_scores.device:
        raise ValueError(
            f"object and deep scores are on different devices ({object_scores.device}, {deep_scores.device})"
        )
    if len(grid) != 2 or not all(_is_int(x) and x >= 1 for x in grid):
        raise ValueError(f"grid must be (rows, cols) of positive ints, got {grid!r}")
    rows, cols = grid
    n = object_scores.shape[1]
    if rows * cols != n:
        raise ValueError(f"grid {rows}x{cols} = {rows * cols} tokens does not match the scores' {n} tokens")
    if not _is_int(budget) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an int in [1, {n}] (tokens of this grid), got {budget!r}")
    _check_alpha(alpha)
    _check_name("boundary", boundary, BOUNDARIES)
    _check_name("buffer", buffer, tuple(BUFFER_OFFSETS))
    # One read-back for both score vectors (each waits for the device); the named check only on failure.
    if check_finite and not bool(all_finite(object_scores, deep_scores)):
        require_finite(object_scores, "HiPrune object scores")
        require_finite(deep_scores, "HiPrune deep scores")
    return rows, cols


@register_method
@dataclass
class HiPrune(Method):
    """HiPrune with official defaults: alpha 0.1, object layer 9 (1-based, CLIP ViT-L), clamped cross buffers."""

    name: ClassVar[str] = "hiprune"
    stage: ClassVar[Stage] = "vision"

    alpha: float = 0.1
    object_layer: int = 9
    boundary: str = "clamp"
    buffer: str = "cross"
    attention: str = "global"  # ablation (paper Table 6a): "cls" scores tokens by the CLS query's attention row
    registers: str = "deep"  # ablation (paper Table 6b "w/o Register"): "none" fills the budget with anchors + buffers

    def validate(self) -> None:
        super().validate()
        _check_name("attention", self.attention, ATTENTION_PATTERNS)
        _check_name("registers", self.registers, REGISTER_MODES)
        _check_alpha(self.alpha)
        if not _is_int(self.object_layer) or self.object_layer < 1:
            raise ValueError(f"HiPrune object_layer is a 1-based encoder layer (int >= 1), got {self.object_layer!r}")
        _check_name("boundary", self.boundary, BOUNDARIES)
        _check_name("buffer", self.buffer, tuple(BUFFER_OFFSETS))
        # A ratio budget is only known per image; select_hiprune checks the real count then. Without registers the
        # anchors fill the budget, so alpha plays no part.
        if isinstance(self.budget, int) and self.registers == "deep":
            worst = max_anchor_and_buffer_count(self.budget, self.alpha, self.buffer)
            if worst > self.budget:
                raise ValueError(
                    f"HiPrune anchors + buffers can exceed the budget: {anchor_count(self.budget, self.alpha)} "
                    f"anchors with {self.buffer!r} buffers may cover {worst} tokens but the budget is {self.budget}; "
                    f"use a smaller alpha (now {self.alpha}) or a larger budget"
                )

    def requests(self) -> dict[str, Request]:
        queries = "cls" if self.attention == "cls" else "all"
        wanted = {"object": Request("attention", self.object_layer, queries)}
        if self.registers != "none":  # registers="none" ranks nothing by the deep score: it is not captured
            wanted["deep"] = Request("attention", FEATURE_LAYER, queries)
        return wanted

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        missing = [name for name in self.requests() if name not in tokens.scores]
        if missing:
            raise ValueError(f"HiPrune needs scores {missing} in VisionTokens.scores, got {sorted(tokens.scores)}")
        object_scores = tokens.scores["object"]
        indices, roles = select_hiprune_with_roles(
            object_scores,
            tokens.scores.get("deep", object_scores),  # registers="none" ranks nothing by the deep score
            tokens.grid,
            budget,
            alpha=self.alpha,
            boundary=self.boundary,
            buffer=self.buffer,
            registers=self.registers,
            # the pipeline checks every captured score, reading the flag back with the kept indices (adapters/base.py)
            check_finite=False,
        )
        device = tokens.features.device
        indices = indices.to(device)
        roles = {name: mask.to(device) for name, mask in roles.items()}
        return Selection(indices, gather_tokens(tokens.features, indices), roles)
