"""The procedural scene generator (scripts/scenes.py) and the task builder (scripts/build_scene_tasks.py)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import datasets
import numpy as np
import pytest
from lmms_eval.tasks.gqa import utils as gqa_utils
from lmms_eval.tasks.pope import utils as pope_utils

from scripts import build_scene_tasks as builder
from scripts import scenes


def _digest(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def test_rows_are_deterministic_for_a_seed_and_differ_across_seeds():
    a, b = scenes.pope_rows(12, seed=7), scenes.pope_rows(12, seed=7)
    assert [(r["question"], r["answer"], r["category"]) for r in a] == [
        (r["question"], r["answer"], r["category"]) for r in b
    ]
    assert [_digest(r["image"]) for r in a] == [_digest(r["image"]) for r in b]
    c = scenes.pope_rows(12, seed=8)
    assert [_digest(r["image"]) for r in a] != [_digest(r["image"]) for r in c]
    q1, q2 = scenes.qa_rows(9, seed=3), scenes.qa_rows(9, seed=3)
    assert [(r["question"], r["answer"], _digest(r["image"])) for r in q1] == [
        (r["question"], r["answer"], _digest(r["image"])) for r in q2
    ]


def test_training_scenes_are_seeded_per_index():
    forward = [scenes.train_scene(i) for i in range(6)]
    backward = [scenes.train_scene(i) for i in reversed(range(6))][::-1]
    assert [(s.describe(), d) for s, d in forward] == [(s.describe(), d) for s, d in backward]
    assert forward[0][1] is None and forward[1][1] is not None  # even: free scene, odd: designated question


def test_pope_is_balanced_per_category_and_in_every_even_prefix():
    rows = scenes.pope_rows(60, seed=1, render_images=False)
    counts = Counter((r["category"], r["answer"]) for r in rows)
    assert set(counts.values()) == {10} and len(counts) == 6
    for k in range(2, 61, 2):
        answers = Counter(r["answer"] for r in rows[:k])
        assert answers["yes"] == answers["no"]


def test_qa_answers_are_balanced_within_each_type():
    rows = scenes.qa_rows(120, seed=1, render_images=False)
    by_type = {t: Counter(r["answer"] for r in rows if r["category"] == t) for t in scenes.QA_TYPES}
    assert set(by_type["color"]) == set(scenes.COLOURS) and len(set(by_type["color"].values())) == 1
    assert (
        set(by_type["shape"]) == set(scenes.SHAPES)
        and max(by_type["shape"].values()) - min(by_type["shape"].values()) <= 1
    )
    assert set(by_type["count"]) == {"0", "1", "2", "3"} and len(set(by_type["count"].values())) == 1


def _target(question: str) -> tuple[str, str]:
    words = question.rstrip("?").split()
    return words[3], words[4]  # "Is there a|an <colour> <shape> in the image"


def test_adversarial_negatives_share_colour_and_shape_with_present_objects():
    rows = scenes.pope_rows(300, seed=5, render_images=False)
    adversarial = [r for r in rows if r["category"] == "adversarial" and r["answer"] == "no"]
    both = 0
    for r in adversarial:
        colour, shape = _target(r["question"])
        present = r["scene"].classes()
        assert (colour, shape) not in present
        shares_colour = any(c == colour and s != shape for c, s in present)
        shares_shape = any(s == shape and c != colour for c, s in present)
        assert shares_colour or shares_shape
        both += shares_colour and shares_shape
    assert both / len(adversarial) > 0.7  # mostly both attributes are present elsewhere (not always possible)
    # random negatives are not all that hard: the categories differ in difficulty
    randoms = [r for r in rows if r["category"] == "random" and r["answer"] == "no"]
    easy = 0
    for r in randoms:
        colour, shape = _target(r["question"])
        present = r["scene"].classes()
        easy += not (any(c == colour for c, _ in present) and any(s == shape for _, s in present))
    assert easy > 0


def test_popular_negatives_are_the_most_frequent_absent_classes():
    rows = scenes.pope_rows(120, seed=9, render_images=False)
    popularity = Counter(o for r in rows for o in r["scene"].classes())
    for r in rows:
        if r["category"] == "popular" and r["answer"] == "no":
            absent = [o for o in scenes.CLASSES if o not in r["scene"].classes()]
            assert popularity[_target(r["question"])] == max(popularity[o] for o in absent)


def _colour_at(image, obj) -> str:
    """Nearest palette colour of the pixels around the object's centre (inside every shape)."""
    arr = np.asarray(image).astype(int)
    x, y = round(obj.cx), round(obj.cy)
    patch = arr[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
    return min(scenes.COLOURS, key=lambda c: np.abs(patch - np.array(scenes.COLOURS[c])).sum())


@pytest.mark.parametrize("kind", ["pope", "qa"])
def test_answers_match_the_drawn_scene(kind):
    rows = (scenes.pope_rows if kind == "pope" else scenes.qa_rows)(60, seed=11)
    for r in rows:
        scene = r["scene"]
        assert 2 <= len(scene.objects) <= scenes.MAX_OBJECTS
        # every object is drawn where the scene says, in its colour, and objects do not overlap
        for o in scene.objects:
            assert _colour_at(r["image"], o) == o.colour
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.r + b.r
        # the row's answer is the one computed from the object list
        truth = scenes.answers_for(scene.classes())
        table = truth["pope"] if kind == "pope" else truth[r["category"]]
        assert table[r["question"]] == r["answer"]
    assert rows[0]["image"].size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


def test_qa_questions_are_unambiguous():
    for r in scenes.qa_rows(90, seed=4, render_images=False):
        classes = r["scene"].classes()
        if r["category"] == "color":
            shape = r["question"].rstrip("?").split()[-1]
            assert sum(1 for _, s in classes if s == shape) == 1
        elif r["category"] == "shape":
            colour = r["question"].split()[4]
            assert sum(1 for c, _ in classes if c == colour) == 1
        else:
            shape = r["question"].split()[2].rstrip("s")
            assert sum(1 for _, s in classes if s == shape) == int(r["answer"])


def test_training_questions_are_consistent_with_the_scene():
    import random

    rng = random.Random(0)
    for i in range(40):
        scene, designated = scenes.train_scene(i)
        truth = scenes.answers_for(scene.classes())
        flat = {q: a for table in truth.values() for q, a in table.items()}
        if designated:
            assert flat[designated[0]] == designated[1]
        qa = scenes.training_questions(rng, scene.classes(), 4, 2)
        assert Counter(a for q, a in qa if q.startswith("Is there"))["yes"] == 2
        for q, a in qa:
            assert flat[q] == a


def test_builder_writes_pope_and_gqa_compatible_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "SIZES", {"val": {"pope": 6, "qa": 6}, "test": {"pope": 6, "qa": 6}})
    out = builder.build(tmp_path, splits=("test",))
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["test"]["files"]) == {"pope_test.parquet", "qa_test.parquet"}
    pope = datasets.load_dataset("parquet", data_files={"test": str(out / "pope_test.parquet")}, split="test")
    qa = datasets.load_dataset("parquet", data_files={"test": str(out / "qa_test.parquet")}, split="test")
    expected = scenes.pope_rows(6, builder.split_seed("test", "pope"))
    assert pope["question"] == [r["question"] for r in expected]
    assert _digest(pope[0]["image"].convert("RGB")) == _digest(expected[0]["image"])  # PNG is lossless
    doc = pope[0]
    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    assert pope_utils.pope_doc_to_text(doc, kwargs).startswith(doc["question"])
    assert pope_utils.pope_process_results(doc, [doc["answer"]])["pope_accuracy"]["score"] == 1.0
    assert gqa_utils.gqa_doc_to_visual(qa[0])[0].size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert gqa_utils.gqa_doc_to_text(qa[0], kwargs) == qa[0]["question"] + kwargs["post_prompt"]
    stamp = (out / "pope_test.parquet").stat().st_mtime_ns
    builder.build(tmp_path, splits=("test",))  # up to date: skipped
    assert (out / "pope_test.parquet").stat().st_mtime_ns == stamp
