"""Local helpers of the hiprune_smoke_video task (data: scripts/build_smoke_video_task.py)."""

import os
import string
from pathlib import Path

from lmms_eval.tasks.mvbench.utils import mcq_acc

# assets/smoke_video of this checkout (eval/tasks/hiprune_smoke_video/utils.py -> repo root), or the env override
DATA_DIR = Path(os.environ.get("HIPRUNE_SMOKE_VIDEO_DIR", Path(__file__).resolve().parents[3] / "assets" / "smoke_video"))


def smoke_video_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    path = DATA_DIR / doc["video"]
    if not path.is_file():
        raise FileNotFoundError(f"smoke video {path} is missing; build it with scripts/build_smoke_video_task.py")
    return [str(path)]


def smoke_video_process_results(doc, results):
    """MVBench's scoring (option letter), also accepting the text of the right option."""
    pred = results[0]
    letters = string.ascii_uppercase
    gt_letter = letters[doc["candidates"].index(doc["answer"])]
    score = mcq_acc(gt_letter, pred)
    if not score and pred.strip().strip(".").lower() == doc["answer"].lower():
        score = 1
    return {"mvbench_accuracy": {"pred_answer": pred, "gt_answer": gt_letter, "score": score}}
