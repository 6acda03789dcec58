"""Never fail silently: run-time faults name the sample and cause, odd inputs work, runs are deterministic and
batch-invariant, and the result store survives concurrent and killed writers."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

import hiprune
from eval.lmms.base import GenerationError
from eval.lmms.llava import HiPruneLlava
from eval.lmms.llava_next import HiPruneLlavaNext
from eval.lmms.prompting import LlavaInputBuilder
from eval.lmms.qwen2_5_vl import HiPruneQwen25VL
from eval.running.store import iter_records, read_record, write_record
from hiprune.adapters.base import PruningError
from hiprune.methods.base import Selection, gather_tokens

TASK, SPLIT = "probe", "test"
QUESTION = "Is there a red circle in the image?\nAnswer the question using a single word or phrase."
GEN = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
METHODS = [("none", {}), ("random", {"budget": 48, "seed": 1}), ("hiprune", {"budget": 48})]


def _image(width=120, height=80, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _requests(model: HiPruneLlava, docs: list[dict], gen=GEN) -> list[Instance]:
    """lmms-eval requests as the evaluator builds them, for docs {"images": [...], "question": str}."""
    model.task_dict = {TASK: {SPLIT: dict(enumerate(docs))}}
    return [
        Instance(
            "generate_until",
            (doc["question"], dict(gen), lambda d: d["images"], i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


def _model(tiny_llava_dir, name="hiprune", batch_size=1, **options) -> HiPruneLlava:
    return HiPruneLlava(pretrained=str(tiny_llava_dir), method=name, device="cpu", batch_size=batch_size, **options)


@pytest.fixture(scope="module")
def docs():
    return [{"images": [_image(seed=i, width=80 + 30 * i)], "question": QUESTION} for i in range(6)]


# --- run-time faults ------------------------------------------------------------------------------------------
def test_nan_attention_scores_stop_the_run_naming_the_docs(tiny_llava_dir, docs, monkeypatch):
    model = _model(tiny_llava_dir, budget=48, batch_size=2)
    monkeypatch.setattr("hiprune.capture.key_scores", lambda q, k, m, s: torch.full((q.shape[0], k.shape[2]), float("nan")))
    with pytest.raises(GenerationError, match=r"doc ids \[\d, \d\].*NaN or inf"):
        model.generate_until(_requests(model, docs))
    model.close()


@dataclasses.dataclass
class ShortChanging(hiprune.HiPrune):
    """A broken method: keeps one token fewer than asked."""

    def select(self, tokens, budget):
        indices = torch.arange(budget - 1).expand(tokens.batch_size, -1)
        return Selection(indices, gather_tokens(tokens.features, indices))


def test_kept_count_different_from_budget_is_an_error(tiny_llava, shape_images):
    model, processor = tiny_llava
    batch = LlavaInputBuilder(processor)(["Q"], [[shape_images[0]]], tokens_per_image=32)
    with hiprune.apply(model, ShortChanging(budget=32)), pytest.raises(PruningError, match="expected 32 tokens"):
        with torch.no_grad():
            model(**batch)


def test_sequence_longer_than_the_context_is_refused(tiny_llava_dir, docs):
    model = _model(tiny_llava_dir, "none")
    long_question = "red " * 1500  # + 576 image tokens > 2048 positions
    with pytest.raises(GenerationError, match="exceed the model's context of 2048"):
        model.generate_until(_requests(model, [{"images": [docs[0]["images"][0]], "question": long_question}]))
    model.close()


# --- inputs that must work ------------------------------------------------------------------------------------
def _odd_images():
    gradient = (np.arange(40 * 60).reshape(40, 60) % 256).astype("uint8")
    return {
        "grayscale": Image.fromarray(gradient, mode="L"),
        "rgba": Image.fromarray(np.dstack([gradient] * 4), mode="RGBA"),
        "palette": Image.fromarray(gradient).convert("P"),
        "16-bit": Image.fromarray((gradient.astype("uint16") * 257)),
        "1x1": Image.new("RGB", (1, 1), (255, 0, 0)),
        "10x500": _image(10, 500),
        "500x10": _image(500, 10),
        "large": _image(3000, 2000),
    }


@pytest.mark.parametrize("name", METHODS, ids=[m[0] for m in METHODS])
def test_odd_inputs_are_answered(tiny_llava_dir, name):
    method, options = name
    model = _model(tiny_llava_dir, method, batch_size=4, **options)
    keep = model.tokens_per_image
    samples = [{"images": [image], "question": QUESTION} for image in _odd_images().values()]
    samples += [
        {"images": [], "question": "What is two plus two?"},  # text only: passes through unpruned
        {"images": [_image(seed=7), _image(seed=8)], "question": "<image>\n<image>\nAre these the same?"},
        {"images": [_image(seed=9)], "question": ""},  # empty prompt
    ]
    answers = model.generate_until(_requests(model, samples))
    assert len(answers) == len(samples) and all(isinstance(a, str) for a in answers)
    kept = model.kept_tokens[(TASK, SPLIT)]
    assert [kept[i] for i in range(8)] == [[keep]] * 8
    assert kept[8] == [] and kept[9] == [keep, keep] and kept[10] == [keep]
    assert model.kept_token_summary()["samples_without_image"] == 1
    model.close()


# --- determinism and batch invariance --------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS, ids=[m[0] for m in METHODS])
def test_same_config_twice_and_any_batch_size_give_identical_answers(tiny_llava_dir, docs, name):
    method, options = name
    runs = []
    for batch_size in (1, 4, 1):
        model = _model(tiny_llava_dir, method, batch_size=batch_size, **options)
        answers = model.generate_until(_requests(model, docs))
        runs.append((answers, dict(model.kept_digests[(TASK, SPLIT)])))
        model.close()
    assert runs[0] == runs[1] == runs[2]


def test_random_method_is_seeded_from_the_config(tiny_llava_dir, docs):
    digests = []
    for seed in (1, 1, 2):
        model = _model(tiny_llava_dir, "random", budget=48, seed=seed)
        model.generate_until(_requests(model, docs[:2]))
        digests.append(model.kept_digests[(TASK, SPLIT)])
        model.close()
    assert digests[0] == digests[1] != digests[2]


# --- store safety ---------------------------------------------------------------------------------------------
def _hammer(path: str, worker: int) -> None:
    for i in range(10):
        write_record(Path(path), {"identity": {"worker": worker}, "metrics": {"i": i}, "pad": "x" * 20000})


def test_concurrent_writers_of_one_record_never_corrupt_it(tmp_path):
    path = tmp_path / "m" / "b" / "record.json"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_hammer, args=(str(path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
        assert w.exitcode == 0
    record = read_record(path)
    assert record["metrics"]["i"] == 9 and record["identity"]["worker"] in range(4)
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


KILLED_WRITER = """
import json, sys, time
from pathlib import Path
import eval.running.store as store
real_dump = json.dump
def slow_dump(obj, handle, **kw):
    handle.write('{"identity": {"half": ')
    handle.flush()
    Path(sys.argv[2]).write_text("writing")
    time.sleep(60)
store.json.dump = slow_dump
store.write_record(Path(sys.argv[1]), {"identity": {}, "metrics": {}})
"""


def test_a_killed_writer_leaves_no_record(tmp_path):
    path, marker = tmp_path / "m" / "b" / "record.json", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(marker)])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "writer never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert not path.exists()
    assert list(iter_records(tmp_path)) == []  # the orphaned temporary file is not a record


# --- other families: extreme aspect ratios and odd inputs through their lmms-eval models ----------------------
FAMILY_MODELS = {"llava_next": (HiPruneLlavaNext, 320), "qwen2_5_vl": (HiPruneQwen25VL, 0.334)}


@pytest.mark.parametrize("tiny_model_dir, family", [(f, f) for f in sorted(FAMILY_MODELS)], indirect=["tiny_model_dir"])
def test_extreme_aspect_ratios_and_odd_inputs_on_dynamic_resolution_families(tiny_model_dir, family):
    cls, budget = FAMILY_MODELS[family]
    model = cls(pretrained=str(tiny_model_dir), method="hiprune", budget=budget, device="cpu", batch_size=3,
                **({"object_layer": 4} if family == "qwen2_5_vl" else {}))
    images = _odd_images()
    samples = [{"images": [images[k]], "question": QUESTION} for k in ("1x1", "10x500", "500x10", "rgba", "16-bit")]
    samples.append({"images": [], "question": "What is two plus two?"})
    answers = model.generate_until(_requests(model, samples))
    assert len(answers) == len(samples) and all(isinstance(a, str) for a in answers)
    kept = model.kept_tokens[(TASK, SPLIT)]
    assert all(len(kept[i]) >= 1 and all(k >= 1 for k in kept[i]) for i in range(5))
    assert kept[5] == []
    summary = model.kept_token_summary()
    # counts are per pruned grid: every crop of a NeXT image, one per Qwen image; the summary says which
    assert summary["images"] == sum(len(kept[i]) for i in range(6))
    assert summary["counted_per"] == {"llava_next": "crop (the base image and each anyres crop)",
                                      "qwen2_5_vl": "image"}[family]
    model.close()
