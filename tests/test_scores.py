import math

import pytest
import torch

from hiprune.scores import check_finite, global_attention


def _hand_attention() -> torch.Tensor:
    # B=1, H=2, T=3 (token 0 = CLS). Rows are queries and sum to 1.
    head0 = [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.4, 0.2, 0.4]]
    head1 = [[0.2, 0.4, 0.4], [0.0, 0.8, 0.2], [0.2, 0.2, 0.6]]
    return torch.tensor([[head0, head1]])


def test_global_attention_hand_computed_with_and_without_cls():
    # Mean over heads:      [[0.4, 0.3, 0.3], [0.1, 0.7, 0.2], [0.3, 0.2, 0.5]]
    # Mean over the 3 query rows (CLS row included), per key column:
    #   key 0: (0.4 + 0.1 + 0.3) / 3 = 0.8 / 3
    #   key 1: (0.3 + 0.7 + 0.2) / 3 = 1.2 / 3 = 0.4
    #   key 2: (0.3 + 0.2 + 0.5) / 3 = 1.0 / 3
    attn = _hand_attention()
    full = global_attention(attn, skip_cls=False)
    assert full.shape == (1, 3)
    torch.testing.assert_close(full, torch.tensor([[0.8 / 3, 0.4, 1.0 / 3]]))
    # skip_cls drops key 0 only after averaging, so the CLS query row still counts.
    patches = global_attention(attn, skip_cls=True)
    assert patches.shape == (1, 2)
    torch.testing.assert_close(patches, torch.tensor([[0.4, 1.0 / 3]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_global_attention_returns_float32(dtype):
    out = global_attention(_hand_attention().to(dtype), skip_cls=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.4, 1.0 / 3]]), atol=1e-2, rtol=0)


def test_global_attention_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    batch, heads, tokens = 3, 4, 7
    attn = torch.rand(batch, heads, tokens, tokens, generator=g, dtype=torch.float64).softmax(dim=-1)
    expected = torch.zeros(batch, tokens, dtype=torch.float64)
    for b in range(batch):
        for key in range(tokens):
            total = 0.0
            for h in range(heads):
                for q in range(tokens):
                    total += float(attn[b, h, q, key])
            expected[b, key] = total / (heads * tokens)
    torch.testing.assert_close(global_attention(attn, skip_cls=False), expected.float())
    torch.testing.assert_close(global_attention(attn, skip_cls=True), expected[:, 1:].float())


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 3), "3-D"),
        ((1, 2, 3, 3, 1), "5-D"),
        ((1, 2, 3, 4), "square"),
        ((1, 0, 3, 3), "no heads"),
    ],
)
def test_global_attention_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        global_attention(torch.zeros(shape), skip_cls=False)


def test_global_attention_skip_cls_needs_a_patch_token():
    with pytest.raises(ValueError, match="CLS"):
        global_attention(torch.ones(1, 1, 1, 1), skip_cls=True)
    assert global_attention(torch.ones(1, 1, 1, 1), skip_cls=False).shape == (1, 1)


def test_check_finite_passes_finite_scores_through():
    scores = torch.tensor([[0.0, -1.0, 3.5]])
    assert check_finite(scores, "object scores") is scores


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_culprit(bad):
    scores = torch.tensor([[0.1, bad, 0.2], [bad, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"layer 9 scores contains 2 non-finite"):
        check_finite(scores, "layer 9 scores")
