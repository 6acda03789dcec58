"""HiPrune++: hand-computed additions, both count readings, both modes, exact totals, -inf exclusion."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hiprune.methods.base import VisionTokens
from hiprune.methods.hiprune import select_hiprune
from hiprune.methods.hiprune_pp import HiPrunePP, select_by_prompt, text_token_count


def test_text_token_count_both_readings():
    # prose: round(0.1 * N'): 192 -> 19.2 -> 19, 128 -> 12.8 -> 13, 64 -> 6.4 -> 6
    assert [text_token_count(b, 0.1, "prose") for b in (192, 128, 64)] == [19, 13, 6]
    # pseudocode: round(0.1 * N' / 5): 3.84 -> 4, 2.56 -> 3, 1.28 -> 1; 25 -> 0.5 -> 0 (half to even)
    assert [text_token_count(b, 0.1, "pseudocode") for b in (192, 128, 64, 25)] == [4, 3, 1, 0]


def test_select_by_prompt_hand_computed():
    # 4 tokens in 2-D: cosines with prompt (1, 0) are 1, 0, -1, 0.6 (token 3 = (0.6, 0.8)).
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.6, 0.8]]])
    prompt = torch.tensor([[1.0, 0.0]])
    chosen = torch.tensor([[True, False, False, False]])  # token 0 (cos 1) already kept by HiPrune
    assert select_by_prompt(tokens, prompt, chosen, 2).tolist() == [[3, 1]]  # 0.6, then 0.0


def test_chosen_tokens_are_excluded_with_minus_infinity_not_minus_one():
    # "cos - 1" exclusion would rank the chosen token 0 (1 - 1 = 0) above token 2 (cos -0.5): wrong.
    tokens = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [-0.5, math.sqrt(0.75)]]])
    prompt = torch.tensor([[1.0, 0.0]])
    chosen = torch.tensor([[True, False, False]])
    assert select_by_prompt(tokens, prompt, chosen, 1).tolist() == [[2]]


def _tokens(n_side=6, dim=4, seed=0, prompt_like=None):
    g = torch.Generator().manual_seed(seed)
    n = n_side * n_side
    embeds = torch.randn(1, n, dim, generator=g)
    prompt = embeds[:, prompt_like] if prompt_like is not None else torch.randn(1, dim, generator=g)
    return VisionTokens(
        features=torch.randn(1, n, 8, generator=g),
        grid=(n_side, n_side),
        scores={"object": torch.rand(1, n, generator=g), "deep": torch.rand(1, n, generator=g)},
        prompt_embeds=prompt,
        token_embeds=embeds,
    )


@pytest.mark.parametrize("mode,count,budget,total,text", [
    ("within_budget", "prose", 20, 20, 2),      # t = round(2.0) = 2; HiPrune picks 18
    ("additive", "prose", 20, 22, 2),           # HiPrune picks 20, total 22
    ("within_budget", "pseudocode", 30, 30, 1),  # t = round(0.6) = 1
    ("additive", "pseudocode", 30, 31, 1),
])
def test_modes_and_counts_give_exact_totals_without_duplicates(mode, count, budget, total, text):
    method = HiPrunePP(budget=budget, alpha=0.25, object_layer=1, count=count, mode=mode)
    method.validate()
    assert method.kept_count(budget) == total
    tokens = _tokens()
    selection = method.select(tokens, budget)
    indices = selection.indices[0].tolist()
    assert len(indices) == total == len(set(indices)) and indices == sorted(indices)
    assert int(selection.roles["text"].sum()) == text
    base = budget - text if mode == "within_budget" else budget
    hiprune_part = select_hiprune(tokens.scores["object"], tokens.scores["deep"], (6, 6), base, alpha=0.25)[0].tolist()
    assert set(hiprune_part) <= set(indices)  # HiPrune's own set (anchors from the reduced budget) is kept
    text_part = selection.indices[selection.roles["text"]].tolist()
    assert not set(text_part) & set(hiprune_part)
    assert torch.equal(selection.features[0], tokens.features[0, selection.indices[0]])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 35), st.integers(1, 1000))
def test_a_prompt_equal_to_a_token_keeps_that_token(target, seed):
    tokens = _tokens(seed=seed, prompt_like=target)
    selection = HiPrunePP(budget=12, alpha=0.0, beta=0.1, object_layer=1).select(tokens, 12)
    assert target in selection.indices[0].tolist()


def test_validation():
    with pytest.raises(ValueError, match="mode"):
        HiPrunePP(budget=64, mode="extra").validate()
    with pytest.raises(ValueError, match="count"):
        HiPrunePP(budget=64, count="half").validate()
    with pytest.raises(ValueError, match="beta"):
        HiPrunePP(budget=64, beta=1.5).validate()
    with pytest.raises(ValueError, match="no HiPrune tokens"):
        HiPrunePP(budget=1, beta=1.0).validate()
    with pytest.raises(ValueError, match="prompt_embeds"):
        HiPrunePP(budget=12, alpha=0.0).select(VisionTokens(torch.zeros(1, 36, 2), (6, 6), scores={}), 12)
