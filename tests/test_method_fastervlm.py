"""FasterVLM: the spec's golden case, properties of the selection, and runs through hiprune.apply on every family
(Qwen2.5-VL has no CLS token: refused before patching)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from vision_method_runs import REPO, refused_before_patching, run_llava, run_llava_next, run_video

import hiprune
from hiprune.methods.fastervlm import FasterVLM, select_fastervlm


def test_golden_from_the_specification():
    # baselines.md §1: c = [0.1, 0.4, 0.2, 0.3], N' = 2 -> keep [1, 3]
    assert select_fastervlm(torch.tensor([[0.1, 0.4, 0.2, 0.3]]), 2).tolist() == [[1, 3]]


def test_ties_go_to_the_lower_index():
    assert select_fastervlm(torch.tensor([[0.2, 0.5, 0.2, 0.2, 0.5]]), 3).tolist() == [[0, 1, 4]]


def test_half_precision_ranks_like_float32():
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    assert torch.equal(select_fastervlm(scores.half(), 2), select_fastervlm(scores, 2))


scores_strategy = st.integers(1, 4).flatmap(lambda b: st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=n, max_size=n), min_size=b, max_size=b),
    st.integers(1, n))))


@settings(max_examples=60, deadline=None)
@given(scores_strategy)
def test_selection_properties(case):
    rows, budget = case
    scores = torch.tensor(rows)
    kept = select_fastervlm(scores, budget)
    n = scores.shape[1]
    assert kept.shape == (scores.shape[0], budget) and kept.dtype == torch.int64
    assert ((kept >= 0) & (kept < n)).all() and (kept[:, 1:] > kept[:, :-1]).all()  # in range, sorted, distinct
    assert torch.equal(kept, select_fastervlm(scores.clone(), budget))  # deterministic
    for b in range(scores.shape[0]):  # batch invariance
        assert torch.equal(kept[b], select_fastervlm(scores[b : b + 1], budget)[0])
        # every kept score >= every dropped one; among equal scores the lower index is kept
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[kept[b]] = False
        if dropped.any():
            worst_kept = scores[b][kept[b]].min()
            assert (scores[b][dropped] <= worst_kept).all()
            tied = dropped & (scores[b] == worst_kept)
            assert not tied.any() or tied.nonzero().min() > kept[b][scores[b][kept[b]] == worst_kept].max()


@pytest.mark.parametrize("bad, budget, match", [
    (torch.tensor([[0.1, float("nan")]]), 1, "non-finite"),
    (torch.tensor([[0.1, float("inf")]]), 1, "non-finite"),
    (torch.tensor([0.1, 0.2]), 1, r"\[B, N\]"),
    (torch.tensor([[0.1, 0.2]]), 3, r"budget must be an int in \[1, 2\]"),
    (torch.tensor([[0.1, 0.2]]), 0, "budget"),
    (torch.tensor([[0.1, 0.2]]), True, "budget"),
    (torch.tensor([[1, 2]]), 1, "floating-point"),
])
def test_malformed_input_is_rejected(bad, budget, match):
    with pytest.raises(ValueError, match=match):
        select_fastervlm(bad, budget)


def test_config_and_registry():
    cfg = OmegaConf.load(REPO / "configs" / "method" / "fastervlm.yaml")
    assert cfg.name == "fastervlm" and "implemented" not in cfg and "stage" not in cfg
    method = hiprune.build_method("fastervlm", budget=64, **cfg.options)
    assert isinstance(method, FasterVLM) and method.stage == "vision"
    assert {name: (r.kind, r.layer, r.queries) for name, r in method.requests().items()} == {
        "cls": ("attention", "feature", "cls")}


def _check(calls):
    for call in calls:
        assert torch.equal(call.selection.indices, select_fastervlm(call.tokens.scores["cls"], call.budget))
        assert call.selection.sources is None


def test_llava():
    _check(run_llava(hiprune.build_method("fastervlm", budget=48)))


def test_llava_next_per_crop():
    calls = run_llava_next(hiprune.build_method("fastervlm", budget=160))
    assert [c.budget for c in calls] == [32]  # int(160 / 5) per crop, one select call for the 5 crops
    _check(calls)


def test_video_llava_per_frame():
    calls = run_video(hiprune.build_method("fastervlm", budget=64))
    assert calls[0].budget == 16  # int(64 / 4 frames)
    _check(calls)


def test_qwen_is_refused_before_patching():
    refused_before_patching("qwen2_5_vl", hiprune.build_method("fastervlm", budget=0.25),
                            "the qwen2_5_vl encoder has none .use a method that scores by global attention instead")
