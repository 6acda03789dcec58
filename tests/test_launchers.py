"""Sweeps through the Hydra launchers of the launchers extra (pip install -e '.[launchers]', installed by CI):
two tiny jobs through submitit's local executor and through a local Ray cluster give the same records as a plain
run; a Ray cluster that cannot run a job (the stock ray_gpu config on a machine without a GPU) is refused before
anything is submitted instead of hanging."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from eval.config import REPO_ROOT, ConfigError
from eval.running.launchers import RAY_LAUNCHER, check_launcher, job_demand, unmet_demand
from eval.running.store import iter_records

def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # no hydra_plugins package at all: no launcher plugin is installed
        return True


MISSING = {name: _missing(module) for name, module in
           [("submitit", "hydra_plugins.hydra_submitit_launcher"), ("ray", "hydra_plugins.hydra_ray_launcher")]}


def _needs(name):
    return pytest.mark.skipif(MISSING[name], reason=f"the launchers extra is not installed (no hydra {name} launcher "
                                                    f"plugin): pip install -e '.[launchers]'")


def test_a_job_no_ray_node_can_hold_is_refused_naming_what_is_missing():
    demand = job_demand({"num_gpus": 1, "num_cpus": 4})
    assert demand == {"CPU": 4.0, "GPU": 1.0}
    cpu_node = {"Alive": True, "Resources": {"CPU": 16.0, "memory": 1e10}}
    reason = unmet_demand(demand, [cpu_node, {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}}])
    assert "CPU=4, GPU=1" in reason and "GPU=0" in reason and "wait forever" in reason
    assert unmet_demand(demand, [cpu_node, {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]) is None
    assert unmet_demand(job_demand({}), [cpu_node]) is None  # Ray's default: one CPU


@_needs("ray")
def test_the_ray_check_runs_before_a_ray_sweep(monkeypatch):
    import ray  # the optional extra: imported only where it is installed

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a running (fake) cluster with CPUs only
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    config = OmegaConf.create({"hydra": {"launcher": {"_target_": RAY_LAUNCHER,
                                                      "ray": {"init": {}, "remote": {"num_gpus": 1}}}}})
    with pytest.raises(ConfigError, match="GPU=1"):
        check_launcher(config)
    config.hydra.launcher.ray.remote.num_gpus = 0
    check_launcher(config)


def _sweep(tmp_path, *launcher):
    # run's main by import: the launchers pickle the task function, which must not be __main__
    command = [sys.executable, "-c", "from eval.running.run import main; main()", "--multirun", "model=tiny_llava",
               "benchmark=smoke_pope", "device=cpu", f"store={tmp_path}", "limit=1", "method=none,random",
               "budget=32", f"hydra.sweep.dir={tmp_path}/hydra", *launcher]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2 ran (of 2 planned)" in done.stdout
    records = [record for _, record in iter_records(tmp_path / "tiny_llava")]
    assert sorted((r["identity"]["method"]["name"], r["visual_tokens"]["mean_kept_per_image"]) for r in records) == [
        ("none", 576), ("random", 32)]


@pytest.mark.slow
@_needs("submitit")
def test_two_jobs_through_submitit_local(tmp_path, tiny_llava_dir, smoke_task_dir):
    _sweep(tmp_path, "hydra/launcher=submitit_local_gpu", "hydra.launcher.cpus_per_task=1")


@pytest.mark.slow
@_needs("ray")
def test_two_jobs_through_a_local_ray_cluster(tmp_path, tiny_llava_dir, smoke_task_dir):
    _sweep(tmp_path, "hydra/launcher=ray_gpu", "hydra.launcher.ray.remote.num_gpus=0",
           "hydra.launcher.ray.remote.num_cpus=1", "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false")
