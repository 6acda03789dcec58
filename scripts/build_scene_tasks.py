#!/usr/bin/env python
"""Write the scene benchmark splits as parquet (deterministic, idempotent): assets/scene_tasks/.

    HF_DATASETS_OFFLINE=1 python -m scripts.build_scene_tasks                 # val + test (what the tasks read)
    HF_DATASETS_OFFLINE=1 python -m scripts.build_scene_tasks --splits train,val,test

Files (one image per row for val / test; POPE's and GQA's column names, so lmms-eval's own POPE and GQA
functions read them):
    pope_{val,test}.parquet  id, question_id, question, answer (yes/no), image_source, image, category
                             (adversarial / popular / random), objects (JSON list of "colour shape")
    qa_{val,test}.parquet    same columns; answer is a colour, a shape or a count; category is the question type
                             (color / shape / count)
    train.parquet            one row per training scene (scripts/train_scene_vlm.py draws the same scenes from
                             scenes.train_scene): id, image, objects, designated question + answer (may be empty),
                             and a fixed sample of questions / answers (training draws fresh ones every epoch)

The val / test rows are exactly what scripts/train_scene_vlm.py validates and tests on (same generator, same seeds).
manifest.json records parameters, counts and sha256 of each file; an up-to-date build is skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from pathlib import Path

from scripts import asset_build, scenes

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "scene_tasks"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1

# Rows per split (val sizes match the training script's validation set, test sizes the documented accuracies).
SIZES = {"val": {"pope": 300, "qa": 300}, "test": {"pope": 600, "qa": 600}}
TRAIN_SCENES = 15000

COLUMNS = ["id", "question_id", "question", "answer", "image_source", "image", "category", "objects"]


def split_seed(split: str, kind: str) -> int:
    return scenes.SPLIT_SEEDS[split] + (1 if kind == "qa" else 0)


def rows_for(split: str, kind: str, n: int) -> list[dict]:
    make = scenes.pope_rows if kind == "pope" else scenes.qa_rows
    return make(n, split_seed(split, kind))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _objects(scene) -> str:
    return json.dumps([f"{c} {s}" for c, s in scene.classes()])


def _write(table: dict, features: dict, path: Path) -> None:
    import datasets

    feats = datasets.Features(
        {
            k: datasets.Image()
            if v == "image"
            else (datasets.Sequence(datasets.Value("string")) if v == "strings" else datasets.Value(v))
            for k, v in features.items()
        }
    )
    ds = datasets.Dataset.from_dict(table, features=feats)
    asset_build.write_file_atomically(path, lambda tmp: ds.to_parquet(str(tmp)))


def write_eval_split(rows: list[dict], path: Path) -> dict:
    table = {k: [] for k in COLUMNS}
    for r in rows:
        for k in COLUMNS:
            if k == "image":
                table[k].append({"bytes": _png(r["image"]), "path": None})
            elif k == "objects":
                table[k].append(_objects(r["scene"]))
            else:
                table[k].append(r[k])
    spec = {k: "string" for k in COLUMNS} | {"image": "image"}
    _write(table, spec, path)
    return {"rows": len(rows), "answers": dict(sorted(Counter(f"{r['category']}/{r['answer']}" for r in rows).items()))}


def write_train(n: int, path: Path) -> dict:
    table = {
        k: [] for k in ["id", "image", "objects", "designated_question", "designated_answer", "questions", "answers"]
    }
    for i, (image, qa, scene) in enumerate(scenes.train_scenes(n, k_pope=4, k_qa=2)):
        designated = scenes.train_scene(i)[1] if i % 2 else None  # cheap: same seed -> same scene and question
        table["id"].append(str(i))
        table["image"].append({"bytes": _png(image), "path": None})
        table["objects"].append(_objects(scene))
        table["designated_question"].append(designated[0] if designated else "")
        table["designated_answer"].append(designated[1] if designated else "")
        table["questions"].append([q for q, _ in qa])
        table["answers"].append([a for _, a in qa])
    spec = {
        "id": "string",
        "image": "image",
        "objects": "string",
        "designated_question": "string",
        "designated_answer": "string",
        "questions": "strings",
        "answers": "strings",
    }
    _write(table, spec, path)
    return {"rows": n}


def params_for(split: str) -> dict:
    p = {"format_version": FORMAT_VERSION, "image_size": scenes.IMAGE_SIZE}
    if split == "train":
        return p | {"scenes": TRAIN_SCENES, "seed": scenes.SPLIT_SEEDS["train"]}
    return p | {"sizes": SIZES[split], "seeds": {k: split_seed(split, k) for k in ("pope", "qa")}}


def build(out: Path = DEFAULT_OUT, splits: tuple[str, ...] = ("val", "test"), force: bool = False) -> Path:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for split in splits:
        params = params_for(split)
        entry = manifest.get(split, {})
        files = entry.get("files", {})
        if not force and entry.get("params") == params and files and all((out / f).is_file() for f in files):
            print(f"[build_scene_tasks] {split}: up to date in {out}")
            continue
        written = {}
        if split == "train":
            path = out / "train.parquet"
            written[path.name] = write_train(TRAIN_SCENES, path)
        else:
            for kind, n in SIZES[split].items():
                path = out / f"{kind}_{split}.parquet"
                written[path.name] = write_eval_split(rows_for(split, kind, n), path)
        for name, entry in written.items():
            entry["sha256"] = asset_build.sha256_file(out / name)
        manifest[split] = {"params": params, "files": written}
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        print(f"[build_scene_tasks] {split}: wrote {', '.join(written)} to {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--splits", default="val,test", help="comma-separated subset of train,val,test")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    unknown = set(splits) - {"train", "val", "test"}
    if unknown:
        ap.error(f"unknown split(s) {sorted(unknown)}")
    build(args.out, splits, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
