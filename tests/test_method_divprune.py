"""DivPrune: the spec's golden cases, properties of the selection, and runs through hiprune.apply on every family."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import shape_image
from omegaconf import OmegaConf
from vision_method_runs import REPO, family_model, run_llava, run_llava_next, run_qwen, run_video

import hiprune
from hiprune.methods.base import VisionTokens
from hiprune.methods.divprune import DivPrune, select_divprune


def _angles(*degrees):
    return torch.tensor([[[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees]])


def test_golden_a_from_the_specification():
    # baselines.md §3 Golden A: 0, 10, 90, 180 degrees. NN distances: 0.0152, 0.0152, 0.826, 1.0 -> first pick 3,
    # then 0 (distance 2 to token 3), then 2 (distance 1 to both) -> k=3: [0, 2, 3]; k=2: [0, 3]
    features = _angles(0, 10, 90, 180)
    assert select_divprune(features, 3).tolist() == [[0, 2, 3]]
    assert select_divprune(features, 2).tolist() == [[0, 3]]
    assert select_divprune(features, 1).tolist() == [[3]]


def test_golden_b_ties_go_to_the_first_maximal_index():
    # baselines.md §3 Golden B: (1,0), (0,1), (-1,0), (0,-1): picks 0, 2, 1 -> [0, 1, 2]
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
    assert select_divprune(features, 3).tolist() == [[0, 1, 2]]


def test_scale_does_not_matter_and_duplicates_are_not_picked_twice():
    features = _angles(0, 10, 90, 180) * torch.tensor([[[3.0], [0.5], [7.0], [2.0]]])
    assert select_divprune(features, 3).tolist() == [[0, 2, 3]]
    same = torch.ones(1, 5, 3)  # every distance 0: the official code would pick token 0 again; here 0, 1, 2
    assert select_divprune(same, 3).tolist() == [[0, 1, 2]]


features_strategy = st.integers(1, 3).flatmap(lambda b: st.integers(1, 24).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.lists(st.integers(-5, 5), min_size=3, max_size=3), min_size=n, max_size=n),
             min_size=b, max_size=b),
    st.integers(1, n))))


@settings(max_examples=50, deadline=None)
@given(features_strategy)
def test_selection_properties(case):
    rows, budget = case
    features = torch.tensor(rows, dtype=torch.float32)
    features[features.norm(dim=-1) == 0] = 1.0  # no all-zero token (rejected, tested below)
    kept = select_divprune(features, budget)
    n = features.shape[1]
    assert kept.shape == (features.shape[0], budget) and kept.dtype == torch.int64
    assert ((kept >= 0) & (kept < n)).all() and (kept[:, 1:] > kept[:, :-1]).all()
    assert torch.equal(kept, select_divprune(features.clone(), budget))
    for b in range(features.shape[0]):
        assert torch.equal(kept[b], select_divprune(features[b : b + 1], budget)[0])


@pytest.mark.parametrize("bad, budget, match", [
    (torch.tensor([[[1.0, float("nan")], [0.0, 1.0]]]), 1, "non-finite"),
    (torch.tensor([[[1.0, float("inf")], [0.0, 1.0]]]), 1, "non-finite"),
    (torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]), 1, "all-zero"),
    (torch.ones(2, 3), 1, r"\[B, N, D\]"),
    (torch.ones(1, 2, 3), 3, r"budget must be an int in \[1, 2\]"),
    (torch.ones(1, 2, 3), 0.5, "budget"),
    (torch.ones(1, 2, 3, dtype=torch.long), 1, "floating-point"),
])
def test_malformed_input_is_rejected(bad, budget, match):
    with pytest.raises(ValueError, match=match):
        select_divprune(bad, budget)


def test_config_and_registry():
    cfg = OmegaConf.load(REPO / "configs" / "method" / "divprune.yaml")
    assert cfg.name == "divprune" and "implemented" not in cfg and "stage" not in cfg
    method = hiprune.build_method("divprune", budget=64, **cfg.options)
    assert isinstance(method, DivPrune) and method.stage == "vision" and method.requests() == {}
    assert method.scope == "grid" and not method.decides_split()  # the tables' protocol: N'/crops per crop
    assert method.describe() == {"name": "divprune", "budget": 64, "scope": "grid"}
    assert hiprune.build_method("divprune", budget=64, scope="image").decides_split()
    with pytest.raises(ValueError, match="scope"):
        hiprune.build_method("divprune", budget=64, scope="crop")


def test_image_scope_selects_across_grids():
    # Golden A's four tokens as two grids of two: the pooled selection [0, 2, 3] gives grid 0 one pick (its token 0)
    # and grid 1 two (its tokens 0, 1); per grid at the same total the split would be [1, 2] only by chance.
    features = _angles(0, 10, 90, 180)
    method = hiprune.build_method("divprune", budget=3, scope="image")
    grids = [VisionTokens(features[:, :2], (1, 2), sample_ids=[11]), VisionTokens(features[:, 2:], (1, 2),
                                                                                  sample_ids=[12])]
    assert method.split_visual(grids, 3, [None, (0, 0)]) == [1, 2]
    assert method.select(grids[1], 2).indices.tolist() == [[0, 1]]
    assert method.select(grids[0], 1).indices.tolist() == [[0]]  # token 0 (0 deg), not token 1
    assert method.split_visual(grids, 3, [None, None]) is None  # frames: each covers the whole visual
    # two copies of the image in one batch: the same ids, the same picks, one select call for both
    method.split_visual(grids, 3, [None, (0, 0)])
    twice = VisionTokens(features[:, 2:].expand(2, -1, -1), (1, 2), sample_ids=[12, 12])
    assert method.select(twice, 2).indices.tolist() == [[0, 1], [0, 1]]
    mixed = VisionTokens(features[:, :2].expand(2, -1, -1), (1, 2), sample_ids=[11, 13])
    with pytest.raises(ValueError, match="mixes"):
        method.select(mixed, 1)
    with pytest.raises(ValueError, match="distinct sample id"):
        method.split_visual([grids[0], grids[0]], 3, [None, (0, 0)])


def _check(calls):
    for call in calls:
        assert torch.equal(call.selection.indices, select_divprune(call.tokens.features, call.budget))


def test_llava():
    _check(run_llava(hiprune.build_method("divprune", budget=48)))


def test_llava_next_per_crop():
    calls = run_llava_next(hiprune.build_method("divprune", budget=160))
    assert [c.budget for c in calls] == [32]
    _check(calls)


def test_llava_next_image_scope_is_one_selection_over_the_crops():
    calls = run_llava_next(hiprune.build_method("divprune", budget=160, scope="image"))
    assert sum(c.budget * c.tokens.batch_size for c in calls) == 160 and len({c.budget for c in calls}) > 1
    # the crops' picks together are DivPrune over the image's pooled 5 x 576 tokens (base first, then the crops)
    model, processor = family_model("llava_next")
    batch = processor(text=["USER: <image>\nIs there a red circle? ASSISTANT:"], images=[shape_image(700, 660, 1)],
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"][0][:5], output_hidden_states=True).hidden_states
        crops = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
    picked = []
    for call in calls:
        for row in range(call.tokens.batch_size):
            [crop] = [k for k in range(5) if torch.allclose(call.tokens.features[row], crops[k], atol=1e-5)]
            picked += (crop * 576 + call.selection.indices[row]).tolist()
    assert sorted(picked) == select_divprune(crops.reshape(1, 5 * 576, -1), 160)[0].tolist()


def test_qwen_on_merged_tokens():
    calls = run_qwen(hiprune.build_method("divprune", budget=0.334))
    assert [c.budget for c in calls] == [8, 5]  # round(24 * 0.334), round(15 * 0.334)
    _check(calls)


def test_video_llava_per_frame():
    calls = run_video(hiprune.build_method("divprune", budget=64))
    assert calls[0].budget == 16
    _check(calls)
