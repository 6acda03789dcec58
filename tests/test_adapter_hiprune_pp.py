"""HiPrune++ through the LLaVA adapter: prompts reach the method per image, totals per mode, batch invariance,
and an lmms-eval run with the tiny CLIP text tower."""

import pytest
import torch

import hiprune
from hiprune.adapters.base import PruningError
from eval.lmms.prompting import LlavaInputBuilder

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
