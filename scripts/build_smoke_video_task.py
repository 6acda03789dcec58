#!/usr/bin/env python
"""Build a tiny, offline, MVBench-style video task: short synthetic clips and multiple-choice questions.

Writes ``<out>/videos/clip_XX.mp4`` (MPEG-4 Part 2, readable by decord and PyAV), ``<out>/test.jsonl`` and
``<out>/manifest.json``. Each clip shows a coloured shape moving across a plain background over ``--frames`` frames;
the question asks whether it moves to the right, with MVBench's fields (``video``, ``question``, ``candidates``,
``answer``) so that lmms-eval's MVBench prompt (``mvbench_doc_to_text``) and scoring work on it. ``video`` is the
clip's path relative to ``<out>``; the task ``eval/tasks/hiprune_smoke_video`` turns it into a file path, which is
what lmms-eval's video tasks hand to a model.

Deterministic for (--n, --frames, --seed); re-running with the same parameters is a no-op (use --force to rebuild).

    python -m scripts.build_smoke_video_task [--out assets/smoke_video] [--n 8] [--frames 16] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from scripts import asset_build

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "smoke_video"
FORMAT_VERSION = 1
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SIZE = (96, 72)  # width, height (even, as yuv420p needs)


def _clip(path: Path, colour: tuple[int, int, int], rightwards: bool, frames: int, rng: random.Random) -> None:
    import av
    import numpy as np

    width, height = SIZE
    background = np.array([rng.randint(150, 255) for _ in range(3)], dtype=np.uint8)
    radius, y = 8, rng.randint(12, height - 12)
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"qscale": "2"}
    yy, xx = np.mgrid[0:height, 0:width]
    for f in range(frames):
        t = f / max(frames - 1, 1)
        x = int(12 + (width - 24) * (t if rightwards else 1 - t))
        image = np.broadcast_to(background, (height, width, 3)).copy()
        image[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = colour
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def build(out: Path = DEFAULT_OUT, n: int = 8, frames: int = 16, seed: int = 0, force: bool = False) -> Path:
    out = Path(out).resolve()
    params = {"format_version": FORMAT_VERSION, "n": n, "frames": frames, "seed": seed}
    manifest = out / "manifest.json"
    if not force and manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("params") == params:
                return out
        except ValueError:
            pass
    rng = random.Random(seed)
    with asset_build.staged_directory(out) as work:
        (work / "videos").mkdir()
        docs = []
        for i in range(n):
            name = list(COLOURS)[i % len(COLOURS)]
            rightwards = i % 2 == 0
            video = f"videos/clip_{i:02d}.mp4"
            _clip(work / video, COLOURS[name], rightwards, frames, rng)
            candidates = ["yes", "no"] if rng.random() < 0.5 else ["no", "yes"]
            docs.append({
                "id": i,
                "video": video,
                "question": f"Does the {name} circle move to the right?",
                "candidates": candidates,
                "answer": "yes" if rightwards else "no",
            })
        with open(work / "test.jsonl", "w") as handle:
            handle.writelines(json.dumps(doc) + "\n" for doc in docs)
        (work / "manifest.json").write_text(json.dumps({"params": params, "docs": len(docs)}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    print(f"[build] {build(args.out, args.n, args.frames, args.seed, args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
