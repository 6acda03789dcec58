"""The two baselines: random pruning and no pruning."""

import pytest
import torch

from hiprune.methods.base import VisionTokens
from hiprune.methods.none import NoPrune
from hiprune.methods.random import RandomPrune, row_seed


def make_tokens(batch: int, grid=(24, 24), dim: int = 4, sample_ids=None) -> VisionTokens:
    n = grid[0] * grid[1]
    # Feature d of token i is i * 10 + d, so gathered features reveal their source index.
    features = (torch.arange(n).unsqueeze(-1) * 10 + torch.arange(dim)).float().expand(batch, n, dim).clone()
    return VisionTokens(features=features, grid=grid, sample_ids=sample_ids)


# ----------------------------------------------------------------------------------------------------------------
# RandomPrune


def test_random_keeps_budget_sorted_unique_tokens():
    tokens = make_tokens(3, sample_ids=[10, 11, 12])
    selection = RandomPrune(budget=64).select(tokens, 64)
    assert selection.indices.shape == (3, 64) and selection.indices.dtype == torch.int64
    assert (selection.indices[:, 1:] > selection.indices[:, :-1]).all()  # sorted, hence distinct
    assert ((selection.indices >= 0) & (selection.indices < 576)).all()
    # Features are the kept tokens' features.
    assert torch.equal(selection.features[..., 0], selection.indices.float() * 10)


def test_random_same_seed_and_ids_give_same_tokens():
    first = RandomPrune(budget=64, seed=3).select(make_tokens(2, sample_ids=[5, 6]), 64)
    second = RandomPrune(budget=64, seed=3).select(make_tokens(2, sample_ids=[5, 6]), 64)
    assert torch.equal(first.indices, second.indices)


def test_random_rows_do_not_depend_on_the_batch():
    method = RandomPrune(budget=32, seed=1)
    ids = [7, 3, 11]
    batch = method.select(make_tokens(3, sample_ids=ids), 32).indices
    for row, sample_id in enumerate(ids):
        alone = method.select(make_tokens(1, sample_ids=[sample_id]), 32).indices
        assert torch.equal(alone[0], batch[row])
    # Reordering the batch reorders the rows and nothing else.
    shuffled = method.select(make_tokens(3, sample_ids=[11, 7, 3]), 32).indices
    assert torch.equal(shuffled, batch[[2, 0, 1]])


def test_random_without_sample_ids_uses_row_index():
    method = RandomPrune(budget=16, seed=0)
    implicit = method.select(make_tokens(2), 16).indices
    explicit = method.select(make_tokens(2, sample_ids=[0, 1]), 16).indices
    assert torch.equal(implicit, explicit)


def test_random_different_seeds_or_ids_differ():
    tokens = make_tokens(2, sample_ids=[5, 6])
    seed0 = RandomPrune(budget=64, seed=0).select(tokens, 64).indices
    seed1 = RandomPrune(budget=64, seed=1).select(tokens, 64).indices
    assert not torch.equal(seed0[0], seed1[0])
    assert not torch.equal(seed0[1], seed1[1])
    assert not torch.equal(seed0[0], seed0[1])  # different samples, same seed


def test_row_seed_separates_pairs_that_a_sum_would_merge():
    assert row_seed(0, 1) != row_seed(1, 0)
    assert row_seed(2, 3) == row_seed(2, 3)
    assert 0 <= row_seed(123, 456) < 2**63


def test_random_is_roughly_uniform():
    # 3000 samples keep 3 of 10 tokens: each token is expected 900 times (std ~ 25); the draw is seeded, so
    # this is deterministic, and +-150 only catches a biased sampler.
    n_samples = 3000
    tokens = make_tokens(n_samples, grid=(2, 5), dim=1, sample_ids=list(range(n_samples)))
    indices = RandomPrune(budget=3).select(tokens, 3).indices
    counts = torch.bincount(indices.flatten(), minlength=10)
    assert (counts - 900).abs().max() <= 150, counts


def test_random_budget_equal_to_n_keeps_everything():
    indices = RandomPrune(budget=10).select(make_tokens(2, grid=(2, 5)), 10).indices
    assert torch.equal(indices, torch.arange(10).expand(2, 10))


@pytest.mark.parametrize("budget", [0, 11, 2.5, True])
def test_random_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match=r"budget must be an int in \[1, 10\]"):
        RandomPrune(budget=3).select(make_tokens(1, grid=(2, 5)), budget)


def test_random_rejects_wrong_number_of_sample_ids():
    with pytest.raises(ValueError, match="2 sample ids for a batch of 3"):
        RandomPrune(budget=3).select(make_tokens(3, grid=(2, 5), sample_ids=[1, 2]), 3)


def test_random_validate():
    RandomPrune(budget=64).validate()
    RandomPrune(budget=0.5, seed=9).validate()
    assert (RandomPrune.name, RandomPrune.stage) == ("random", "vision")
    with pytest.raises(ValueError, match="needs a budget"):
        RandomPrune().validate()
    with pytest.raises(ValueError, match="seed must be an int"):
        RandomPrune(budget=64, seed=1.5).validate()


# ----------------------------------------------------------------------------------------------------------------
# NoPrune


def test_none_keeps_everything():
    tokens = make_tokens(2, grid=(3, 4))
    selection = NoPrune().select(tokens)
    assert torch.equal(selection.indices, torch.arange(12).expand(2, 12))
    assert torch.equal(selection.features, tokens.features)
    assert torch.equal(NoPrune().select(tokens, 12).indices, selection.indices)


def test_none_validate_and_budget():
    NoPrune().validate()
    assert (NoPrune.name, NoPrune.stage) == ("none", "none")
    assert NoPrune().describe() == {"name": "none", "budget": None}
    with pytest.raises(ValueError, match="takes no budget"):
        NoPrune(budget=64).validate()
    with pytest.raises(ValueError, match="cannot honour a budget of 5"):
        NoPrune().select(make_tokens(1, grid=(3, 4)), 5)
