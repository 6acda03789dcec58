#!/usr/bin/env python
"""Build a tiny, offline, POPE-style smoke dataset for lmms-eval.

Writes ``<out>/test.parquet`` (one ``test`` split, images embedded as PNG bytes)
and ``<out>/manifest.json``. The parquet has the columns of lmms-eval's
built-in POPE task (``lmms-lab/POPE``):

    id, question_id, question, answer, image_source, image, category

so that ``lmms_eval.tasks.pope.utils`` (doc_to_visual / doc_to_text /
process_results / aggregations) works on it unchanged. The ``image`` column
carries the HF ``datasets.Image`` feature in the parquet schema metadata, so
``datasets.load_dataset("parquet", ...)`` decodes it to ``PIL.Image``.

Images are procedurally drawn (coloured shapes on a plain background, varied
non-square sizes so that resize/pad behaviour of the processor matters).
Questions are "Is there a <colour> <shape> in the image?" with yes/no answers,
balanced per category. Categories follow POPE's negative-sampling schemes:

* ``random``      - "no" object: uniformly random absent (colour, shape).
* ``popular``     - "no" object: the most frequent absent (colour, shape)
                    over the whole generated dataset.
* ``adversarial`` - "no" object: an absent (colour, shape) that shares the
                    colour or the shape with an object that *is* present.

Output is deterministic for a given (--n, --seed): re-running produces
byte-identical files. The build is skipped if the output already exists with
the same parameters (use --force to rebuild).

The committed task ``eval/tasks/hiprune_smoke_pope`` reads
``assets/smoke_pope/test.parquet`` (the default --out) through a path relative
to its yaml file.

Usage:
    python -m scripts.build_smoke_task [--out DIR] [--n 24] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

from scripts import asset_build

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "assets" / "smoke_pope"
PARQUET_NAME = "test.parquet"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1  # bump when the generated content changes for a given seed

CATEGORIES = ("adversarial", "popular", "random")

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = [(245, 245, 245), (225, 225, 225), (200, 215, 230), (235, 225, 205), (60, 60, 60), (25, 35, 50)]

ALL_OBJECTS = [(c, s) for c in COLOURS for s in SHAPES]

# Image sizes: width and height drawn independently from this range, then
# forced to differ by at least MIN_ASPECT so that no image is (near) square.
SIZE_RANGE = (224, 640)
MIN_ASPECT = 1.3

FEATURES_SPEC = {
    "id": "string",
    "question_id": "string",
    "question": "string",
    "answer": "string",
    "image_source": "string",
    "image": "image",
    "category": "string",
}


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------


def _random_size(rng: random.Random) -> tuple[int, int]:
    lo, hi = SIZE_RANGE
    while True:
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        if max(w, h) / min(w, h) >= MIN_ASPECT:
            return w, h


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(shape)


def _draw_image(rng: random.Random, objects: list[tuple[str, str]]):
    from PIL import Image, ImageDraw

    w, h = _random_size(rng)
    bg = rng.choice(BACKGROUNDS)
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)

    # Place shapes without overlap (rejection sampling, shrinking if needed).
    placed: list[tuple[float, float, float]] = []
    base_r = min(w, h) / 7.0
    for colour, shape in objects:
        for attempt in range(200):
            r = base_r * rng.uniform(0.7, 1.2) * (0.97 ** (attempt // 20))
            cx = rng.uniform(r + 2, w - r - 2)
            cy = rng.uniform(r + 2, h - r - 2)
            if all(math.hypot(cx - px, cy - py) > r + pr + 4 for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)
    return img


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    # No metadata chunks, fixed compression level -> deterministic bytes.
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------


def _plan(n: int) -> list[tuple[str, str]]:
    """(category, answer) per sample: answers alternate yes/no, categories
    rotate every two samples. Every even-length prefix (what ``--limit`` takes)
    is yes/no balanced, and each category is balanced exactly when n is a
    multiple of 6 (the default 24 gives 4 yes + 4 no per category)."""
    return [(CATEGORIES[(i // 2) % 3], "yes" if i % 2 == 0 else "no") for i in range(n)]


def _choose_negative(rng: random.Random, category: str, present: set, popularity: Counter) -> tuple[str, str]:
    absent = [o for o in ALL_OBJECTS if o not in present]
    if category == "random":
        return rng.choice(absent)
    if category == "popular":
        best = max(popularity[o] for o in absent)
        return rng.choice([o for o in absent if popularity[o] == best])
    if category == "adversarial":
        hard = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in present)]
        return rng.choice(hard or absent)
    raise ValueError(category)


def build_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    plan = _plan(n)

    # 1) Scene contents (2-4 distinct objects per image). Skew the object
    #    distribution a little so that "popular" objects exist.
    weights = [rng.uniform(0.3, 3.0) for _ in ALL_OBJECTS]
    scenes: list[list[tuple[str, str]]] = []
    for _ in range(n):
        k = rng.randint(2, 4)
        chosen: list[tuple[str, str]] = []
        while len(chosen) < k:
            o = rng.choices(ALL_OBJECTS, weights=weights, k=1)[0]
            if o not in chosen:
                chosen.append(o)
        scenes.append(chosen)
    popularity = Counter(o for s in scenes for o in s)

    # 2) Questions, 3) images.
    rows = []
    for i, ((category, answer), objects) in enumerate(zip(plan, scenes)):
        present = set(objects)
        target = rng.choice(objects) if answer == "yes" else _choose_negative(rng, category, present, popularity)
        colour, shape = target
        img = _draw_image(rng, objects)
        rows.append(
            {
                "id": str(i),
                "question_id": str(i + 1),
                "question": f"Is there {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} in the image?",
                "answer": answer,
                "image_source": f"smoke_{seed}_{i:05d}",
                "image": {"bytes": _png_bytes(img), "path": None},
                "category": category,
                # not written to parquet, kept for the manifest
                "_objects": [f"{c} {s}" for c, s in objects],
                "_size": list(img.size),
            }
        )
    return rows


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _features():
    import datasets

    return datasets.Features(
        {k: datasets.Image() if v == "image" else datasets.Value(v) for k, v in FEATURES_SPEC.items()}
    )


def write_parquet(rows: list[dict], path: Path) -> None:
    import datasets

    cols = {k: [r[k] for r in rows] for k in FEATURES_SPEC}
    ds = datasets.Dataset.from_dict(cols, features=_features())
    ds.to_parquet(str(path))


def build(out: Path, n: int, seed: int, force: bool = False) -> Path:
    out = Path(out).resolve()
    parquet = out / PARQUET_NAME
    manifest = out / MANIFEST_NAME
    params = {"n": n, "seed": seed, "format_version": FORMAT_VERSION}

    if parquet.exists() and not force:
        old = {}
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text()).get("params", {})
            except (OSError, ValueError):
                old = {}
        if old == params:
            print(f"[build_smoke_task] {parquet} exists (n={n}, seed={seed}); skipping (use --force to rebuild).")
            return parquet
        print(
            f"[build_smoke_task] {parquet} exists but was built with {old or 'unknown parameters'}, requested {params}; re-run with --force to overwrite.",
            file=sys.stderr,
        )
        sys.exit(2)

    if n < 2:
        raise SystemExit("--n must be >= 2")

    rows = build_rows(n, seed)
    out.mkdir(parents=True, exist_ok=True)
    asset_build.write_file_atomically(parquet, lambda tmp: write_parquet(rows, tmp))

    counts = Counter((r["category"], r["answer"]) for r in rows)
    info = {
        "params": params,
        "file": PARQUET_NAME,
        "split": "test",
        "sha256": asset_build.sha256_file(parquet),
        "columns": FEATURES_SPEC,
        "counts": {f"{c}/{a}": counts[(c, a)] for c in CATEGORIES for a in ("yes", "no")},
        "samples": [
            {k: r[k] for k in ("question_id", "category", "question", "answer")}
            | {"objects": r["_objects"], "size": r["_size"]}
            for r in rows
        ],
    }
    manifest.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(f"[build_smoke_task] wrote {parquet} ({n} samples, seed={seed}, sha256={info['sha256'][:12]})")
    return parquet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument(
        "--n", type=int, default=24, help="number of samples (default: 24; multiples of 6 are exactly balanced)"
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    args = ap.parse_args(argv)
    build(args.out, args.n, args.seed, args.force)


if __name__ == "__main__":
    main()
