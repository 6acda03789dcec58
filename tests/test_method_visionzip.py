"""VisionZip's selection rule (hiprune/methods/visionzip.py): the spec's golden cases, the budget splits and
properties. The method itself is not registered yet (pipeline extensions pending)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hiprune
from hiprune.methods.visionzip import official_split, qwen_split, select_visionzip, visionzip_groups

# baselines.md §2 Golden A: CLS + 6 patches, d = 3 (CLS + 2 patches), C = 2
C = torch.tensor([[0.05, 0.30, 0.10, 0.20, 0.02, 0.08]])
K = torch.tensor([[[1.0, 0.0], [0.3, 0.3], [0.1, 1.0], [0.7, -0.2], [0.0, 1.0], [1.0, 0.2]]])  # k1, k3: unused
X = torch.tensor([[[1.0], [2.0], [4.0], [8.0], [10.0], [3.0]]])


def test_golden_a():
    # dominant {1, 3}; R = [0, 2, 4, 5], s = 2, targets {0, 4}; 2 -> 4, 5 -> 0: contextual [1 + 3, 10 + 4] = [4, 14]
    indices, contextual = select_visionzip(C, K, X, 2, 2)
    assert indices.tolist() == [[1, 3]] and contextual.flatten().tolist() == [4.0, 14.0]
    groups = visionzip_groups(C, K, X, 2, 2)
    assert groups.targets.tolist() == [[0, 4]] and groups.sources.tolist() == [[2, 0, 3, 1, 3, 2]]
    mean_group = visionzip_groups(C, K, X, 2, 2, merge="mean_group")
    assert mean_group.contextual.flatten().tolist() == [2.0, 7.0]  # (1 + 3) / 2, (10 + 4) / 2


def test_golden_b_a_target_without_others_is_unchanged():
    # two contextual tokens from R = [0, 2]: both are targets, no others
    _, contextual = select_visionzip(C, K, X, 4, 2)
    assert contextual.flatten().tolist() == [1.0, 10.0]


def test_golden_c_splits():
    assert qwen_split(0.334, 100) == (28, 5)
    assert qwen_split(0.112, 256) == (15, 12)  # total 27 (rho * n = 28.7)
    assert [official_split(b) for b in (192, 128, 64)] == [(162, 30), (108, 20), (54, 10)]
    assert official_split(32) == (27, 5)  # LLaVA-NeXT 160 tokens / 5 crops


def test_ties_go_to_the_lower_index_and_the_first_target():
    c = torch.zeros(1, 5)
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    x = torch.arange(5.0).view(1, 5, 1)
    groups = visionzip_groups(c, keys, x, 1, 2)  # dominant [0]; R = [1, 2, 3, 4], s = 2: targets 1, 3; all tie -> 1
    assert groups.dominant.tolist() == [[0]] and groups.targets.tolist() == [[1, 3]]
    assert groups.sources.tolist() == [[0, 1, 1, 2, 1]]


cases = st.integers(1, 3).flatmap(lambda b: st.integers(2, 20).flatmap(lambda n: st.tuples(
    st.just(b), st.just(n), st.integers(0, n - 1), st.integers(0, 2**31 - 1))))


@settings(max_examples=50, deadline=None)
@given(cases)
def test_properties(case):
    batch, n, dominant, seed = case
    g = torch.Generator().manual_seed(seed)
    contextual = 1 + seed % (n - dominant)
    c, keys, x = torch.rand(batch, n, generator=g), torch.randn(batch, n, 3, generator=g), torch.randn(batch, n, 4, generator=g)
    groups = visionzip_groups(c, keys, x, dominant, contextual)
    assert groups.dominant.shape == (batch, dominant) and groups.contextual.shape == (batch, contextual, 4)
    assert (groups.dominant[:, 1:] > groups.dominant[:, :-1]).all()
    assert ((groups.sources >= 0) & (groups.sources < dominant + contextual)).all()  # every patch goes somewhere
    for b in range(batch):
        one = visionzip_groups(c[b : b + 1], keys[b : b + 1], x[b : b + 1], dominant, contextual)
        assert torch.equal(one.sources[0], groups.sources[b]) and torch.equal(one.contextual[0], groups.contextual[b])
        # every slot has a member, and the targets sit in their own slots
        assert set(groups.sources[b].tolist()) == set(range(dominant + contextual))
        assert groups.sources[b][groups.targets[b]].tolist() == list(range(dominant, dominant + contextual))


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([[0.1, float("nan")]]), torch.ones(1, 2, 2), torch.ones(1, 2, 2), 0, 1), "non-finite"),
    ((torch.ones(1, 2), torch.ones(1, 2, 2), torch.full((1, 2, 2), float("inf")), 0, 1), "non-finite"),
    ((torch.ones(1, 2), torch.ones(1, 3, 2), torch.ones(1, 2, 2), 0, 1), "must match"),
    ((torch.ones(1, 2), torch.ones(1, 2, 2), torch.ones(1, 2, 2), 2, 1), "exceed"),
    ((torch.ones(1, 2), torch.ones(1, 2, 2), torch.ones(1, 2, 2), 0, 0), "contextual"),
])
def test_malformed_input_is_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        visionzip_groups(*args)


def test_not_registered_until_the_pipeline_can_pass_the_cls_token_on():
    assert "visionzip" not in hiprune.METHODS
