"""VisionZip (hiprune/methods/visionzip.py): the spec's golden cases, the budget splits, properties, and runs on the
tiny models: the CLS token in front, the merged (projected) contextual tokens reach the LLM, sources recorded;
LLaVA-NeXT in the VisionZip code's layout; the Qwen2.5-VL port (variant=global) with M-RoPE positions kept."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import shape_image
from omegaconf import OmegaConf
from vision_method_runs import (
    REPO,
    _noise,
    family_model,
    refused_before_patching,
    run_llava,
    run_qwen,
    run_video,
    spy,
)

import hiprune
from hiprune.methods.base import VisionTokens
from hiprune.methods.visionzip import VisionZip, official_split, qwen_split, select_visionzip, visionzip_groups

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
    c = torch.rand(batch, n, generator=g)
    keys, x = torch.randn(batch, n, 3, generator=g), torch.randn(batch, n, 4, generator=g)
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


def test_config_and_registry():
    cfg = OmegaConf.load(REPO / "configs" / "method" / "visionzip.yaml")
    assert cfg.name == "visionzip" and "implemented" not in cfg and "stage" not in cfg
    method = hiprune.build_method("visionzip", budget=192, **OmegaConf.to_container(cfg.options, resolve=True))
    assert isinstance(method, VisionZip) and method.keeps_cls and method.kept_count(192) == 191
    for bad, match in (({"merge": "sum"}, "merge"), ({"budget": 1}, "at least 2")):
        with pytest.raises(ValueError, match=match):
            hiprune.build_method("visionzip", **{"budget": 64, **bad})


def test_the_qwen_models_run_the_port():
    from eval.config import compose_config

    for model, variant in (("qwen25vl_3b", "global"), ("tiny_qwen25vl", "global"), ("llava15_7b", "cls"),
                           ("llava_next_7b", "cls")):
        assert compose_config([f"model={model}", "method=visionzip"]).method.options.variant == variant, model


def _check(calls, model):
    for call in calls:
        tokens = call.tokens
        with_cls, contextual = official_split(call.budget)
        groups = visionzip_groups(tokens.scores["cls"], tokens.states["keys"], tokens.states["hidden"],
                                  with_cls - 1, contextual)
        selection = call.selection
        assert torch.equal(selection.indices, torch.cat([groups.dominant, groups.targets], dim=1))
        assert torch.equal(selection.sources, groups.sources)
        d = with_cls - 1
        torch.testing.assert_close(selection.features[:, :d], tokens.features.gather(
            1, groups.dominant[..., None].expand(-1, -1, tokens.features.shape[-1])), rtol=0, atol=0)
        with torch.no_grad():  # the merged pre-projector states through the model's own projector
            merged = model.model.multi_modal_projector(groups.contextual)
        torch.testing.assert_close(selection.features[:, d:], merged, rtol=1e-5, atol=1e-6)
        assert selection.roles["contextual"].sum(1).tolist() == [contextual] * tokens.batch_size


def test_llava_cls_dominant_and_merged_tokens_reach_the_llm():
    calls = run_llava(hiprune.build_method("visionzip", budget=64))  # 54 + 10: CLS + 53 patches + 10 contextual
    assert calls[0].selection.indices.shape == (2, 63)
    _check(calls, family_model("llava")[0])


def test_video_llava_per_frame():
    calls = run_video(hiprune.build_method("visionzip", budget=64))  # 16 per frame: its CLS + 14 + 2 contextual
    assert calls[0].budget == 16 and calls[0].selection.indices.shape == (8, 15)
    _check(calls, family_model("video_llava")[0])


def test_video_llava_images_get_their_cls_in_front():
    model, processor = family_model("video_llava")
    method = hiprune.build_method("visionzip", budget=32)
    adapter = hiprune.adapter_for(model)
    assert adapter.image_tokens(method) == 32 and adapter.frame_tokens(method, 4) == 7  # + the frame's own CLS
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    image[0, 10:30, 20:50] = 200
    try:
        with torch.no_grad(), hiprune.apply(model, method, processor) as session:
            batch = dict(processor(text=["USER: <image>\nWhat is it? ASSISTANT:"], images=[image], return_tensors="pt"))
            if "pixel_values_images" in batch:
                batch["pixel_values"] = batch.pop("pixel_values_images")
            model(**batch)
    finally:
        hook.remove()
    tokens = seen[0][0][batch["input_ids"][0] == model.config.image_token_id]
    with torch.no_grad():
        hidden = model.model.image_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        cls = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 0])
    assert tokens.shape[0] == 32 and session.records[0][0].tokens_kept == 32  # the CLS in front is counted
    torch.testing.assert_close(tokens[0], cls[0], rtol=1e-5, atol=1e-6)


def test_llava_next_official_layout():
    """160 tokens = 5 crops x (CLS + 26 dominant + 5 contextual), laid out as the VisionZip code does: the base crop's
    [CLS, dominant, contextual], the sub-crops' dominant patches over the stitched grid, their CLS tokens, then their
    contextual tokens (crop order)."""
    model, processor = family_model("llava_next")
    method = hiprune.build_method("visionzip", budget=160)
    calls = spy(method)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), hiprune.apply(model, method, processor, layout="official") as session:
            batch = processor(text=["USER: <image>\nIs there a red circle? ASSISTANT:"], images=[shape_image(700, 660, 1)],
                              return_tensors="pt")
            model(**batch)
            assert session.adapter.image_layout(batch["image_sizes"][0], method).kept == [32] * 5
    finally:
        hook.remove()
    [call] = calls  # the 5 crops share one call, in crop order
    assert call.budget == 32 and call.selection.indices.shape == (5, 31) and method.trailing_count(32) == 5
    _check(calls, model)
    records = session.records[0]
    assert [r.tokens_kept for r in records] == [32] * 5  # the CLS in front counts
    for crop in range(5):
        assert torch.equal(records[crop].indices, call.selection.indices[crop])
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"][0][:5], output_hidden_states=True).hidden_states
        cls = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 0])
    features, indices, side, d = call.selection.features, call.selection.indices, 24, 26
    dominant, positions = [], []
    for crop in range(1, 5):
        ci, cj = divmod(crop - 1, 2)
        kept = indices[crop, :d]
        positions.append((ci * side + kept // side) * 2 * side + cj * side + kept % side)
        dominant.append(features[crop, :d])
    order = torch.cat(positions).argsort()
    expected = torch.cat([cls[:1], features[0], torch.cat(dominant)[order], cls[1:],
                          features[1:, d:].reshape(-1, features.shape[-1])])
    image = batch["input_ids"][0] == model.config.image_token_id
    assert expected.shape[0] == 160
    torch.testing.assert_close(seen[0][0][image], expected, rtol=1e-5, atol=1e-5)


def test_llava_next_native_layout_and_llava_ports_are_refused():
    refused_before_patching("qwen2_5_vl", hiprune.build_method("visionzip", budget=0.25), "visionzip variant=global")
    model, processor = family_model("llava_next")
    with pytest.raises(ValueError, match="official 'spatial' layout only"), hiprune.apply(
            model, hiprune.build_method("visionzip", budget=160), processor, layout="native"):
        pass
    refused_before_patching("llava", hiprune.build_method("visionzip", budget=0.25, variant="global"), "own rule")


def test_qwen_port_golden():
    # Golden A's tokens as a Qwen grid: rho = 0.4, n = 6 -> d = floor(0.35 * 6) = 2, C = max(floor(0.3), 1) = 1.
    # dominant {1, 3}; R = [0, 2, 4, 5], s = 4: target 0, all others join it: 1 + (4 + 10 + 3) / 3.
    method = hiprune.build_method("visionzip", budget=0.4, variant="global")
    assert not method.keeps_cls and method.own_grid_budgets and method.resolve_grid_budget(6) == 3
    assert method.kept_count(3) == 3 and method.trailing_count(3) == 0
    golden_c = hiprune.build_method("visionzip", budget=0.112, variant="global")
    assert golden_c.resolve_grid_budget(256) == 15 + 12  # Golden C (round(rho * n) would be 29)
    tokens = VisionTokens(X, (2, 3), scores={"attention": C}, states={"keys": K})
    selection = method.select(tokens, 3)
    assert selection.indices.tolist() == [[0, 1, 3]]  # raster order: the sequence is filtered
    torch.testing.assert_close(selection.features.flatten(), torch.tensor([1 + 17 / 3, 2.0, 8.0]))
    assert selection.sources.tolist() == [[0, 1, 0, 2, 0, 0]]
    assert selection.roles["contextual"].tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="given a budget of 4"):
        method.select(tokens, 4)
    for bad, match in (({"budget": 64}, "ratio budget"), ({"budget": 0.04}, "ratio budget"),
                       ({"budget": 0.3, "variant": "prose"}, "variant")):
        with pytest.raises(ValueError, match=match):
            hiprune.build_method("visionzip", **{"variant": "global", **bad})


def test_qwen_port_runs_and_keeps_m_rope_positions():
    method = hiprune.build_method("visionzip", budget=0.5, variant="global")
    calls = run_qwen(method)  # 24 and 15 merged tokens: d + C = 10 + 1 and 6 + 1
    assert [call.budget for call in calls] == [11, 7]
    for call in calls:
        tokens = call.tokens
        dominant, contextual = qwen_split(0.5, tokens.num_tokens)
        groups = visionzip_groups(tokens.scores["attention"], tokens.states["keys"], tokens.features, dominant,
                                  contextual)
        kept = torch.cat([groups.dominant, groups.targets], dim=1)
        assert torch.equal(call.selection.indices, kept.sort(dim=1).values)
        at = call.selection.indices[0]
        for slot, index in enumerate(at.tolist()):
            if index in groups.targets[0].tolist():  # the contextual token replaces its target's embedding
                c = groups.targets[0].tolist().index(index)
                torch.testing.assert_close(call.selection.features[0, slot], groups.contextual[0, c])
            else:
                torch.testing.assert_close(call.selection.features[0, slot], tokens.features[0, index])
    # positions: every kept token keeps the M-RoPE position it has in the unpruned sequence
    model, processor = family_model("qwen2_5_vl")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        tokenize=False, add_generation_prompt=True)
    positions = {}
    for name, m in (("none", hiprune.build_method("none")), ("visionzip", method)):
        calls = spy(m) if name == "visionzip" else []
        seen: list[torch.Tensor] = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append(kwargs["position_ids"]), with_kwargs=True)
        try:
            with torch.no_grad(), hiprune.apply(model, m, processor):
                batch = processor(text=[text], images=[_noise(112, 168, 0)], return_tensors="pt")
                model(**batch)
        finally:
            hook.remove()
        image = batch["input_ids"][0] == model.config.image_token_id
        positions[name] = seen[0][-3:, 0][:, image]  # the 3 M-RoPE rows of the image tokens
    kept = calls[0].selection.indices[0]
    assert positions["visionzip"].shape[1] == 11
    assert torch.equal(positions["visionzip"], positions["none"][:, kept])


def test_qwen_port_selection_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    method = hiprune.build_method("visionzip", budget=0.334, variant="global")
    g = torch.Generator().manual_seed(0)
    n, budget = 120, method.resolve_grid_budget(120)  # d + C = floor(0.284 * 120) + 6 = 34 + 6
    tokens = VisionTokens(torch.randn(2, n, 24, generator=g), (10, 12), scores={"attention": torch.rand(2, n, generator=g)},
                          states={"keys": torch.randn(2, n, 8, generator=g)})
    with FlopCounterMode(display=False) as counter:
        method.select(tokens, budget)
    assert budget == 40 and method.projected_tokens(budget) == 0
    assert counter.get_total_flops() == 2 * method.selection_flops(n, budget, {"keys": 8, "features": 24})
