"""TRIM: the spec's golden case (scores, adaptive count, fixed count, aggregate), properties, and runs with the tiny
CLIP text tower on the CLIP-tower families: the aggregate (projected mean of the unselected feature-layer states)
reaches the LLM last; Qwen2.5-VL refused before patching."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from vision_method_runs import (
    REPO,
    family_model,
    prompt_encoder,
    refused_before_patching,
    run_llava,
    run_llava_next,
    run_video,
)

import hiprune
from hiprune.methods.trim import TRIM, adaptive_count, select_trim, trim_aggregate, trim_scores

# baselines.md §6: v . t = [0, 0, 0, 0, 0, 0, -3, -1] (one-dimensional embeddings, t = 1)
V = torch.tensor([[[0.0], [0.0], [0.0], [0.0], [0.0], [0.0], [-3.0], [-1.0]]])
T = torch.tensor([[1.0]])


def test_golden_scores_and_adaptive_count():
    q = trim_scores(V, T)
    torch.testing.assert_close(q[0, :6], torch.full((6,), 0.0347), atol=5e-5, rtol=0)
    torch.testing.assert_close(q[0, 6:], torch.tensor([0.6973, 0.0944]), atol=5e-5, rtol=0)
    quartiles = torch.quantile(q[0], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(quartiles, torch.tensor([0.03472, 0.04963]), atol=5e-6, rtol=0)
    assert adaptive_count(q).tolist() == [2]  # u = 0.07200
    assert select_trim(q, 2).tolist() == [[6, 7]]  # fixed rho = 0.25: floor(8 * 0.25) = 2, the same keep


def test_golden_aggregate_is_the_mean_of_the_unselected():
    hidden = torch.arange(8.0).view(1, 8, 1)
    mean, first = trim_aggregate(hidden, torch.tensor([[6, 7]]))
    assert mean.flatten().tolist() == [2.5] and first.tolist() == [[0]]  # mean of tokens 0-5


def test_ties_go_to_the_lower_index():
    q = torch.tensor([[0.2, 0.3, 0.2, 0.3]])
    assert select_trim(q, 3).tolist() == [[0, 1, 3]]


cases = st.integers(1, 3).flatmap(lambda b: st.integers(2, 24).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.lists(st.integers(-4, 4), min_size=3, max_size=3), min_size=n, max_size=n),
             min_size=b, max_size=b),
    st.lists(st.lists(st.integers(-3, 3), min_size=3, max_size=3), min_size=b, max_size=b),
    st.integers(0, n - 1))))


@settings(max_examples=50, deadline=None)
@given(cases)
def test_properties(case):
    v, t, count = case
    v, t = torch.tensor(v, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    q = trim_scores(v, t)
    torch.testing.assert_close(q.sum(1), torch.ones(len(q)))
    kept = select_trim(q, count)
    n = v.shape[1]
    assert kept.shape == (len(v), count) and ((kept >= 0) & (kept < n)).all() and (kept[:, 1:] > kept[:, :-1]).all()
    assert (adaptive_count(q) >= 0).all() and (adaptive_count(q) < n).all()
    for b in range(len(v)):
        assert torch.equal(kept[b], select_trim(trim_scores(v[b : b + 1], t[b : b + 1]), count)[0])


@pytest.mark.parametrize("call, match", [
    (lambda: trim_scores(torch.full((1, 2, 3), float("nan")), torch.ones(1, 3)), "non-finite"),
    (lambda: trim_scores(torch.ones(1, 2, 3), torch.ones(1, 4)), r"must be \[B, E\]"),
    (lambda: trim_scores(torch.ones(2, 3), torch.ones(1, 3)), r"\[B, N, E\]"),
    (lambda: select_trim(torch.ones(1, 4), 4), "one must be left for the aggregate"),
    (lambda: select_trim(torch.tensor([[0.1, float("inf")]]), 1), "non-finite"),
])
def test_malformed_input_is_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_config_and_registry():
    cfg = OmegaConf.load(REPO / "configs" / "method" / "trim.yaml")
    assert cfg.name == "trim" and "implemented" not in cfg and "stage" not in cfg
    method = hiprune.build_method("trim", budget=64, **cfg.options)
    assert isinstance(method, TRIM) and method.kept_count(64) == 64
    assert hiprune.build_method("trim", budget=64, total="budget_plus_one").kept_count(64) == 65
    with pytest.raises(ValueError, match="total"):
        hiprune.build_method("trim", budget=64, total="x")


def _check(calls, model):
    for call in calls:
        tokens, selection = call.tokens, call.selection
        count = selection.indices.shape[1] - 1
        kept = select_trim(trim_scores(tokens.token_embeds, tokens.prompt_embeds), count)
        assert torch.equal(selection.indices[:, :count], kept)
        mean, first = trim_aggregate(tokens.states["hidden"], kept)
        assert torch.equal(selection.indices[:, count:], first)
        with torch.no_grad():  # the aggregate through the model's own projector, last
            aggregate = model.model.multi_modal_projector(mean)
        torch.testing.assert_close(selection.features[:, count:], aggregate, rtol=1e-5, atol=1e-6)
        assert (selection.sources >= 0).all() and (selection.sources == count).sum(1).tolist() == \
            [tokens.num_tokens - count] * tokens.batch_size


def test_prompt_embeddings_come_from_the_feature_layer_and_eos_pooling():
    method = hiprune.build_method("trim", budget=48)
    calls = run_llava(method)
    model, _ = family_model("llava")
    encoder = prompt_encoder(method)
    tokens = calls[0].tokens
    torch.testing.assert_close(tokens.prompt_embeds, encoder.encode_prompts(["Is there a red circle?"] * 2,
                                                                            pooling="eos"))
    assert not torch.allclose(tokens.prompt_embeds, encoder.encode_prompts(["Is there a red circle?"] * 2))
    _check(calls, model)


def test_llava_next_per_crop():
    calls = run_llava_next(hiprune.build_method("trim", budget=160))
    assert [c.budget for c in calls] == [32]
    _check(calls, family_model("llava_next")[0])


def test_video_llava_per_frame():
    calls = run_video(hiprune.build_method("trim", budget=64, total="budget_plus_one"))
    assert calls[0].budget == 16 and calls[0].selection.indices.shape == (8, 17)
    _check(calls, family_model("video_llava")[0])


def test_qwen_is_refused_before_patching():
    refused_before_patching("qwen2_5_vl", hiprune.build_method("trim", budget=0.25), "CLIP text tower")
