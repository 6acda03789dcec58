"""Captured scores of two layers equal an eager output_attentions=True run; everything else is untouched."""

import copy

import pytest
import torch

import hiprune
from hiprune.capture import AttentionScores, key_scores


@pytest.fixture(scope="module")
def tower_and_pixels(tiny_llava, shape_images):
    model, processor = tiny_llava
    pixels = processor.image_processor(shape_images, return_tensors="pt")["pixel_values"]
    return model.model.vision_tower, pixels


def test_captured_scores_equal_eager_attentions(tiny_llava, tower_and_pixels):
    model, _ = tiny_llava
    tower, pixels = tower_and_pixels
    adapter = hiprune.adapter_for(model)
    object_layer, deep_layer = 9, adapter.feature_layer()
    assert deep_layer == 11  # vision_feature_layer -2 of 12 layers
    modules = {"object": adapter.attention_module(object_layer), "deep": adapter.attention_module(deep_layer)}
    with torch.no_grad(), AttentionScores(modules) as capture:
        tower(pixels, output_hidden_states=True)
        captured = capture.collect()

    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(pixels, output_attentions=True).attentions
    assert len(attentions) == 12
    for name, layer in (("object", object_layer), ("deep", deep_layer)):
        reference = hiprune.global_attention(attentions[layer - 1], skip_cls=True)
        assert captured[name].shape == (3, 577)
        torch.testing.assert_close(captured[name][:, 1:], reference, rtol=1e-5, atol=1e-7)


def test_capture_leaves_outputs_and_configs_unchanged(tiny_llava, tower_and_pixels):
    model, _ = tiny_llava
    tower, pixels = tower_and_pixels
    adapter = hiprune.adapter_for(model)
    module = adapter.attention_module(9)
    config_before = module.config
    with torch.no_grad():
        plain = tower(pixels, output_hidden_states=True).hidden_states
        with AttentionScores({"object": module}):
            assert module.config is not config_before  # only this module sees the capture function
            assert adapter.attention_module(8).config is config_before
            captured = tower(pixels, output_hidden_states=True).hidden_states
    assert module.config is config_before
    assert not hasattr(module, "_hiprune_route")
    for a, b in zip(plain, captured):
        if a is not None:
            assert torch.equal(a, b)  # the layer's output still comes from the model's own kernel


def test_collect_fails_when_a_layer_did_not_run(tiny_llava):
    model, _ = tiny_llava
    module = hiprune.adapter_for(model).attention_module(9)
    with AttentionScores({"object": module}) as capture, pytest.raises(RuntimeError, match="not computed"):
        capture.collect()


def test_key_scores_grouped_query_matches_repeated_keys():
    torch.manual_seed(0)
    query = torch.randn(2, 4, 5, 8)
    key = torch.randn(2, 2, 5, 8)
    expanded = key.repeat_interleave(2, dim=1)
    probs = torch.softmax(query @ expanded.transpose(-1, -2) * 8**-0.5, dim=-1)
    torch.testing.assert_close(key_scores(query, key, None, 8**-0.5), hiprune.global_attention(probs, skip_cls=False))


def test_cls_query_mode_equals_the_eager_cls_row(tiny_llava, tower_and_pixels):
    model, _ = tiny_llava
    tower, pixels = tower_and_pixels
    module = hiprune.adapter_for(model).attention_module(9)
    with torch.no_grad(), AttentionScores({"object": module}, queries="cls") as capture:
        tower(pixels, output_hidden_states=True)
        captured = capture.collect()["object"]
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attention = eager(pixels, output_attentions=True).attentions[8]  # [B, H, T, T]
    torch.testing.assert_close(captured, attention[:, :, 0].mean(dim=1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="query mode"):
        AttentionScores({"object": module}, queries="mean")


def test_hiprune_cls_pattern_runs_through_the_adapter(tiny_llava, shape_images):
    model, processor = tiny_llava
    pixels = processor.image_processor(shape_images, return_tensors="pt")["pixel_values"]
    kept = {}
    for attention in ("global", "cls"):
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=64, attention=attention)) as session:
            with torch.no_grad():
                model.model.get_image_features(pixel_values=pixels)
        kept[attention] = session.last_selection.indices
    assert kept["global"].shape == kept["cls"].shape == (3, 64)
    assert not torch.equal(kept["global"], kept["cls"])
