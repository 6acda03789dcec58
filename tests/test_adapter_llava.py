"""LLaVA adapter: the LLM receives exactly N' visual tokens per image, generation works, batching cannot change
answers, and leaving ``hiprune.apply`` restores the model exactly."""

import copy

import pytest
import torch

import hiprune
from eval.lmms.prompting import LlavaInputBuilder

QUESTIONS = [
    "Is there a red circle in the image?\nAnswer the question using a single word or phrase.",
    "What colour is the square?",
    "Describe the image.",
]
METHODS = [("none", {}), ("random", {"budget": 64, "seed": 3}), ("hiprune", {"budget": 64}), ("hiprune", {"budget": 192})]


def _inputs(processor, images, questions, tokens_per_image):
    return LlavaInputBuilder(processor)(questions, [[im] for im in images], tokens_per_image)


def _generate(model, batch, **kwargs):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


@pytest.mark.parametrize("name,options", METHODS)
def test_llm_input_is_text_plus_kept_tokens(tiny_llava, shape_images, name, options):
    model, processor = tiny_llava
    method = hiprune.build_method(name, **options)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape), with_kwargs=True
    )
    try:
        with hiprune.apply(model, method) as session:
            keep = session.tokens_per_image()
            batch = _inputs(processor, shape_images, QUESTIONS, keep)
            _generate(model, batch)
    finally:
        hook.remove()
    text_only = _inputs(processor, shape_images, QUESTIONS, 0)
    text_lengths = text_only["attention_mask"].sum(1)
    assert keep == options.get("budget", 576)
    assert torch.equal(batch["attention_mask"].sum(1), text_lengths + keep)
    assert seen[0][:2] == (3, int(text_lengths.max()) + keep)  # prefill: padded batch of text + N' tokens
    assert all(s[1] == 1 for s in seen[1:])  # then one token per step from the KV cache
    [grids] = session.records
    assert [g.tokens_kept for g in grids] == [keep] * 3


@pytest.mark.parametrize("name,options", METHODS)
def test_batch_of_three_equals_three_singles(tiny_llava, shape_images, name, options):
    model, processor = tiny_llava
    method = hiprune.build_method(name, **options)
    with hiprune.apply(model, method) as session:
        keep = session.tokens_per_image()
        batched = _generate(model, _inputs(processor, shape_images, QUESTIONS, keep))
        kept_batched = [g.indices for g in session.pop_records()[0]]
        singles = []
        for image, question in zip(shape_images, QUESTIONS):
            singles.append(_generate(model, _inputs(processor, [image], [question], keep))[0])
            kept_single = session.pop_records()[0][0].indices
            if kept_single is not None:
                assert torch.equal(kept_single, kept_batched[len(singles) - 1])
    assert batched.shape == (3, 6)
    for row, single in zip(batched, singles):
        assert torch.equal(row, single)


def test_hiprune_keeps_what_select_hiprune_picks_from_eager_scores(tiny_llava, shape_images):
    model, processor = tiny_llava
    method = hiprune.build_method("hiprune", budget=128)
    batch = _inputs(processor, shape_images, QUESTIONS, 128)
    with hiprune.apply(model, method) as session, torch.no_grad():
        model(**batch)
    kept = session.last_selection.indices

    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(batch["pixel_values"], output_attentions=True).attentions
    expected = hiprune.select_hiprune(
        hiprune.global_attention(attentions[8], skip_cls=True),
        hiprune.global_attention(attentions[10], skip_cls=True),
        grid=(24, 24),
        budget=128,
    )
    assert torch.equal(kept.cpu(), expected)


def test_none_is_bit_identical_to_the_plain_model(tiny_llava, shape_images):
    model, processor = tiny_llava
    batch = _inputs(processor, shape_images, QUESTIONS, 576)
    plain = _generate(model, batch)
    with hiprune.apply(model, hiprune.build_method("none")):
        wrapped = _generate(model, batch)
    assert torch.equal(plain, wrapped)


def test_apply_restores_model_and_processor_exactly(tiny_llava, shape_images):
    model, processor = tiny_llava
    batch = _inputs(processor, shape_images[:1], QUESTIONS[:1], 576)
    with torch.no_grad():
        before = model(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    configs = [m.config for m in model.model.vision_tower.encoder.layers[8].modules() if hasattr(m, "config")]

    with pytest.raises(RuntimeError, match="boom"):
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=64), processor) as session:
            assert "get_image_features" in vars(model.model)
            prompt = "USER: <image>\nhi ASSISTANT:"
            ids = processor(text=prompt, images=shape_images[0], return_tensors="pt")["input_ids"]
            assert int((ids == processor.image_token_id).sum()) == 64
            assert session.tokens_per_image() == 64
            raise RuntimeError("boom")

    assert "get_image_features" not in vars(model.model)
    assert "replace_image_token" not in vars(processor)
    ids = processor(text="USER: <image>\nhi ASSISTANT:", images=shape_images[0], return_tensors="pt")["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == 576
    assert configs == [m.config for m in model.model.vision_tower.encoder.layers[8].modules() if hasattr(m, "config")]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_wrong_placeholder_count_fails_loudly(tiny_llava, shape_images):
    model, processor = tiny_llava
    batch = _inputs(processor, shape_images[:1], QUESTIONS[:1], 576)  # full count, but the method keeps 64
    with hiprune.apply(model, hiprune.build_method("hiprune", budget=64)), pytest.raises(Exception, match="do not match"):
        with torch.no_grad():
            model(**batch)


def test_impossible_settings_are_rejected_before_patching(tiny_llava):
    model, _ = tiny_llava
    with pytest.raises(ValueError, match="only 576"):
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=600)):
            pass
    with pytest.raises(ValueError, match="layers 1..12"):
        with hiprune.apply(model, hiprune.build_method("hiprune", budget=64, object_layer=13)):
            pass
    assert "get_image_features" not in vars(model.model)
    with pytest.raises(TypeError, match="no pruning adapter"):
        with hiprune.apply(torch.nn.Linear(2, 2), hiprune.build_method("none")):
            pass
