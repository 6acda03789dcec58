"""VisPruner: the spec's golden case, agreement with the official tensor code where it is well defined, properties
of the selection, and runs through hiprune.apply on every family (Qwen2.5-VL with attention=global)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from vision_method_runs import REPO, refused_before_patching, run_llava, run_llava_next, run_qwen, run_video

import hiprune
from hiprune.methods.fastervlm import select_fastervlm
from hiprune.methods.vispruner import VisPruner, select_vispruner


def _angles(degrees):
    return torch.tensor([[[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees]])


GOLDEN_C = torch.tensor([[0.30, 0.04, 0.20, 0.10, 0.15, 0.08, 0.07, 0.06]])
GOLDEN_X = _angles([45, 270, 135, 5, 0, 90, 100, 180])


def test_golden_from_the_specification():
    # baselines.md §4: I = {0, 2}; R = [4, 3, 5, 6, 7, 1]; round 1 (m = 4) drops A = [4, 5, 7] -> R = [3, 6, 1];
    # round 2 (m = 1): A = [3, 1], s = cos95, cos170 -> drop 3 -> R = [1, 6] -> keep [0, 1, 2, 6]
    assert select_vispruner(GOLDEN_C, GOLDEN_X, 4, 0.5).tolist() == [[0, 1, 2, 6]]


def test_ratio_one_is_fastervlm_and_ratio_zero_is_pure_diversity():
    assert torch.equal(select_vispruner(GOLDEN_C, GOLDEN_X, 4, 1.0), select_fastervlm(GOLDEN_C, 4))
    # r = 0: R = every patch by c = [0, 2, 4, 3, 5, 6, 7, 1]; m = 4; A = [0, 4, 5, 7], B = [2, 3, 6, 1];
    # s(0) = cos40 (to 3), s(4) = cos5 (to 3), s(5) = cos10 (to 6), s(7) = cos45 (to 2): all four dropped
    # -> R = [2, 3, 6, 1]; m = 0 -> keep [1, 2, 3, 6]
    assert select_vispruner(GOLDEN_C, GOLDEN_X, 4, 0.0).tolist() == [[1, 2, 3, 6]]


def test_equal_similarities_drop_the_lower_token_index_first():
    # r = 0, T = 1, N = 3: R = [0, 1, 2] (c descending); m = 2; A = [0, 2], B = [1]; features of 0 and 2 are the
    # same, so s ties: token 0 ranks first and is dropped with 2 (m = 2 drops both) -> keep [1].
    c = torch.tensor([[0.3, 0.2, 0.1]])
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    assert select_vispruner(c, x, 1, 0.0).tolist() == [[1]]
    # T = 2: m = 1 drops only the first of the tie, token 0 -> keep [1, 2]
    assert select_vispruner(c, x, 2, 0.0).tolist() == [[1, 2]]


def _official(c, x, budget, ratio):
    """The official tensor code's steps for one row, written from the specification (even |R|, m <= |R| / 2), with
    plain Python sorting instead of the tie-broken tensor sorts."""
    important = int(budget * ratio)
    order = c.argsort(descending=True)
    keep, rest = order[:important], order[important:]
    unit = x / x.norm(dim=-1, keepdim=True)
    diverse = budget - important
    m = min(8, rest.shape[0] - diverse)
    while m > 0:
        a, b = rest[::2], rest[1::2]
        s = (unit[a] @ unit[b].T).max(dim=-1).values
        # s descending; equal s (they do occur: seed 20) by the lower token index, the harness's tie rule
        order = sorted(range(a.shape[0]), key=lambda i: (-s[i].item(), a[i].item()))
        rest = torch.cat([a[order][m:], b])
        m = min(8, rest.shape[0] - diverse)
    return torch.cat([keep, rest]).sort().values


@pytest.mark.parametrize("budget, ratio", [(32, 0.5), (16, 0.75), (48, 0.5), (20, 0.5)])
def test_equals_the_official_rounds_on_a_576_grid(budget, ratio):
    generator = torch.Generator().manual_seed(budget)
    c = torch.rand(2, 576, generator=generator)
    x = torch.randn(2, 576, 16, generator=generator)
    kept = select_vispruner(c, x, budget, ratio)
    for b in range(2):
        assert torch.equal(kept[b], _official(c[b], x[b], budget, ratio))


cases = st.integers(1, 3).flatmap(lambda b: st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.integers(0, 6), min_size=n, max_size=n), min_size=b, max_size=b),
    st.lists(st.lists(st.lists(st.integers(-3, 3), min_size=2, max_size=2), min_size=n, max_size=n),
             min_size=b, max_size=b),
    st.integers(1, n), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))))


@settings(max_examples=60, deadline=None)
@given(cases)
def test_selection_properties(case):
    scores, feats, budget, ratio = case
    c = torch.tensor(scores, dtype=torch.float32)
    x = torch.tensor(feats, dtype=torch.float32)
    x[x.norm(dim=-1) == 0] = 1.0
    kept = select_vispruner(c, x, budget, ratio)
    n = c.shape[1]
    assert kept.shape == (c.shape[0], budget) and kept.dtype == torch.int64
    assert ((kept >= 0) & (kept < n)).all() and (kept[:, 1:] > kept[:, :-1]).all()
    assert torch.equal(kept, select_vispruner(c.clone(), x.clone(), budget, ratio))
    important = select_fastervlm(c, int(budget * ratio)) if int(budget * ratio) else None
    for b in range(c.shape[0]):
        assert torch.equal(kept[b], select_vispruner(c[b : b + 1], x[b : b + 1], budget, ratio)[0])
        if important is not None:  # the important tokens are always kept
            assert set(important[b].tolist()) <= set(kept[b].tolist())


@pytest.mark.parametrize("c, x, budget, ratio, match", [
    (torch.tensor([[0.1, float("nan")]]), torch.ones(1, 2, 2), 1, 0.5, "non-finite"),
    (torch.tensor([[0.1, 0.2]]), torch.tensor([[[1.0, float("inf")], [1.0, 1.0]]]), 1, 0.5, "non-finite"),
    (torch.tensor([[0.1, 0.2]]), torch.ones(1, 3, 2), 1, 0.5, "do not match"),
    (torch.tensor([[0.1, 0.2]]), torch.ones(1, 2, 2), 3, 0.5, "budget"),
    (torch.tensor([[0.1, 0.2]]), torch.ones(1, 2, 2), 1, 1.5, "important_ratio"),
    (torch.tensor([[0.1, 0.2]]), torch.zeros(1, 2, 2), 1, 0.5, "all-zero"),
])
def test_malformed_input_is_rejected(c, x, budget, ratio, match):
    with pytest.raises(ValueError, match=match):
        select_vispruner(c, x, budget, ratio)


def test_config_options_and_registry():
    cfg = OmegaConf.load(REPO / "configs" / "method" / "vispruner.yaml")
    assert cfg.name == "vispruner" and "implemented" not in cfg and "stage" not in cfg
    method = hiprune.build_method("vispruner", budget=64, **cfg.options)
    assert isinstance(method, VisPruner) and (method.important_ratio, method.attention) == (0.5, "cls")
    assert {k: (r.kind, r.layer, r.queries) for k, r in method.requests().items()} == {
        "importance": ("attention", "feature", "cls"), "hidden": ("hidden", "feature", "all")}
    assert hiprune.build_method("vispruner", budget=8, attention="global").requests()["importance"].queries == "all"
    for bad, match in (({"attention": "last"}, "attention"), ({"important_ratio": -0.1}, "important_ratio")):
        with pytest.raises(ValueError, match=match):
            hiprune.build_method("vispruner", budget=8, **bad)


def _check(calls):
    for call in calls:
        expected = select_vispruner(call.tokens.scores["importance"], call.tokens.states["hidden"], call.budget)
        assert torch.equal(call.selection.indices, expected)


def test_llava():
    _check(run_llava(hiprune.build_method("vispruner", budget=48)))


def test_llava_next_per_crop():
    calls = run_llava_next(hiprune.build_method("vispruner", budget=160))
    assert [c.budget for c in calls] == [32]
    _check(calls)


def test_video_llava_per_frame():
    calls = run_video(hiprune.build_method("vispruner", budget=64))
    assert calls[0].budget == 16
    _check(calls)


def test_global_attention_is_the_qwen_models_default():
    from eval.config import compose_config

    for model, attention in (("qwen25vl_3b", "global"), ("qwen25vl_7b", "global"), ("qwen25vl_32b", "global"),
                             ("tiny_qwen25vl", "global"), ("llava15_7b", "cls"), ("llava_next_7b", "cls")):
        cfg = compose_config([f"model={model}", "method=vispruner"])
        assert cfg.method.options.attention == attention, model


def test_qwen_needs_global_attention():
    refused_before_patching("qwen2_5_vl", hiprune.build_method("vispruner", budget=0.334), "has none")
    calls = run_qwen(hiprune.build_method("vispruner", budget=0.334, attention="global"))
    assert [c.budget for c in calls] == [8, 5]
    assert all(c.tokens.states["hidden"].shape[:2] == c.tokens.features.shape[:2] for c in calls)
    _check(calls)
