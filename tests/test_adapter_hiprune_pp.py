"""HiPrune++ through the LLaVA adapter: prompts reach the method per image, totals per mode, batch invariance,
and an lmms-eval run with the tiny CLIP text tower."""

import dataclasses

import pytest
import torch

import hiprune
from hiprune.adapters.base import PruningError
from eval.lmms.prompting import LlavaInputBuilder
from hiprune.methods.hiprune_pp import HiPrunePP

QUESTIONS = ["Is there a red circle?", "What colour is the square?", "Describe the image."]


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    return hiprune.ClipPromptEncoder.from_pretrained(str(tiny_clip_dir))


def _batch(processor, images, questions, keep):
    return LlavaInputBuilder(processor)(questions, [[im] for im in images], keep)


def _generate(model, session, batch, questions):
    session.set_prompts(questions)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    return out[:, batch["input_ids"].shape[1]:]


def test_prompt_encoder_is_required_up_front(tiny_llava):
    model, _ = tiny_llava
    with pytest.raises(ValueError, match="needs a prompt encoder"):
        with hiprune.apply(model, hiprune.build_method("hiprune_pp", budget=64)):
            pass
    assert "get_image_features" not in vars(model.model)


@pytest.mark.parametrize("mode,keep", [("within_budget", 64), ("additive", 70)])
def test_totals_per_mode_and_prompts_per_image(tiny_llava, shape_images, encoder, mode, keep):
    model, processor = tiny_llava
    method = hiprune.build_method("hiprune_pp", budget=64, mode=mode)
    with hiprune.apply(model, method, processor, prompt_encoder=encoder) as session:
        assert session.tokens_per_image() == keep
        batch = _batch(processor, shape_images, QUESTIONS, keep)
        _generate(model, session, batch, QUESTIONS)
        selection = session.last_selection
        assert selection.indices.shape == (3, keep)
        assert selection.roles["text"].sum(1).tolist() == [6, 6, 6]  # round(0.1 * 64)
        with pytest.raises(PruningError, match="set_prompts"):  # prompts are consumed: never reused silently
            with torch.no_grad():
                model(**batch)


def test_the_prompt_changes_what_is_added(tiny_llava, shape_images, encoder):
    model, processor = tiny_llava
    method = hiprune.build_method("hiprune_pp", budget=64)
    image = [shape_images[0]] * 2
    with hiprune.apply(model, method, processor, prompt_encoder=encoder) as session:
        _generate(model, session, _batch(processor, image, ["red circle", "yellow square far right"], 64), ["red circle", "yellow square far right"])
    text = session.last_selection.indices[session.last_selection.roles["text"]].view(2, -1)
    assert not torch.equal(text[0], text[1])  # same image, different prompts -> different added tokens


def test_batch_invariance(tiny_llava, shape_images, encoder):
    model, processor = tiny_llava
    method = hiprune.build_method("hiprune_pp", budget=64)
    with hiprune.apply(model, method, processor, prompt_encoder=encoder) as session:
        batched = _generate(model, session, _batch(processor, shape_images, QUESTIONS, 64), QUESTIONS)
        singles = [
            _generate(model, session, _batch(processor, [im], [q], 64), [q])[0] for im, q in zip(shape_images, QUESTIONS)
        ]
    for row, single in zip(batched, singles):
        assert torch.equal(row, single)


@pytest.mark.slow
def test_eval_run_with_the_tiny_text_tower(tmp_path, tiny_llava_dir, tiny_clip_dir, smoke_task_dir):
    from eval.config import compose_config
    from eval.running import run as run_module

    cfg = compose_config([
        "model=tiny_llava", "benchmark=smoke_pope", "device=cpu", f"store={tmp_path}",
        "method=hiprune_pp", "budget=64", "method.options.mode=additive", "limit=4", "batch_size=2",
    ])
    record = run_module.execute(run_module.plan_run(cfg))
    assert record["visual_tokens"]["mean_kept_per_image"] == 70
    assert record["identity"]["method"]["mode"] == "additive"


def test_prompt_embedding_does_not_depend_on_the_batch(encoder):
    # the tiny CLIP reuses a left-padding tokenizer: the encoder must pad right (CLIP's positions are absolute)
    prompts = ["red", "a much longer prompt about a yellow square on the far right"]
    together = encoder.encode_prompts(prompts)
    alone = torch.cat([encoder.encode_prompts([p]) for p in prompts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@dataclasses.dataclass
class SpyHiPrunePP(HiPrunePP):
    """HiPrune++ that remembers the embeddings it compared."""

    seen: list = dataclasses.field(default_factory=list)

    def select(self, tokens, budget):
        self.seen.append((tokens.token_embeds.clone(), tokens.prompt_embeds.clone()))
        return super().select(tokens, budget)


@pytest.mark.parametrize("patch_layer, text_pooling", [("last", None), ("feature", "eos")])
def test_text_side_options_compare_the_embeddings_they_name(tiny_llava, shape_images, encoder, patch_layer,
                                                            text_pooling):
    """Default: last-layer patch features vs the encoder's mean-pooled prompt; patch_layer=feature with
    text_pooling=eos (CDPruner's practice): the layer feeding the LLM (vision_feature_layer -2) through post_layernorm
    and visual_projection vs the text tower's projected EOS embedding. Both recomputed here from the CLIP parts."""
    model, processor = tiny_llava
    method = SpyHiPrunePP(budget=64, patch_layer=patch_layer, text_pooling=text_pooling)
    images, questions = shape_images[:2], QUESTIONS[:2]
    batch = _batch(processor, images, questions, 64)
    with hiprune.apply(model, method, processor, prompt_encoder=encoder) as session, torch.no_grad():
        session.set_prompts(questions)
        model(**batch)
    [(token_embeds, prompt_embeds)] = method.seen
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        layer = model.config.vision_feature_layer if patch_layer == "feature" else -1
        assert layer == (-2 if patch_layer == "feature" else -1)
        states = tower.hidden_states[layer][:, 1:]
        vision = model.model.vision_tower
        post_layernorm = getattr(vision, "vision_model", vision).post_layernorm  # transformers 5: the tower itself
        expected_tokens = encoder.visual_projection(post_layernorm(states))
        text = encoder.tokenizer(questions, padding=True, return_tensors="pt")
        out = encoder.text_model(input_ids=text.input_ids, attention_mask=text.attention_mask)
        if text_pooling == "eos":
            expected_prompts = encoder.text_projection(out.pooler_output)
        else:
            projected = encoder.text_projection(out.last_hidden_state)
            mask = text.attention_mask.unsqueeze(-1).float()
            expected_prompts = (projected * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(token_embeds, expected_tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prompt_embeds, expected_prompts, rtol=1e-5, atol=1e-6)


def test_text_side_options_are_validated_and_refused_where_there_is_no_clip_tower(tiny_qwen):
    with pytest.raises(ValueError, match="patch_layer"):
        hiprune.build_method("hiprune_pp", budget=64, patch_layer="penultimate")
    with pytest.raises(ValueError, match="text_pooling"):
        hiprune.build_method("hiprune_pp", budget=64, text_pooling="cls")
    model, processor = tiny_qwen
    for options in ({"patch_layer": "feature"}, {"text_pooling": "eos"}):
        with pytest.raises(ValueError, match="CLIP-tower prompt embeddings"):
            method = hiprune.build_method("hiprune_pp", budget=0.5, object_layer=4, **options)
            with hiprune.apply(model, method, processor):
                pass
