"""Procedural scenes of coloured shapes and the questions asked about them (deterministic for a seed).

A scene is a square image (128 px, what the scene model sees without any resizing) holding 2-6 shapes
(circle / square / triangle x red / green / blue / yellow; varied size, position, rotation and shade) drawn over a
textured neutral background with small neutral clutter (dots, strokes, rings). Everything visible that carries a
colour word is an *object*; clutter is grey-scale and much smaller, so answers are never ambiguous.

Questions (answers are always consistent with the drawn scene: they are computed from the object list, and the
object list is what is drawn):

- POPE-style presence: "Is there a red square in the image?" -> yes / no, with POPE's three negative categories:
  ``random`` (any absent colour-shape pair), ``popular`` (the absent pair most frequent in the split; object
  classes are drawn with skewed weights so popularity means something) and ``adversarial`` (an absent pair whose
  colour is present on another shape *and* whose shape is present in another colour, else one that shares one
  attribute). Yes/no alternate, categories rotate every two rows: every even prefix is balanced.
- short answers, scored by exact match like GQA: "What color is the triangle?" (exactly one triangle),
  "What shape is the red object?" (exactly one red object), "How many circles are there?" (0-3). Question types
  rotate; answers cycle through every value of their type, so each type is exactly balanced.

Scenes for the QA rows are built from the answer (e.g. one blue triangle, other shapes in any colour, blue may
appear on them), so a blind guess scores 1/4 (colour), 1/3 (shape), 1/4 (count).

    from scenes import pope_rows, qa_rows, train_scenes
    rows = pope_rows(600, seed=2)          # list[dict]: question, answer, category, image (PIL), scene
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
SUPERSAMPLE = 2  # drawn at 2x and box-filtered down: anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 25),
}
SHAPES = ("circle", "square", "triangle")
CLASSES = tuple((c, s) for c in COLOURS for s in SHAPES)
POPE_CATEGORIES = ("adversarial", "popular", "random")
QA_TYPES = ("color", "shape", "count")
COUNT_VALUES = (0, 1, 2, 3)
MAX_OBJECTS = 6
RADIUS = (9.0, 16.0)  # object radius range in output pixels (diameters 18-32 px, 1-2 patches of 16 px)
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # lmms-eval's POPE / GQA post_prompt

# Split seeds: one generator stream per (split, kind); test and val never share a scene with train.
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float
    angle: float  # degrees (squares, triangles)
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    objects: list[Obj]
    background: dict = field(default_factory=dict)
    clutter: list[dict] = field(default_factory=list)

    def classes(self) -> list[tuple[str, str]]:
        return [(o.colour, o.shape) for o in self.objects]

    def describe(self) -> dict:
        return {
            "objects": [asdict(o) for o in self.objects],
            "background": self.background,
            "clutter": len(self.clutter),
        }


# ----------------------------------------------------------------------------------------------------------------
# Scene layout
# ----------------------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def _place(rng: random.Random, classes: list[tuple[str, str]]) -> list[Obj]:
    """Non-overlapping placement (rejection sampling; radii shrink if a layout is hard to find)."""
    for _attempt in range(50):
        placed: list[Obj] = []
        for colour, shape in classes:
            for tries in range(300):
                shrink = 0.97 ** (tries // 30)
                r = rng.uniform(*RADIUS) * shrink
                margin = r + 2.0
                cx = rng.uniform(margin, IMAGE_SIZE - margin)
                cy = rng.uniform(margin, IMAGE_SIZE - margin)
                if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 3.0 for o in placed):
                    break
            else:
                break  # restart the whole layout
            placed.append(Obj(colour, shape, cx, cy, r, rng.uniform(-25.0, 25.0), _jitter(rng, COLOURS[colour], 18)))
        if len(placed) == len(classes):
            return placed
    raise RuntimeError(f"could not place {len(classes)} objects")


def _background(rng: random.Random) -> dict:
    base = rng.randint(45, 225)
    tint = [rng.randint(-12, 12) for _ in range(3)]
    return {
        "base": [max(0, min(255, base + t)) for t in tint],
        "texture": rng.choice(["noise", "stripes", "checker", "gradient"]),
        "contrast": rng.uniform(6.0, 22.0),
        "period": rng.uniform(6.0, 18.0),
        "angle": rng.uniform(0.0, math.pi),
        "seed": rng.randrange(2**31),
    }


def _clutter(rng: random.Random) -> list[dict]:
    items = []
    for _ in range(rng.randint(3, 10)):
        grey = rng.randint(0, 255)
        items.append(
            {
                "kind": rng.choice(["dot", "stroke", "ring"]),
                "x": rng.uniform(0, IMAGE_SIZE),
                "y": rng.uniform(0, IMAGE_SIZE),
                "size": rng.uniform(1.0, 3.5),
                "dx": rng.uniform(-14, 14),
                "dy": rng.uniform(-14, 14),
                "grey": (grey, grey, grey),
            }
        )
    return items


def make_scene(rng: random.Random, classes: list[tuple[str, str]]) -> Scene:
    """A scene holding exactly ``classes`` (order shuffled), plus background and clutter."""
    classes = list(classes)
    rng.shuffle(classes)
    return Scene(objects=_place(rng, classes), background=_background(rng), clutter=_clutter(rng))


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _texture(bg: dict, size: int) -> np.ndarray:
    rs = np.random.default_rng(bg["seed"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / SUPERSAMPLE
    kind, contrast = bg["texture"], bg["contrast"]
    if kind == "noise":
        coarse = rs.normal(0.0, 1.0, size=(size // 8 + 1, size // 8 + 1)).astype(np.float32)
        field_ = np.kron(coarse, np.ones((8, 8), np.float32))[:size, :size]
        field_ = field_ + 0.5 * rs.normal(0.0, 1.0, size=(size, size)).astype(np.float32)
    elif kind == "stripes":
        u = xx * math.cos(bg["angle"]) + yy * math.sin(bg["angle"])
        field_ = np.sign(np.sin(2 * math.pi * u / bg["period"]))
    elif kind == "checker":
        p = bg["period"]
        field_ = ((np.floor(xx / p) + np.floor(yy / p)) % 2) * 2.0 - 1.0
    else:  # gradient
        u = xx * math.cos(bg["angle"]) + yy * math.sin(bg["angle"])
        field_ = (u / IMAGE_SIZE) * 2.0 - 1.0
    base = np.asarray(bg["base"], np.float32)
    return np.clip(base[None, None, :] + contrast * field_[..., None], 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    a0 = math.radians(angle)
    if shape == "square":
        h = r * 0.86  # half side: a square's area close to the circle's
        corners = [(-h, -h), (h, -h), (h, h), (-h, h)]
        return [
            (cx + x * math.cos(a0) - y * math.sin(a0), cy + x * math.sin(a0) + y * math.cos(a0)) for x, y in corners
        ]
    if shape == "triangle":
        R = r * 1.12
        return [
            (cx + R * math.cos(a0 + t), cy + R * math.sin(a0 + t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    raise ValueError(shape)


def render(scene: Scene) -> Image.Image:
    s = SUPERSAMPLE
    size = IMAGE_SIZE * s
    image = Image.fromarray(_texture(scene.background, size), mode="RGB")
    draw = ImageDraw.Draw(image)
    for c in scene.clutter:
        x, y, k = c["x"] * s, c["y"] * s, c["size"] * s
        if c["kind"] == "dot":
            draw.ellipse([x - k, y - k, x + k, y + k], fill=c["grey"])
        elif c["kind"] == "stroke":
            draw.line([x, y, x + c["dx"] * s, y + c["dy"] * s], fill=c["grey"], width=max(1, round(k * 0.8)))
        else:
            draw.ellipse([x - 2 * k, y - 2 * k, x + 2 * k, y + 2 * k], outline=c["grey"], width=max(1, round(k * 0.6)))
    for o in scene.objects:
        cx, cy, r = o.cx * s, o.cy * s, o.r * s
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r, o.angle), fill=o.rgb)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------------------------


def pope_question(colour: str, shape: str) -> str:
    return f"Is there {_article(colour)} {colour} {shape} in the image?"


def colour_question(shape: str) -> str:
    return f"What color is the {shape}?"


def shape_question(colour: str) -> str:
    return f"What shape is the {colour} object?"


def count_question(shape: str) -> str:
    return f"How many {shape}s are there?"


def answers_for(scene_classes: list[tuple[str, str]]) -> dict:
    """Every question the scene can answer, from its object list (the ground truth the tests check against)."""
    present = set(scene_classes)
    shape_counts = Counter(s for _, s in scene_classes)
    colour_counts = Counter(c for c, _ in scene_classes)
    out = {"pope": {pope_question(c, s): ("yes" if (c, s) in present else "no") for c, s in CLASSES}}
    out["color"] = {
        colour_question(s): next(c for c, s2 in scene_classes if s2 == s) for s in SHAPES if shape_counts[s] == 1
    }
    out["shape"] = {
        shape_question(c): next(s for c2, s in scene_classes if c2 == c) for c in COLOURS if colour_counts[c] == 1
    }
    out["count"] = {count_question(s): str(shape_counts[s]) for s in SHAPES if shape_counts[s] <= max(COUNT_VALUES)}
    return out


def adversarial_candidates(present: set, absent: list) -> list:
    """Absent pairs whose colour is on another present shape and whose shape is present in another colour;
    failing that, absent pairs sharing one attribute with a present object."""
    colours = {c for c, _ in present}
    shapes = {s for _, s in present}
    both = [o for o in absent if o[0] in colours and o[1] in shapes]
    if both:
        return both
    return [o for o in absent if o[0] in colours or o[1] in shapes]


def _class_weights(rng: random.Random) -> list[float]:
    """Skewed class frequencies, so that POPE's "popular" negatives differ from random ones."""
    return [rng.uniform(0.4, 2.5) for _ in CLASSES]


def _random_classes(rng: random.Random, k: int, weights: list[float]) -> list[tuple[str, str]]:
    return rng.choices(CLASSES, weights=weights, k=k)


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------


def pope_plan(n: int) -> list[tuple[str, str]]:
    """(category, answer) per row: yes/no alternate, categories rotate every two rows."""
    return [(POPE_CATEGORIES[(i // 2) % 3], "yes" if i % 2 == 0 else "no") for i in range(n)]


def pope_rows(n: int, seed: int, render_images: bool = True) -> list[dict]:
    """POPE-style presence rows, one image each (scenes of 2-6 objects, duplicates allowed)."""
    rng = random.Random(seed)
    weights = _class_weights(rng)
    scenes_classes = [_random_classes(rng, rng.randint(2, MAX_OBJECTS), weights) for _ in range(n)]
    popularity = Counter(o for cl in scenes_classes for o in cl)
    rows = []
    for i, ((category, answer), classes) in enumerate(zip(pope_plan(n), scenes_classes)):
        present = set(classes)
        absent = [o for o in CLASSES if o not in present]
        if answer == "yes":
            target = rng.choice(sorted(present))
        elif category == "random":
            target = rng.choice(absent)
        elif category == "popular":
            best = max(popularity[o] for o in absent)
            target = rng.choice([o for o in absent if popularity[o] == best])
        else:
            target = rng.choice(adversarial_candidates(present, absent) or absent)
        scene = make_scene(rng, classes)
        rows.append(_row(i, seed, "pope", category, pope_question(*target), answer, scene, render_images))
    return rows


def qa_scene_classes(rng: random.Random, qtype: str, value: str) -> tuple[list[tuple[str, str]], str]:
    """Object list and question for a short-answer row whose answer is ``value``."""
    if qtype == "color":
        shape = rng.choice(SHAPES)
        others = [o for o in CLASSES if o[1] != shape]
        classes = [(value, shape)] + rng.choices(others, k=rng.randint(1, MAX_OBJECTS - 1))
        return classes, colour_question(shape)
    if qtype == "shape":
        colour = rng.choice(list(COLOURS))
        others = [o for o in CLASSES if o[0] != colour]
        classes = [(colour, value)] + rng.choices(others, k=rng.randint(1, MAX_OBJECTS - 1))
        return classes, shape_question(colour)
    if qtype == "count":
        n = int(value)
        shape = rng.choice(SHAPES)
        own = [(rng.choice(list(COLOURS)), shape) for _ in range(n)]
        others = [o for o in CLASSES if o[1] != shape]
        n_other = rng.randint(max(0, 2 - n), MAX_OBJECTS - n)
        return own + rng.choices(others, k=n_other), count_question(shape)
    raise ValueError(qtype)


QA_VALUES = {"color": tuple(COLOURS), "shape": SHAPES, "count": tuple(str(v) for v in COUNT_VALUES)}


def qa_plan(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(type, answer) per row: types rotate; within a type, answers cycle through a shuffled order of all values."""
    cursors = {t: 0 for t in QA_TYPES}
    orders = {t: list(v) for t, v in QA_VALUES.items()}
    for t in QA_TYPES:
        rng.shuffle(orders[t])
    plan = []
    for i in range(n):
        t = QA_TYPES[i % len(QA_TYPES)]
        plan.append((t, orders[t][cursors[t] % len(orders[t])]))
        cursors[t] += 1
    return plan


def qa_rows(n: int, seed: int, render_images: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, (qtype, value) in enumerate(qa_plan(n, rng)):
        classes, question = qa_scene_classes(rng, qtype, value)
        scene = make_scene(rng, classes)
        rows.append(_row(i, seed, "qa", qtype, question, value, scene, render_images))
    return rows


def _row(
    i: int, seed: int, kind: str, category: str, question: str, answer: str, scene: Scene, render_images: bool
) -> dict:
    return {
        "id": str(i),
        "question_id": f"{kind}-{seed}-{i:05d}",
        "question": question,
        "answer": answer,
        "image_source": f"scene-{kind}-{seed}-{i:05d}",
        "image": render(scene) if render_images else None,
        "category": category,
        "scene": scene,
    }


def training_questions(
    rng: random.Random, classes: list[tuple[str, str]], k_pope: int = 2, k_qa: int = 2
) -> list[tuple[str, str]]:
    """Several (question, answer) pairs for one training scene: k_pope presence questions (yes/no alternating,
    negatives adversarial half of the time) and k_qa short-answer questions the scene can answer."""
    present = set(classes)
    absent = [o for o in CLASSES if o not in present]
    out = []
    for j in range(k_pope):
        if j % 2 == 0 or not absent:
            out.append((pope_question(*rng.choice(sorted(present))), "yes"))
        else:
            pool = adversarial_candidates(present, absent) if rng.random() < 0.5 else absent
            out.append((pope_question(*rng.choice(pool or absent)), "no"))
    answers = answers_for(classes)
    qa = [(q, a) for t in QA_TYPES for q, a in answers[t].items()]
    if qa:
        out.extend(rng.sample(qa, min(k_qa, len(qa))))
    return out


def train_scene(index: int, seed: int = SPLIT_SEEDS["train"]) -> tuple[Scene, tuple[str, str] | None]:
    """Training scene number ``index`` (seeded from (seed, index), so any range can be built in any process):
    even indices are POPE-style random scenes, odd ones answer-conditioned short-answer scenes with their
    designated (question, answer), cycling through every (type, answer) pair."""
    rng = random.Random(f"train:{seed}:{index}")
    if index % 2 == 0:
        weights = _class_weights(random.Random(f"train-weights:{seed}"))
        return make_scene(rng, _random_classes(rng, rng.randint(2, MAX_OBJECTS), weights)), None
    pairs = [(t, v) for t in QA_TYPES for v in QA_VALUES[t]]
    qtype, value = pairs[(index // 2) % len(pairs)]
    classes, question = qa_scene_classes(rng, qtype, value)
    return make_scene(rng, classes), (question, value)


def train_scenes(n: int, seed: int = SPLIT_SEEDS["train"], k_pope: int = 2, k_qa: int = 2):
    """Yield (image, [(question, answer), ...], scene) for training scenes 0..n-1: the scene's designated
    question first (if any), then presence and short-answer questions drawn by ``training_questions``."""
    for i in range(n):
        scene, designated = train_scene(i, seed)
        extra = [designated] if designated else []
        rng = random.Random(f"train-questions:{seed}:{i}")
        questions = extra + [qa for qa in training_questions(rng, scene.classes(), k_pope, k_qa) if qa not in extra]
        yield render(scene), questions[: k_pope + k_qa], scene
