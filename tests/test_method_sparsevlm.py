"""SparseVLM's selection logic (hiprune/methods/sparsevlm.py): the spec's golden cases (§10) for the raters and the
recycling counts, the v1.5 schedules' per-layer averages, and the density-peak clustering's properties; the method's
options. The plumbing on a model: tests/test_sparsevlm_model.py."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

import hiprune
from hiprune.adapters.llm_pruning import visual_per_layer
from hiprune.methods.base import DropStage
from hiprune.methods.sparsevlm import (
    V15_LAYERS,
    V15_SCHEDULES,
    SparseVLM,
    dpc_knn,
    image_counts,
    recycle,
    recycle_counts,
    stage_keep,
    text_raters,
    v10_keep,
)


def test_raters_golden():
    # spec §10: V = [(1,0), (0,1)], T = [(2,0), (0,0), (0,2)] -> P rows [.787, .107, .107], [.107, .107, .787]
    # -> m = [.447, .107, .447] > 1/3 -> raters {0, 2}
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    probabilities = torch.softmax(image @ text.T, dim=-1)
    torch.testing.assert_close(probabilities[0], torch.tensor([0.787, 0.107, 0.107]), atol=5e-4, rtol=0)
    assert text_raters(image, text).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="no"):
        text_raters(image, text[:0])


def test_recycling_counts_golden():
    # spec §10: n_vis = 576, keep 300 -> pruned 276 -> 83 candidates -> 9 clusters -> 309 tokens
    assert stage_keep(300, 576) == 300 and recycle_counts(276) == (83, 9)
    assert recycle_counts(0) == (0, 0) and recycle_counts(1) == (1, 1)
    # the image counts after layers 2 / 6 / 15 and their per-layer averages over 32 layers (layers 0..2 at 576)
    for budget, counts, average in (
        (192, [309, 204, 113], 206.5),
        (128, [312, 117, 39], 145.4),
        (64, [82, 32, 18], 82.3),
    ):
        assert image_counts(576, V15_SCHEDULES[budget]) == counts
        assert image_counts(576, V15_SCHEDULES[budget], recycle=False) == list(V15_SCHEDULES[budget])
        spans = [V15_LAYERS[0] + 1, *(b - a for a, b in pairwise(V15_LAYERS)), 32 - 1 - V15_LAYERS[-1]]
        assert sum(spans) == 32
        total = spans[0] * 576 + sum(span * count for span, count in zip(spans[1:], counts))
        assert abs(total / 32 - average) <= 0.05  # the spec's one-decimal averages (82.25 -> 82.3)
    assert stage_keep(300, 120) == 119  # never more than n_vis - 1


def test_v10_rank_rule():
    assert v10_keep(20, 192, 576) == 270 and v10_keep(20, 128, 576) == 186 and v10_keep(20, 64, 576) == 16
    assert v10_keep(576, 192, 576) == 576  # full rank: no pruning
    assert v10_keep(100, 192, 576) == 575
    with pytest.raises(ValueError, match="budgets"):
        v10_keep(20, 96, 576)


def test_dpc_knn_separates_clear_clusters_and_repeats_with_a_seed():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    points = torch.cat([c + 0.1 * torch.randn(6, 3, generator=g) for c in centres])
    truth = torch.arange(3).repeat_interleave(6)
    first = dpc_knn(points, 3, torch.Generator().manual_seed(1))
    again = dpc_knn(points, 3, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    # the same partition as the truth (cluster labels may be permuted)
    assert len({(int(a), int(b)) for a, b in zip(first, truth)}) == 3
    with pytest.raises(ValueError, match="clusters"):
        dpc_knn(points, 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_recycle_returns_cluster_means_of_the_best_pruned(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    scores = torch.rand(n, generator=g)
    candidates, clusters = recycle_counts(n)
    tokens = recycle(hidden, scores, torch.Generator().manual_seed(seed))
    assert tokens.shape == (clusters, d)
    chosen = hidden[torch.sort(-scores, stable=True).indices[:candidates]]
    assignment = dpc_knn(chosen, clusters, torch.Generator().manual_seed(seed))
    assert set(assignment.tolist()) == set(range(clusters))  # every centre keeps at least itself
    for c in range(clusters):
        torch.testing.assert_close(tokens[c], chosen[assignment == c].mean(dim=0))


def test_schedule_options_and_validation():
    method = hiprune.build_method("sparsevlm", budget=192)
    assert method.drop_schedule(576, 32) == [
        DropStage(3, 300, "raters", 9),
        DropStage(7, 200, "raters", 4),
        DropStage(16, 110, "raters", 3),
    ]
    assert visual_per_layer(method.drop_schedule(576, 32), 576, 32) == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    plain = hiprune.build_method("sparsevlm", budget=64, recycle=False).drop_schedule(576, 32)
    assert [(s.keep, s.added) for s in plain] == [(66, 0), (30, 0), (17, 0)]
    assert method.describe() == {
        "name": "sparsevlm",
        "budget": 192,
        "layers": [2, 6, 15],
        "schedule": None,
        "recycle": True,
        "seed": 0,
    }
    for options, match in (
        ({"budget": 0.5}, "official schedules"),
        ({"budget": 64, "schedule": [30]}, "not both"),
        ({"schedule": [30, 20]}, "one count per layer"),
        ({"budget": 64, "layers": [6, 2, 15]}, "strictly increasing"),
        ({"budget": 64, "recycle": "yes"}, "recycle"),
    ):
        with pytest.raises(ValueError, match=match):
            hiprune.build_method("sparsevlm", **options)
    with pytest.raises(ValueError, match="pruning layers in 0..1"):
        hiprune.build_method("sparsevlm", budget=64).drop_schedule(64, 3)
    # an int budget is a fraction of the image's tokens: 100 of 576 has no official schedule (checked before loading,
    # on the model's token count); 640 of LLaVA-NeXT's 2880 is 128 of 576: the official counts x 5 (derived)
    with pytest.raises(ValueError, match="official schedules"):
        hiprune.build_method("sparsevlm", budget=100).drop_schedule(576, 32)
    assert [s.keep for s in hiprune.build_method("sparsevlm", budget=640).drop_schedule(2880, 32)] == [1515, 550, 180]
    with pytest.raises(ValueError, match="official schedules"):  # 160 of 2880 = 32 of 576
        hiprune.build_method("sparsevlm", budget=160).drop_schedule(2880, 32)
    # Qwen2.5-VL's ratios 0.334 / 0.223 / 0.112 are 192 / 128 / 64 of 576 within one token: scaled by N / 576
    assert [s.keep for s in hiprune.build_method("sparsevlm", budget=0.112).drop_schedule(1152, 36)] == [132, 60, 34]


def test_config_matches_the_method():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "method" / "sparsevlm.yaml")
    # what the method is comes from the registry; the config holds its name and options only
    assert cfg.name == "sparsevlm" and hiprune.METHODS["sparsevlm"] is SparseVLM and set(cfg) == {"name", "options"}
    assert OmegaConf.to_container(cfg.options) == {"layers": [2, 6, 15], "schedule": None, "recycle": True, "seed": 0}


def test_check_llm_method_needs_the_hooks_a_schedule_uses():
    from dataclasses import dataclass
    from types import SimpleNamespace
    from typing import ClassVar

    from hiprune.adapters.llm_pruning import check_llm_method
    from hiprune.methods.fastv import FastV

    @dataclass
    class RatedWithoutRaters(FastV):
        name: ClassVar[str] = "rated_without_raters_test"

        def drop_schedule(self, visual_tokens, decoder_layers):
            return [DropStage(1, 8, "raters")]

    @dataclass
    class AddsWithoutRecycling(FastV):
        name: ClassVar[str] = "adds_without_recycling_test"

        def drop_schedule(self, visual_tokens, decoder_layers):
            return [DropStage(1, 8, "previous", added=2)]

    text = SimpleNamespace(model_type="llama", num_hidden_layers=3, _attn_implementation="sdpa")
    for method in (RatedWithoutRaters(budget=8), AddsWithoutRecycling(budget=8)):
        with pytest.raises(ValueError, match="does not implement"):
            check_llm_method(method, text, "llava", 64)
    check_llm_method(hiprune.build_method("sparsevlm", layers=[0, 1], schedule=[32, 12]), text, "llava", 64)
