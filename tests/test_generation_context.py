"""No refused samples that the official code runs: a prompt that fits the LLM's context is answered, its
max_new_tokens capped to the context it leaves (logged per doc, as at batch size 1); only a prompt that leaves no
room for one new token is refused, naming the sample."""

from __future__ import annotations

import numpy as np
import pytest
from lmms_eval.api.instance import Instance
from PIL import Image

from eval.lmms.base import GenerationError
from eval.lmms.llava import HiPruneLlava

TASK, SPLIT = "probe", "test"
LIMIT = 2048  # the tiny LLaVA's max_position_embeddings


def _requests(model, docs, max_new_tokens):
    model.task_dict = {TASK: {SPLIT: dict(enumerate(docs))}}
    gen = {"max_new_tokens": max_new_tokens, "temperature": 0, "until": ["\n\n"]}
    return [Instance("generate_until", (doc["question"], dict(gen), lambda d: d["images"], i, TASK, SPLIT), idx=0,
                     metadata={"task": TASK, "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


@pytest.fixture(scope="module")
def model(tiny_llava_dir):
    lmm = HiPruneLlava(pretrained=str(tiny_llava_dir), method="random", budget=48, seed=1, device="cpu", batch_size=2)
    yield lmm
    lmm.close()


def _doc(model, image, length):
    """A doc whose prompt is exactly ``length`` tokens (one image of 48 kept tokens)."""
    question = "red " * (length - 200)
    for _ in range(3):  # the tokenizer merges nothing across "red ": one step corrects the count
        have = int(model.build_inputs([question], [[image]])[0]["attention_mask"].sum())
        question = "red " * (question.count("red ") + length - have)
    assert int(model.build_inputs([question], [[image]])[0]["attention_mask"].sum()) == length
    return {"images": [image], "question": question}


def test_prompt_leaving_less_context_than_max_new_tokens_is_answered_with_a_capped_length(model):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    long, short = _doc(model, image, LIMIT - 3), _doc(model, image, 300)
    model.capped_new_tokens.clear()
    batched = model.generate_until(_requests(model, [long, short], max_new_tokens=8))
    assert model.capped_new_tokens == {(TASK, SPLIT): {0: 3}}  # only the long one, to the 3 tokens it leaves
    assert model.capped_generation_summary() == {"capped_samples": 1,
                                                 "capped_new_tokens_by_doc": {f"{TASK}/{SPLIT}": {0: 3}}}
    # each answer as at batch size 1 with that length asked for outright (nothing capped then)
    model.capped_new_tokens.clear()
    alone_long = model.generate_until(_requests(model, [long], max_new_tokens=3))
    alone_short = model.generate_until(_requests(model, [short], max_new_tokens=8))
    assert batched == alone_long + alone_short
    assert model.capped_new_tokens == {}
    assert len(model.tokenizer(batched[0], add_special_tokens=False).input_ids) <= 3


def test_prompt_that_leaves_no_room_for_a_new_token_is_refused(model):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    last = _doc(model, image, LIMIT - 1)
    model.capped_new_tokens.clear()
    assert len(model.generate_until(_requests(model, [last], max_new_tokens=16))) == 1  # one new token fits
    assert model.capped_new_tokens == {(TASK, SPLIT): {0: 1}}
    full = _doc(model, image, LIMIT)
    with pytest.raises(GenerationError, match=rf"doc ids \[0\].*{LIMIT} prompt tokens \+ 1 new token exceed the "
                                              rf"model's context of {LIMIT} tokens"):
        model.generate_until(_requests(model, [full], max_new_tokens=16))
