"""compile=true (eval/lmms/compiled.py): static KV cache, compiled prefill and decode, prompts padded to buckets.

Greedy answers, generated token ids and kept-token selections must equal the eager path's. torch.compile runs here with
dynamo's ``eager`` backend (graph capture, guards and the compiled call path without inductor's code generation, which
takes minutes on these CPUs); inductor itself runs once in ``python -m eval.efficiency.throughput --compile`` and in the
GPU script (scripts/gpu_speed.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.lmms.compiled import CompileOptions, options_from, pad_to_bucket
from eval.lmms.llava import HiPruneLlava

QUESTIONS = ["Is there a red circle in the image?", "What colour is the square?", "How many shapes are there?"]


def _images():
    return [[Image.fromarray((np.random.RandomState(i).rand(60 + 20 * i, 80, 3) * 255).astype("uint8"))]
            for i in range(len(QUESTIONS))]


def _answer(lmm, images):
    """Answers, new token ids (forced to 6) per sample and selection digests of one batch through the model's generate_until path."""
    captured = {}
    generate = lmm._model.generate

    def capture(**kwargs):
        out = generate(**kwargs, min_new_tokens=6)  # past the end-of-sequence token: 6 compared tokens per sample
        captured["new"] = out[:, kwargs["input_ids"].shape[1]:].tolist()
        captured["length"] = kwargs["input_ids"].shape[1]
        captured["cache"] = kwargs.get("cache_implementation")
        return out

    lmm._model.generate = capture
    lmm.task_dict = {"t": {"s": dict(enumerate(images))}}
    try:
        answers = lmm._generate_batch([f"<image>\n{q}" for q in QUESTIONS], {"max_new_tokens": 6, "until": []},
                                      [lambda doc: doc] * len(QUESTIONS), list(range(len(QUESTIONS))), "t", "s")
    finally:
        del lmm._model.generate
    return answers, captured, dict(lmm.kept_digests[("t", "s")])


def test_compiled_generation_equals_eager_on_scene_llava(scene_llava_dir):
    images = _images()
    runs = {}
    for compiled in (False, True):
        extra = {"compile": "true", "compile_backend": "eager", "compile_bucket": "16"} if compiled else {}
        lmm = HiPruneLlava(pretrained=str(scene_llava_dir), method="hiprune", budget=16, device="cpu",
                           prompt_style="llava_v1", batch_size=3, **extra)
        try:
            runs[compiled] = _answer(lmm, images)
            if compiled:
                assert lmm.settings["compile"] == {"bucket": 16, "backend": "eager", "mode": "default",
                                                   "prefill": True, "cache": "static"}
                assert "forward" in vars(lmm._model.model.language_model)  # the compiled prefill is installed
        finally:
            lmm.close()
        assert "forward" not in vars(lmm._model.model.language_model)  # and removed again
    (eager_answers, eager, eager_digests), (answers, compiled, digests) = runs[False], runs[True]
    assert compiled["cache"] == "static" and eager["cache"] is None
    assert compiled["length"] % 16 == 0 and compiled["length"] >= eager["length"]
    assert compiled["new"] == eager["new"]
    assert len({tuple(ids) for ids in eager["new"]}) > 1  # the samples' answers differ: the check compares something
    assert answers == eager_answers and digests == eager_digests


def test_pad_to_bucket_left_pads_only_sequence_tensors():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [0, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
             "pixel_values": torch.ones(2, 3, 4, 4)}
    out = pad_to_bucket(batch, 4, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert out["pixel_values"] is batch["pixel_values"]
    assert pad_to_bucket(out, 4, pad_id=0) is out


def test_compile_options_parse_and_refuse():
    assert options_from(False, {}) is None
    args = {"compile_bucket": "64", "compile_prefill": "false", "alpha": 0.1}
    assert options_from("true", args) == CompileOptions(bucket=64, prefill=False)
    assert args == {"alpha": 0.1}  # method options stay
    with pytest.raises(ValueError, match="without compile=true"):
        options_from(False, {"compile_bucket": 8})
    with pytest.raises(ValueError, match="compile_backend"):
        options_from(True, {"compile_backend": "tensorrt"})
    with pytest.raises(ValueError, match="unknown compile option"):
        options_from(True, {"compile_graphs": 1})


@pytest.mark.parametrize("cls_path,method,message", [
    ("eval.lmms.llava.HiPruneLlava", "fastv", "prunes inside the LLM"),
    ("eval.lmms.qwen2_5_vl.HiPruneQwen25VL", "hiprune", "qwen2_5_vl family"),
])
def test_compile_refused_before_loading(cls_path, method, message, tmp_path):
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    # a folder with nothing in it: reaching the loader would fail differently
    with pytest.raises(ValueError, match=message):
        cls(pretrained=str(tmp_path), method=method, budget=64, device="cpu", compile=True)
