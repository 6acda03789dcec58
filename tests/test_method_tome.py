"""ToMe (hiprune/methods/tome.py): the specification's golden merge, the exact schedule, properties, and the
encoder-stage pipeline on the tiny models."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hiprune
from hiprune.adapters.base import EncoderMerging
from hiprune.methods.tome import ToMe, exact_schedule, tome_slots


def test_golden_merge_from_the_specification():
    # keys CLS (1,0), x1 (0,1), x2 (0.6,0.8), x3 (1,0), x4 (0.6,-0.8); r = 1. A = [CLS, x2, x4], B = [x1, x3];
    # s(x2) = 0.8 -> x1, s(x4) = 0.6 -> x3: x2 merges into x1. Output [CLS, x4, x1' = (2 + 6) / 2, x3].
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.6, -0.8]]])
    slots = tome_slots(keys, merges=1)
    assert slots.tolist() == [[0, 2, 2, 3, 1]]
    merging = EncoderMerging(ToMe(budget=3), num_patches=4, layers=1, protected=1)
    merging.expect(3)
    hidden = torch.tensor([[[0.0], [2.0], [6.0], [3.0], [5.0]]])
    out = merging.step(1, hidden, keys)
    assert out.tolist() == [[[0.0], [5.0], [4.0], [3.0]]] and merging.sizes.tolist() == [[1.0, 1.0, 2.0, 1.0]]
    (result,) = merging.finish()
    assert result.sources.tolist() == [1, 1, 2, 0]  # patch slots (CLS excluded): x1, x2 -> x1', x3, x4 first
    assert result.indices.tolist() == [3, 0, 2]


def test_sizes_weight_later_merges():
    # Layer 1 merges x2 into x1 (size 2, value 4); layer 2 merges x3 into that token: (2 * 4 + 1 * 10) / 3 = 6,
    # where a plain mean would give 7.
    merging = EncoderMerging(ToMe(budget=2, schedule="constant", r=1), num_patches=4, layers=2, protected=1)
    merging.expect(2)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.6, -0.8]]])
    out = merging.step(1, torch.tensor([[[0.0], [2.0], [6.0], [10.0], [5.0]]]), keys)
    assert out.tolist() == [[[0.0], [5.0], [4.0], [10.0]]]
    # now [CLS, x4, x1', x3]: A = [CLS, x1'], B = [x4, x3]; x1' is most similar to x3 and merges into it
    out = merging.step(2, out, torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.0]]]))
    assert out.tolist() == [[[0.0], [5.0], [6.0]]] and merging.sizes.tolist() == [[1.0, 1.0, 3.0]]


def test_exact_schedule_spreads_the_merges():
    assert exact_schedule(576, 192, 23) == [17] * 16 + [16] * 7
    assert sum(exact_schedule(576, 64, 23)) == 512
    assert ToMe(budget=192).merge_schedule(576, 192, 23) == [17] * 16 + [16] * 7
    constant = ToMe(budget=208, schedule="constant", r=16)
    assert constant.merge_schedule(576, 208, 23) == [16] * 23
    with pytest.raises(ValueError, match="use budget=208 with r=16"):
        ToMe(budget=192, schedule="constant", r=16).merge_schedule(576, 192, 23)
    with pytest.raises(ValueError, match="too small for bipartite merging"):
        ToMe(budget=1).merge_schedule(16, 1, 2)


@pytest.mark.parametrize("options, match", [
    ({"schedule": "fast"}, "unknown ToMe schedule"),
    ({"schedule": "constant"}, "needs r"),
    ({"r": 4}, "'constant' only"),
    ({"proportional_attention": "yes"}, "true or false"),
])
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        hiprune.build_method("tome", budget=64, **options)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(3, 40), st.data())
def test_slots_are_a_valid_merge(batch, length, data):
    merges = data.draw(st.integers(0, (length + 1) // 2 - 1))
    keys = torch.randn(batch, length, 4, generator=torch.Generator().manual_seed(length * 7 + merges))
    slots = tome_slots(keys, merges)
    assert slots.shape == (batch, length)
    for row in slots:
        assert row[0] == 0  # CLS stays first
        assert sorted(set(row.tolist())) == list(range(length - merges))  # every slot used, exactly T - r
    singles = torch.cat([tome_slots(keys[i : i + 1], merges) for i in range(batch)])
    assert torch.equal(slots, singles)  # rows are independent
    with pytest.raises(ValueError, match="can merge"):
        tome_slots(keys, (length + 1) // 2)


def test_non_finite_keys_are_rejected():
    keys = torch.zeros(1, 5, 2)
    keys[0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tome_slots(keys, 1)
