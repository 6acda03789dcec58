"""Hydra entry point: a run writes one complete record; reruns skip; bad configs fail before any model loads."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from hydra.errors import MissingConfigException

import hiprune
from eval.config import REPO_ROOT, ConfigError, compose_config
from eval.running import run as run_module
from eval.running.store import iter_records

pytestmark = pytest.mark.slow


EXTRA_CONFIG_DIR = None  # a config folder searched besides configs/ (llm_side_probe_method sets it per test)


def _cfg(*overrides):
    search = [f"hydra.searchpath=[file://{EXTRA_CONFIG_DIR}]"] if EXTRA_CONFIG_DIR else []
    return compose_config([*search, *overrides])


def _tiny(store, *overrides):
    return _cfg("model=tiny_llava", "benchmark=smoke_pope", "device=cpu", f"store={store}", *overrides)


def test_run_writes_one_complete_record_and_resumes(tmp_path, tiny_llava_dir, smoke_task_dir):
    cfg = _tiny(tmp_path, "method=hiprune", "budget=64", "limit=6", "batch_size=3")
    path = run_module.run(cfg)
    [(found, record)] = list(iter_records(tmp_path))
    assert found == path
    assert record["identity"]["method"] == {
        "name": "hiprune", "budget": 64, "alpha": 0.1, "object_layer": 9, "boundary": "clamp", "buffer": "cross",
        "attention": "global", "registers": "deep",
    }
    metrics = record["metrics"]["hiprune_smoke_pope"]
    assert 0.0 <= metrics["pope_accuracy"] <= 1.0 and "pope_f1_score" in metrics
    assert record["n_samples"]["hiprune_smoke_pope"] == 6
    assert record["visual_tokens"]["mean_kept_per_image"] == 64
    assert record["visual_tokens"]["images"] == 6
    assert record["config"]["model"]["name"] == "tiny_llava"
    assert record["flops"]["mean_visual_tokens"] == 64 and record["flops"]["samples"] == 6
    assert 0 < record["flops"]["tflops_fastv"] < record["flops"]["tflops_exact"]
    assert {"torch", "transformers", "lmms-eval"} <= set(record["versions"])

    stamp = path.stat().st_mtime_ns
    assert run_module.run(cfg) == path  # exists: skipped
    assert path.stat().st_mtime_ns == stamp


BAD = [
    (["method=hiprune", "budget=0"], "budget must be >= 1"),
    (["method=hiprune", "budget=1000"], "only 576"),
    (["method=hiprune", "budget=1.5"], "ratio"),
    (["method=hiprune", "method.options.alpha=2"], "alpha"),
    (["method=hiprune", "method.options.object_layer=50"], "layers 1..12"),
    (["method=hiprune", "budget=8", "method.options.alpha=1.0"], "exceed"),
    (["method=hiprune", "+method.options.colour=red"], "no option"),
    (["method=random", "model.pretrained=assets/no-such-model"], "not found"),
    (["benchmark.tasks=[no_such_task]"], "unknown lmms-eval task"),
    (["benchmark.include_path=tests/data/tasks_missing_data", "benchmark.tasks=[hiprune_missing_data]"], "is missing"),
    (["method=prompt_llm_probe", "budget=32"], "prunes inside the LLM"),
    # late or opaque failures before issue 17, now one line before loading
    (["method=none", "device=foo"], "is not a device"),
    (["method=none", "limit=0"], "must be >= 1"),
    (["method=none", "limit=-1"], "must be >= 1"),
    (["method=none", "limit=abc"], "give an int >= 1"),
    (["method=none", "limit=1.5"], "fraction"),
    (["method=none", "batch_size=abc"], "batch_size='abc' must be an int"),
    (["method=none", "model.pad_to_square=maybe"], "pad_to_square='maybe' must be true or false"),
    (["method=none", "broken_images=ignore"], "broken_images"),
    (["method=none", "benchmark.tasks=[pope]", "benchmark.include_path=null"], "hub dataset .* not in the local cache"),
    (["method=none", "model.pretrained=llava-hf/no-such-model", "model.local=false"], "not in the local Hugging Face cache"),
    (["method=hiprune_pp", "model.text_tower=openai/clip-vit-large-patch14-336"], "has none"),
    *([] if torch.cuda.is_available() else [(["method=none", "device=cuda"], "no CUDA GPU is visible")]),
    (["method=fastv", "budget=64", "model.compile=true"], "compile=true needs a fixed sequence length"),
]


@pytest.fixture(autouse=True)
def llm_side_probe_method(monkeypatch, tmp_path):
    """A registered LLM-side method, so the 'impossible for this family' check has something to reject."""
    @dataclasses.dataclass
    class LlmSideProbe(hiprune.Method):
        name = "prompt_llm_probe"
        stage = "llm"

    monkeypatch.setitem(hiprune.METHODS, "prompt_llm_probe", LlmSideProbe)
    method_dir = tmp_path.parent / f"{tmp_path.name}-configs" / "method"
    method_dir.mkdir(parents=True, exist_ok=True)
    (method_dir / "prompt_llm_probe.yaml").write_text("name: prompt_llm_probe\noptions: {}\n")
    monkeypatch.setitem(globals(), "EXTRA_CONFIG_DIR", method_dir.parent)


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_config_is_rejected_before_any_model_loads(tmp_path, tiny_llava_dir, smoke_task_dir, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load for a bad config")

    monkeypatch.setattr("eval.lmms.llava.HiPruneLlava.__init__", no_loading)
    with pytest.raises(ConfigError, match=message) as error:
        run_module.run(_tiny(tmp_path, *overrides))
    assert not any(tmp_path.iterdir())
    if "text_tower=openai" in " ".join(overrides):
        assert "make assets" not in str(error.value)  # a hub id is not an asset to build


def test_a_float_limit_is_a_fraction_and_recorded_as_such(tmp_path, tiny_llava_dir, smoke_task_dir):
    plan = run_module.plan_run(_tiny(tmp_path, "method=none", "limit=0.5"))
    assert plan.identity["limit"] == 0.5
    assert run_module.describe_limit(0.5)["meaning"].startswith("fraction of each task")
    assert run_module.describe_limit(4)["meaning"].startswith("documents per task")


def test_cli_sweep_and_cli_error(tmp_path, tiny_llava_dir, smoke_task_dir):
    base = ["model=tiny_llava", "benchmark=smoke_pope", "device=cpu", f"store={tmp_path}", "limit=4"]
    sweep = subprocess.run(
        [sys.executable, "-m", "eval.running.run", "--multirun", *base, "method=none,random", "budget=32",
         f"hydra.sweep.dir={tmp_path}/hydra"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    records = [record for _, record in iter_records(tmp_path / "tiny_llava")]
    assert sorted((r["identity"]["method"]["name"], r["visual_tokens"]["mean_kept_per_image"]) for r in records) == [
        ("none", 576), ("random", 32)
    ]

    bad = subprocess.run([sys.executable, "-m", "eval.running.run", *base, "method=hiprune", "budget=-3"], check=False,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "configuration error: budget must be >= 1" in bad.stderr
    assert len(list(iter_records(tmp_path / "tiny_llava"))) == 2


@pytest.mark.parametrize("override", ["method=fastest", "model=llava99", "benchmark=imagenet"])
def test_unknown_model_method_or_benchmark_is_a_composition_error(tmp_path, override):
    with pytest.raises(MissingConfigException):
        _tiny(tmp_path, override)


@pytest.mark.parametrize(("overrides", "layout"), [
    (["method=none"], "native"),  # the paper's vanilla rows: the standard model
    (["method=hiprune", "budget=320"], "official"),  # pruned rows: the authors' 'spatial' layout
    (["method=none", "model.layout=official"], "official"),
    (["method=hiprune", "budget=320", "model.layout=native"], "native"),
])
def test_llava_next_layout_auto_is_resolved_per_method_and_recorded(tmp_path, tiny_llava_next_dir, smoke_task_dir,
                                                                     overrides, layout):
    cfg = _cfg("model=tiny_llava_next", "benchmark=smoke_pope", "device=cpu", f"store={tmp_path}", *overrides)
    plan = run_module.plan_run(cfg)
    assert plan.encoder["layout"] == layout  # recorded with the run
    assert plan.identity["loading"]["layout"] == layout
    assert plan.model_args["layout"] == layout


def test_llava_next_unknown_layout_is_a_config_error(tmp_path, tiny_llava_next_dir, smoke_task_dir):
    cfg = _cfg("model=tiny_llava_next", "benchmark=smoke_pope", "device=cpu", f"store={tmp_path}", "method=none",
               "model.layout=spatial")
    with pytest.raises(ConfigError, match="layout"):
        run_module.plan_run(cfg)
