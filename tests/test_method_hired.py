"""HiRED: the spec's golden split (strip and spatial, official floor and the harness's filled remainder),
properties of the split, the pipeline hook that lets a method split an image's budget over its grids
(Method.split_visual), and runs on every family (LLaVA-1.5 = FasterVLM; Qwen2.5-VL refused)."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from vision_method_runs import (
    REPO,
    family_model,
    refused_before_patching,
    run_llava,
    run_llava_next,
    run_video,
)

import hiprune
from hiprune.adapters.base import PruningError
from hiprune.methods.fastervlm import select_fastervlm
from hiprune.methods.hired import HiRED, hired_crop_budgets


def _golden_early():
    # S = the 8 highest: {0, 1, 2, 3, 4, 5, 8, 12} on a 4 x 4 base grid (N = 16)
    early = torch.full((16,), 0.01)
    for rank, p in enumerate([0, 1, 2, 3, 4, 5, 8, 12]):
        early[p] = 1.0 - 0.05 * rank
    return early


@pytest.mark.parametrize("partition, fill, expected", [
    ("strip", False, [10, 5, 2, 1, 1]),    # spec: strip counts [4, 2, 1, 1] -> [5, 2, 1, 1] (total 19)
    ("spatial", False, [10, 5, 2, 2, 0]),  # spec: quadrant counts [4, 2, 2, 0] -> [5, 2, 2, 0]
    ("strip", True, [10, 5, 3, 1, 1]),     # remainder 1 -> largest fraction: 10 * 2 / 8 = 2.5
    ("spatial", True, [10, 5, 3, 2, 0]),   # fractions .5 and .5 tie -> the lower cell
])
def test_golden_split_from_the_specification(partition, fill, expected):
    # baselines.md §5: N = 16 per crop, 2 x 2 tiling, beta = 0.25 -> B = floor(5 * 16 * 0.25) = 20, alpha = 0.5:
    # B0 = 10, Bs = 10
    assert hired_crop_budgets(_golden_early(), (4, 4), (2, 2), 20, 0.5, partition, fill) == expected


def test_ties_in_the_early_attention_go_to_the_lower_index():
    early = torch.zeros(16)  # every patch ties: S = patches 0..7 = the first two strips -> [4, 4, 0, 0]
    assert hired_crop_budgets(early, (4, 4), (2, 2), 20, 0.5, "strip", False) == [10, 5, 5, 0, 0]


cases = st.tuples(
    st.sampled_from([((4, 4), (2, 2)), ((4, 4), (1, 2)), ((6, 6), (2, 1)), ((4, 6), (2, 2))]),
    st.integers(0, 2**31 - 1), st.floats(0.0, 0.95), st.sampled_from(["strip", "spatial"]), st.data())


@settings(max_examples=60, deadline=None)
@given(cases)
def test_split_properties(case):
    (grid, tiling), seed, alpha, partition, data = case
    n = grid[0] * grid[1]
    cells = tiling[0] * tiling[1]
    budget = data.draw(st.integers(1, (1 + cells) * n))
    early = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    try:
        floored = hired_crop_budgets(early, grid, tiling, budget, alpha, partition, False)
    except ValueError as error:  # alpha so close to 1 that no base patch is left to split by
        assert "leaves no base patch" in str(error) and int(n * (1 - alpha)) == 0
        return
    assert len(floored) == 1 + cells and all(0 <= b <= n for b in floored) and sum(floored) <= budget
    assert floored[0] == min(int(alpha * budget), n)
    try:
        filled = hired_crop_budgets(early, grid, tiling, budget, alpha, partition, True)
    except ValueError as error:  # the caps leave the rule short of B (a small alpha)
        assert "use a larger alpha" in str(error)
        assert floored[0] + cells * n < budget
        return
    assert sum(filled) == budget and all(0 <= b <= n for b in filled)
    assert filled[0] == floored[0] and all(f >= g for f, g in zip(filled, floored))
    assert filled == hired_crop_budgets(early.clone(), grid, tiling, budget, alpha, partition, True)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(15), (4, 4), (2, 2), 20), r"\[N=16\]"),
    ((torch.tensor([float("nan")] * 16), (4, 4), (2, 2), 20), "non-finite"),
    ((torch.zeros(16), (4, 4), (2, 2), 81), "budget"),
    ((torch.zeros(16), (4, 4), (2, 2), 0), "budget"),
    ((torch.zeros(16), (4, 4), (3, 1), 20), "divisible"),
    ((torch.zeros(16), (4, 4), (2, 2), 20, 1.0), "alpha"),
    ((torch.zeros(16), (4, 4), (2, 2), 20, 0.5, "quadrant"), "partition"),
    ((torch.zeros(16), (4, 4), (2, 2), 80, 0.1), "use a larger alpha"),  # B0 = 8, sub-crops capped at 64 of 72
])
def test_malformed_input_is_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        hired_crop_budgets(*args)


def test_config_and_registry():
    cfg = OmegaConf.load(REPO / "configs" / "method" / "hired.yaml")
    assert cfg.name == "hired" and "implemented" not in cfg and "stage" not in cfg
    method = hiprune.build_method("hired", budget=640, **cfg.options)
    assert isinstance(method, HiRED) and (method.alpha, method.early_layer, method.partition) == (0.5, 1, "strip")
    assert {k: (r.kind, r.layer, r.queries) for k, r in method.requests().items()} == {
        "early": ("attention", 1, "cls"), "late": ("attention", "feature", "cls")}
    for bad, match in (({"alpha": 1.0}, "alpha"), ({"partition": "x"}, "partition"), ({"early_layer": 0}, "early")):
        with pytest.raises(ValueError, match=match):
            hiprune.build_method("hired", budget=64, **bad)


def test_llava_is_fastervlm():
    calls = run_llava(hiprune.build_method("hired", budget=48))
    for call in calls:
        assert torch.equal(call.selection.indices, select_fastervlm(call.tokens.scores["late"], 48))


@pytest.mark.parametrize("partition", ["strip", "spatial"])
def test_llava_next_splits_the_image_budget_by_the_base_crop(partition):
    calls = run_llava_next(hiprune.build_method("hired", budget=160, partition=partition))
    rows = [(c, r) for c in calls for r in range(c.tokens.batch_size)]
    # the base crop keeps floor(0.5 * 160) = 80; its early attention decides the sub-crops' budgets
    [(base, row)] = [(c, r) for c, r in rows if c.budget == 80]
    split = hired_crop_budgets(base.tokens.scores["early"][row], base.tokens.grid, (2, 2), 160, 0.5, partition)
    assert split[0] == 80 and sum(split) == 160
    assert sorted(c.budget for c, _ in rows) == sorted(b for b in split if b)  # the crops kept what the split says
    for call in calls:
        assert torch.equal(call.selection.indices, select_fastervlm(call.tokens.scores["late"], call.budget))


def test_video_llava_frames_keep_the_family_split():
    calls = run_video(hiprune.build_method("hired", budget=64))
    assert [c.budget for c in calls] == [16]
    assert torch.equal(calls[0].selection.indices, select_fastervlm(calls[0].tokens.scores["late"], 16))


def test_refusals_before_patching():
    refused_before_patching("qwen2_5_vl", hiprune.build_method("hired", budget=0.25), "has none")
    model, processor = family_model("llava_next")
    hired = hiprune.build_method("hired", budget=160)
    with pytest.raises(ValueError, match="official 'spatial' layout only"), \
            hiprune.apply(model, hired, processor, layout="native"):
        pass
    assert "get_image_features" not in vars(model.model)


# --- the pipeline hook: Method.split_visual ------------------------------------------------------------------------
@dataclass
class FixedSplit(HiRED):
    """HiRED's per-crop rule with a given split (one crop left without tokens)."""

    name: ClassVar[str] = "fixed_split_test"
    split: tuple = (80, 0, 40, 20, 20)

    def split_visual(self, grids, budget, tiles):
        assert tiles == [None, (0, 0), (0, 1), (1, 0), (1, 1)] and budget == 160 and len(grids) == 5
        assert all(g.batch_size == 1 and set(g.scores) == {"early", "late"} for g in grids)
        return list(self.split)


def test_a_grid_may_pass_nothing_on():
    calls = run_llava_next(FixedSplit(budget=160))
    assert sorted(c.budget for c in calls) == [20, 40, 80]  # crops 3 and 4 share one call; crop 1 has none


@pytest.mark.parametrize("split", [(80, 0, 40, 20, 10), (80, 0, 40, 20, 20, 0), (700, -580, 20, 10, 10)])
def test_a_bad_split_fails_loudly(split):
    with pytest.raises(PruningError, match="split visual 0's budget 160"):
        run_llava_next(FixedSplit(budget=160, split=split))
