"""The baselines that act before the LLM (FasterVLM, VisionZip, DivPrune, VisPruner, HiRED, TRIM) and ToMe (inside the
vision encoder) through lmms-eval, on every family's tiny model: each runs ``simple_evaluate`` on a local task where
the family defines it, and the records (``kept_tokens``) must hold what the LLM really received -- the image / video
placeholders of every prefill, counted at the LLM's input. Where a family cannot run a method, the lmms-eval model
refuses it before anything loads, saying why.

Cheap by design: one tiny model per family (the conftest's, shared: the lmms-eval model's loader is pointed at it), one
document per run, one new token.
"""

from __future__ import annotations

import pytest
import transformers
from conftest import built, loaded

from eval.config import REPO_ROOT
from eval.lmms.llava import HiPruneLlava
from eval.lmms.llava_next import HiPruneLlavaNext
from eval.lmms.qwen2_5_vl import HiPruneQwen25VL
from eval.lmms.video_llava import HiPruneVideoLlava
from hiprune.methods.visionzip import qwen_split

pytestmark = pytest.mark.slow

FRAMES = 4
# family -> (lmms-eval model class, its transformers class, local task, loading options, budget)
FAMILIES = {
    "llava": (HiPruneLlava, "LlavaForConditionalGeneration", "hiprune_smoke_pope", {}, 64),
    "llava_next": (HiPruneLlavaNext, "LlavaNextForConditionalGeneration", "hiprune_smoke_pope",
                   {"pinpoint_order": "checkpoint"}, 160),  # "official" would swap the shared model's pinpoints
    "qwen2_5_vl": (HiPruneQwen25VL, "Qwen2_5_VLForConditionalGeneration", "hiprune_smoke_pope",
                   {"min_pixels": 64 * 28 * 28}, 0.334),
    "video_llava": (HiPruneVideoLlava, "VideoLlavaForConditionalGeneration", "hiprune_smoke_video",
                    {"num_frames": FRAMES}, 128),  # 32 per frame of 256 (ToMe needs room to merge)
}
# method -> options on Qwen2.5-VL (its model configs choose the global-attention ports: configs/model/qwen25vl_*.yaml)
QWEN_OPTIONS = {"visionzip": {"variant": "global"}, "vispruner": {"attention": "global"}}
RUNS = {
    "llava": ["fastervlm", "visionzip", "divprune", "vispruner", "hired", "trim", "tome"],
    "llava_next": ["fastervlm", "visionzip", "divprune", "vispruner", "hired", "trim", "tome"],
    "qwen2_5_vl": ["visionzip", "divprune", "vispruner"],
    "video_llava": ["fastervlm", "visionzip", "divprune", "vispruner", "hired", "trim", "tome"],
}
REFUSED = {  # (family, method, options) -> why
    ("qwen2_5_vl", "fastervlm", ()): "scores by the CLS token's attention; the qwen2_5_vl encoder has none",
    ("qwen2_5_vl", "hired", ()): "scores by the CLS token's attention; the qwen2_5_vl encoder has none",
    ("qwen2_5_vl", "vispruner", ()): "has none .*vispruner attention=global",
    ("qwen2_5_vl", "visionzip", ()): "has none .*visionzip variant=global",
    ("qwen2_5_vl", "trim", ()): "CLIP text tower paired with the vision tower; the qwen2_5_vl encoder has none",
    ("qwen2_5_vl", "tome", ()): "merges inside the vision encoder.*windowed attention",
    ("llava", "visionzip", (("variant", "global"),)): "own rule",
}


def _reuse_loaded_model(monkeypatch, family: str) -> None:
    """The lmms-eval model's ``from_pretrained`` returns the conftest's model of the family (loaded once)."""
    model, _ = loaded(family)
    cls = getattr(transformers, FAMILIES[family][1])
    monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda klass, *args, **kwargs: model))


def _placeholders(model, family: str):
    """Hooks that record, per prefill row, the image / video placeholder tokens at the LLM's input (and on
    Qwen2.5-VL the merged tokens of the row's image, from the patch grid its vision tower encoded)."""
    token = model.config.video_token_id if family == "video_llava" else model.config.image_token_id
    counts: list[int] = []
    merged: list[int] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            counts.extend((ids == token).sum(1).tolist())

    def grid(module, args, kwargs):
        merged.extend(int(g.prod()) // 4 for g in kwargs.get("grid_thw", args[1] if len(args) > 1 else None))

    hooks = [model.model.register_forward_pre_hook(count, with_kwargs=True)]
    if family == "qwen2_5_vl":
        hooks.append(model.model.visual.register_forward_pre_hook(grid, with_kwargs=True))
    return counts, merged, hooks


@pytest.fixture(scope="module")
def tasks():
    """lmms-eval's task index with the local tasks: built once (it reads every task yaml lmms-eval has)."""
    from eval.running.run import task_manager

    return task_manager(str(REPO_ROOT / "eval" / "tasks"))


@pytest.mark.parametrize("family", sorted(RUNS))
def test_each_method_runs_through_lmms_eval(family, tasks, monkeypatch, smoke_task_dir, smoke_video_dir,
                                            tiny_clip_dir):
    from lmms_eval.evaluator import simple_evaluate

    lmm_class, _, task, loading, budget = FAMILIES[family]
    if family != "qwen2_5_vl":
        loading = {**loading, "text_tower": str(tiny_clip_dir)}  # TRIM's paired CLIP text tower
    model, _ = loaded(family)
    _reuse_loaded_model(monkeypatch, family)
    for name in RUNS[family]:
        options = QWEN_OPTIONS.get(name, {}) if family == "qwen2_5_vl" else {}
        lmm = lmm_class(pretrained=str(built(family)), method=name, budget=budget, device="cpu", batch_size=1,
                        **loading, **options)
        counts, merged, hooks = _placeholders(model, family)
        try:
            results = simple_evaluate(model=lmm, tasks=[task], limit=1, batch_size=1, bootstrap_iters=0,
                                      task_manager=tasks, gen_kwargs="max_new_tokens=1")
        finally:
            for hook in hooks:
                hook.remove()
            lmm.close()
        assert results["results"][task], (family, name)
        kept = lmm.kept_tokens[(task, "test")]
        assert len(kept) == 1 and len(counts) == 1, (family, name, kept, counts)
        # what the records say each document's visuals passed on is what the LLM's input held (video frames carry
        # their CLS token on top of the method's tokens)
        totals = sorted(sum(k) + (len(k) if family == "video_llava" else 0) for k in kept.values())
        assert totals == sorted(counts), (family, name, kept, counts)
        for per_grid in kept.values():
            _check_counts(family, name, budget, per_grid)
        if family == "qwen2_5_vl":  # N' = round(rho * n) of the image's n merged tokens; VisionZip's port: d + C
            [n] = merged
            assert counts == [sum(qwen_split(budget, n)) if name == "visionzip" else round(budget * n)], (name, n)


def _check_counts(family: str, name: str, budget, per_grid: list[int]) -> None:
    """One document's per-grid counts, as the method's rule on the family gives them."""
    if family == "llava":
        assert per_grid == [budget], name  # VisionZip's CLS in front counts; TRIM's aggregate is in the budget
    elif family == "llava_next":
        equal = [budget // len(per_grid)] * len(per_grid)  # int(N' / crops) each: the image's total
        assert sum(per_grid) == sum(equal) and len(per_grid) >= 3, name  # base + crops
        if name == "hired":  # the image's budget split by the base crop's attention: the base keeps alpha = 1/2
            assert per_grid[0] == sum(equal) // 2 and per_grid != equal, (name, per_grid)
        else:
            assert per_grid == equal, (name, per_grid)
    elif family == "video_llava":  # per frame; VisionZip's CLS is the frame's own, which every frame carries
        assert per_grid == [budget // FRAMES - (name == "visionzip")] * FRAMES, (name, per_grid)
    else:
        assert len(per_grid) == 1, name  # one merged grid per image


@pytest.mark.parametrize("family, name, options", sorted(REFUSED))
def test_refused_before_loading(family, name, options, tmp_path):
    lmm_class, _, _, loading, _ = FAMILIES[family]
    missing = tmp_path / "not-a-checkpoint"  # loading would fail differently: the refusal must come first
    with pytest.raises(ValueError, match=REFUSED[(family, name, options)]):
        lmm_class(pretrained=str(missing), method=name, budget=0.334, device="cpu", **loading, **dict(options))
