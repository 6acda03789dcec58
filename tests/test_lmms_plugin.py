"""lmms-eval integration: the registered model name runs the local task; failures stop the run."""

import json
import subprocess
import sys

import pytest
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model

import hiprune
from eval.config import REPO_ROOT
from eval.lmms.base import GenerationError
from eval.lmms.llava import HiPruneLlava
from eval.running.run import task_manager

pytestmark = pytest.mark.slow


def test_entry_point_registers_the_model():
    assert get_model("hiprune_llava") is HiPruneLlava


def test_lmms_eval_cli_runs_registered_model_on_local_task(tmp_path, tiny_llava_dir, smoke_task_dir):
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "hiprune_llava",
        "--model_args", f"pretrained={tiny_llava_dir},method=hiprune,budget=64,device=cpu",
        "--tasks", "hiprune_smoke_pope", "--include_path", str(REPO_ROOT / "eval" / "tasks"),
        "--limit", "6", "--batch_size", "3", "--output_path", str(tmp_path),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [results_file] = list(tmp_path.rglob("*_results.json"))
    results = json.loads(results_file.read_text())["results"]["hiprune_smoke_pope"]
    assert 0.0 <= results["pope_accuracy,none"] <= 1.0
    assert "pope_f1_score,none" in results


def test_exception_inside_the_method_fails_the_run(tiny_llava_dir, smoke_task_dir, monkeypatch):
    def broken(self, tokens, budget):
        raise ValueError("injected fault in selection")

    model = HiPruneLlava(pretrained=str(tiny_llava_dir), method="hiprune", budget=64, device="cpu", batch_size=2)
    monkeypatch.setattr(hiprune.HiPrune, "select", broken)
    try:
        with pytest.raises(GenerationError, match="injected fault in selection") as info:
            simple_evaluate(
                model=model, tasks=["hiprune_smoke_pope"], limit=4,
                task_manager=task_manager(str(REPO_ROOT / "eval" / "tasks")), bootstrap_iters=0,
            )
    finally:
        model.close()
    assert "hiprune_smoke_pope" in str(info.value) and "doc ids" in str(info.value)


def test_bad_method_options_fail_before_the_model_loads(tmp_path):
    # pretrained does not exist: the method check must fire first
    with pytest.raises(ValueError, match="no option"):
        HiPruneLlava(pretrained=str(tmp_path / "missing"), method="hiprune", budget=64, colour="red")
    with pytest.raises(ValueError, match="unknown method"):
        HiPruneLlava(pretrained=str(tmp_path / "missing"), method="fastest")
    # a method the harness built from its config goes in as is; options beside it would be ignored, so they fail
    with pytest.raises(ValueError, match="already built method 'hiprune'"):
        HiPruneLlava(pretrained=str(tmp_path / "missing"), method=hiprune.build_method("hiprune", budget=64), alpha=0.2)


def test_a_built_method_is_the_one_the_model_runs(tiny_llava_dir):
    method = hiprune.build_method("random", budget=32, seed=3)
    model = HiPruneLlava(pretrained=str(tiny_llava_dir), method=method, device="cpu")
    try:
        assert model.method is method and model.settings["method"] == method.describe()
        assert model.tokens_per_image == 32
    finally:
        model.close()


def test_list_options_are_semicolon_separated(tmp_path):
    from eval.lmms.base import list_option

    assert list_option("2;8;16") == [2, 8, 16] and list_option("0.5;0.25;0.125") == [0.5, 0.25, 0.125]
    assert list_option("true;none;x") == [True, None, "x"] and list_option("2") == "2" and list_option(3) == 3
    assert list_option("none") is None and list_option("null") is None
    # the list reaches the method, which validates it before the (missing) model would load
    with pytest.raises(ValueError, match="strictly increasing, got \\[8, 2\\]"):
        HiPruneLlava(pretrained=str(tmp_path / "missing"), method="pdrop", budget=64, layers="8;2")
