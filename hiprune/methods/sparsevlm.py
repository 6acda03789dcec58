"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
ICML 2025): text-guided progressive pruning inside the LLM, with recycling of pruned tokens. Spec §10.

This file is the schedule and the selection (raters, counts, density-peak recycling); ``hiprune.adapters.llm_pruning``
runs it: ``DropStage(l + 1, k_l, score="raters", added=clusters)`` -- the stage's layer is the first that runs on the
shortened sequence, the pruning layer l itself runs in full -- with compact positions.

The rule (official v1.5 code, the default; ``version="v1.0"`` is the paper's rank-based count):
1. Raters, once, on the LLM's input embeddings: V = the image's embeddings, T = those of every token after the image;
   P = row-wise softmax over text of V T^T; m_j = mean over image rows of P[:, j]; raters = {j : m_j > mean_j m_j}.
2. At each pruning layer l (0-based; v1.5: 2, 6, 15) the layer runs on all tokens; r(v) = mean over the raters of the
   head-averaged causal attention from the rater to current image token v (in layer l).
3. Keep k_l = min(schedule_l, n_vis - 1) image tokens with the largest r, in sequence order.
4. Recycling: the top floor(0.3 n_pruned) + 1 pruned tokens by r (their layer-l outputs) are clustered into
   floor(n_cand / 10) + 1 clusters by density-peak kNN (:func:`dpc_knn`); each cluster's plain mean becomes a token
   placed right after the kept image tokens (and is an image token for the later stages).
5. Positions are renumbered after each pruning layer; the pruning layer itself keeps full-length KV.
v1.5 schedules (visual tokens kept after layers 2 / 6 / 15): 192 -> [300, 200, 110], 128 -> [303, 110, 36],
64 -> [66, 30, 17]; with recycling the image counts become 309/204/113, 312/117/39, 82/32/18.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from numbers import Integral
from typing import ClassVar

import torch

from hiprune.methods.base import DropPositions, DropStage, Method, Stage, register_method, top_k

V15_LAYERS: tuple[int, ...] = (2, 6, 15)
V15_SCHEDULES: dict[int, tuple[int, ...]] = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
OFFICIAL_TOKENS = 576  # the schedules are LLaVA-1.5's (576 visual tokens per image)
V10_LAYERS: tuple[int, ...] = (2, 6, 15, 19)
V10_SCALE_BIAS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
RECYCLE_FRACTION = 0.3  # of the pruned tokens, the best-scored floor(0.3 n) + 1 are candidates
CLUSTER_DIVISOR = 10  # floor(n_cand / 10) + 1 clusters
DENSITY_NOISE = 1e-6  # uniform noise added to the densities (official; seeded here)


def text_raters(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """[M] bool: which of the M text tokens rate the image. image_embeds [N, D], text_embeds [M, D] (LLM input
    embeddings). P = softmax over text of V T^T (float32); a text token rates when its mean column exceeds the mean."""
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"raters need image [N, D] and text [M, D] embeddings, got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if text_embeds.shape[0] == 0:
        raise ValueError("SparseVLM needs text after the image to rate it; the prompt has none")
    probabilities = torch.softmax(image_embeds.float() @ text_embeds.float().T, dim=-1)
    relevance = probabilities.mean(dim=0)
    return relevance > relevance.mean()


def stage_keep(schedule_count: int, visual_tokens: int) -> int:
    """k_l = min(schedule_l, n_vis - 1): every pruning layer drops at least one token."""
    return min(int(schedule_count), int(visual_tokens) - 1)


def v10_keep(rank: int, budget: int, visual_tokens: int) -> int:
    """v1.0's count: min(floor(rank * scale + bias), n_vis - 1) with the budget's scale / bias; the rank of the
    raters x image attention matrix equal to n_vis means no pruning (returns n_vis)."""
    if budget not in V10_SCALE_BIAS:
        raise ValueError(f"SparseVLM v1.0 has scale / bias for budgets {sorted(V10_SCALE_BIAS)}, not {budget}")
    if rank >= visual_tokens:
        return int(visual_tokens)
    scale, bias = V10_SCALE_BIAS[budget]
    return min(math.floor(rank * scale + bias), int(visual_tokens) - 1)


def recycle_counts(pruned: int) -> tuple[int, int]:
    """(candidates, clusters) for ``pruned`` dropped tokens: floor(0.3 n) + 1 and floor(candidates / 10) + 1."""
    if pruned < 1:
        return 0, 0
    candidates = min(pruned, math.floor(RECYCLE_FRACTION * pruned) + 1)
    return candidates, candidates // CLUSTER_DIVISOR + 1


def image_counts(visual_tokens: int, schedule: Sequence[int], recycle: bool = True) -> list[int]:
    """Image tokens after each pruning layer: k_l kept plus, with recycling, the cluster tokens of that stage."""
    counts, current = [], int(visual_tokens)
    for count in schedule:
        keep = stage_keep(count, current)
        current = keep + (recycle_counts(current - keep)[1] if recycle else 0)
        counts.append(current)
    return counts


def dpc_knn(features: torch.Tensor, clusters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Density-peak clustering with kNN densities (the official recycling): [n, d] features -> [n] cluster of every
    token (0..clusters-1, centres in decreasing centre score).

    distance: Euclidean / sqrt(d); density: exp(-mean squared distance to the ``clusters`` nearest tokens, itself
    included) + U(0, 1e-6) noise from ``generator``; delta: distance to the nearest denser token (the densest: the
    largest pairwise distance); centres: the top ``clusters`` of delta * density; every other token joins its nearest
    centre.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    n, d = features.shape
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must lie in [1, {n}], got {clusters}")
    x = features.float()
    distance = torch.cdist(x[None], x[None])[0] / math.sqrt(d)
    nearest = torch.topk(distance, k=clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    noise = torch.rand(n, generator=generator, dtype=density.dtype)  # on the CPU: the same draws on every device
    density = density + noise.to(density.device) * DENSITY_NOISE
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    largest = distance.max()
    delta = torch.where(denser, distance, largest).min(dim=-1).values
    centres = torch.topk(delta * density, k=clusters).indices
    assignment = distance[:, centres].argmin(dim=-1)
    assignment[centres] = torch.arange(clusters, device=assignment.device)
    return assignment


def recycle(
    pruned_hidden: torch.Tensor, pruned_scores: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Cluster tokens [c, D] from the pruned tokens' hidden states [n, D] and their rater scores [n]: the top
    floor(0.3 n) + 1 by score (ties to the lower index), clustered by :func:`dpc_knn`, each cluster's plain mean."""
    n = pruned_hidden.shape[0]
    if pruned_scores.shape != (n,):
        raise ValueError(f"scores must be [{n}], got shape {tuple(pruned_scores.shape)}")
    candidates, clusters = recycle_counts(n)
    if candidates == 0:
        return pruned_hidden.new_zeros(0, pruned_hidden.shape[1])
    order = torch.sort(-pruned_scores.float(), stable=True).indices[:candidates]
    chosen = pruned_hidden[order]
    assignment = dpc_knn(chosen, clusters, generator)
    sums = torch.zeros(clusters, chosen.shape[1], dtype=torch.float32, device=chosen.device)
    sums = sums.index_add_(0, assignment, chosen.float())
    sizes = torch.bincount(assignment, minlength=clusters).clamp(min=1).to(torch.float32)
    return (sums / sizes[:, None]).to(pruned_hidden.dtype)


@register_method
@dataclass
class SparseVLM(Method):
    """SparseVLM v1.5: text-rated pruning after the decoder layers ``layers`` with recycling.

    budget: 192, 128 or 64 (the official schedules, defined for LLaVA-1.5's 576 tokens) unless ``schedule`` is given.
    layers: 0-based pruning layers l (each runs in full; the next one runs on the kept tokens). Default 2, 6, 15.
    schedule: visual tokens kept after each of ``layers`` (before recycling); None: the official one for the budget.
    recycle: add the pruned tokens' cluster tokens (official, default) or not.
    seed: seeds the density noise of the recycling per stage, so runs repeat exactly (and every image of a batch
        gets the same noise as alone).
    """

    name: ClassVar[str] = "sparsevlm"
    stage: ClassVar[Stage] = "llm"

    layers: Sequence[int] = V15_LAYERS
    schedule: Sequence[int] | None = None
    recycle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "schedule"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)) and isinstance(value, Sequence):
                setattr(self, name, tuple(value))

    def validate(self) -> None:
        if self.schedule is None:
            super().validate()
            if isinstance(self.budget, float) and self.official_budget(self.budget, OFFICIAL_TOKENS) is None:
                raise ValueError(
                    f"SparseVLM has official schedules for budgets {sorted(V15_SCHEDULES)} of {OFFICIAL_TOKENS} tokens "
                    f"(ratios 1/3, 2/9, 1/9), not the ratio {self.budget!r}; give method.options.schedule (tokens kept "
                    "after each of the layers)"
                )
        elif self.budget is not None:
            raise ValueError("SparseVLM takes either a budget (official schedule) or a schedule, not both")
        for name, values in (("layers", self.layers), ("schedule", self.schedule)):
            if values is None:
                continue
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"SparseVLM {name} must be a non-empty list of ints, got {values!r}")
            if any(
                isinstance(v, bool) or not isinstance(v, Integral) or v < (0 if name == "layers" else 1) for v in values
            ):
                raise ValueError(f"SparseVLM {name} must hold ints (layers >= 0, counts >= 1), got {list(values)!r}")
        if any(b <= a for a, b in pairwise(self.layers)):
            raise ValueError(f"SparseVLM layers must be strictly increasing, got {list(self.layers)!r}")
        # an int budget's official schedule depends on the image's token count (drop_schedule); all have 3 counts
        counts = list(self.schedule) if self.schedule is not None else list(V15_SCHEDULES[192])
        if len(counts) != len(self.layers):
            raise ValueError(f"SparseVLM needs one count per layer: layers {list(self.layers)}, schedule {counts}")
        if not isinstance(self.recycle, bool):
            raise ValueError(f"SparseVLM recycle must be true or false, got {self.recycle!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise ValueError(f"SparseVLM seed must be an int, got {self.seed!r}")

    @staticmethod
    def official_budget(budget: int | float, visual_tokens: int) -> int | None:
        """The official budget (192 / 128 / 64 of 576 tokens) that ``budget`` is for an image of ``visual_tokens``
        tokens: the same fraction of the image's tokens within one token of 576 (a ratio: itself; a count: of
        ``visual_tokens``), or None."""
        if isinstance(budget, bool) or not isinstance(budget, (Integral, float)):
            return None
        fraction = float(budget) if isinstance(budget, float) else int(budget) / int(visual_tokens)
        for official in V15_SCHEDULES:
            if abs(fraction * OFFICIAL_TOKENS - official) <= 1.0:
                return official
        return None

    def counts(self, visual_tokens: int = OFFICIAL_TOKENS) -> list[int]:
        """Visual tokens kept after each pruning layer, before recycling (schedule_l): ``schedule``, or the official
        schedule of the budget; for an image of N != 576 tokens the official counts scaled by N / 576 (floored), the
        same fractions of its tokens (the HARNESS'S derived setting: SparseVLM has no official LLaVA-NeXT or
        Qwen2.5-VL schedule)."""
        if self.schedule is not None:
            return list(self.schedule)
        official = self.official_budget(self.budget, visual_tokens)
        if official is None:
            raise ValueError(
                f"SparseVLM has official schedules for budgets {sorted(V15_SCHEDULES)} of {OFFICIAL_TOKENS} tokens "
                f"(scaled to other token counts by the same fraction), not {self.budget!r} of an image of "
                f"{visual_tokens} tokens; give method.options.schedule (tokens kept after each of the layers)"
            )
        return [math.floor(count * int(visual_tokens) / OFFICIAL_TOKENS) for count in V15_SCHEDULES[official]]

    def drop_schedule(self, visual_tokens: int, decoder_layers: int) -> list[DropStage]:
        """One stage after each pruning layer l: k_l = min(schedule_l, n_vis - 1) kept, plus the cluster tokens."""
        if self.layers[-1] + 1 >= decoder_layers:
            raise ValueError(
                f"SparseVLM prunes after layer {self.layers[-1]}, but an LLM of {decoder_layers} layers needs the "
                f"pruning layers in 0..{decoder_layers - 2}; set method.options.layers"
            )
        stages, current = [], int(visual_tokens)
        for layer, count in zip(self.layers, self.counts(visual_tokens), strict=True):
            keep = stage_keep(count, current)
            if keep < 1:
                raise ValueError(f"SparseVLM keeps no visual token after layer {layer} ({current} left)")
            added = recycle_counts(current - keep)[1] if self.recycle else 0
            stages.append(DropStage(layer=int(layer) + 1, keep=keep, score="raters", added=added))
            current = keep + added
        return stages

    def drop_positions(self) -> DropPositions:
        return "compact"

    def text_raters(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return text_raters(image_embeds, text_embeds)

    def select_from_attention(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """The ``keep`` highest rater scores of each row, in sequence order (ties to the lower index)."""
        if scores.dim() != 2 or not 1 <= keep <= scores.shape[1]:
            raise ValueError(f"cannot keep {keep} of scores shaped {tuple(scores.shape)}")
        return top_k(scores.float(), int(keep)).sort(dim=1).values

    def recycle_candidates(self, pruned: int) -> int:
        """Candidates clustered among ``pruned`` dropped tokens (FLOPs accounting: their pairwise distances)."""
        return recycle_counts(pruned)[0]

    def recycle_tokens(self, hidden: torch.Tensor, scores: torch.Tensor, stage: int) -> torch.Tensor:
        """Cluster tokens of one image's dropped tokens at stage ``stage``, noise seeded by (seed, stage)."""
        generator = torch.Generator().manual_seed(int(self.seed) * 1000 + int(stage))
        return recycle(hidden, scores, generator)

    def describe(self) -> dict:
        settings = super().describe()
        settings["layers"] = list(self.layers)
        settings["schedule"] = None if self.schedule is None else list(self.schedule)
        return settings
