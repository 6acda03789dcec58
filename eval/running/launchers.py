"""Checks of a sweep's launcher before any job is submitted (run from eval.running.callbacks.SweepSummary).

Ray (hydra-ray-launcher, configs/hydra/launcher/ray_gpu.yaml): a job asking for resources that no node of the cluster
has waits forever (the stock ``ray_gpu`` config on a machine without a GPU hangs). The check starts or joins the
cluster exactly as the launcher would (``hydra.launcher.ray.init``; the launcher then finds Ray running and reuses it)
and refuses the sweep, naming what is missing, unless some live node holds what one job asks for
(``hydra.launcher.ray.remote``: num_gpus, num_cpus, memory, resources). An autoscaling cluster that would add such
a node is refused too: start the node first.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval.config import ConfigError

RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"


def job_demand(remote: dict[str, Any]) -> dict[str, float]:
    """Ray resources one job asks for, from ``hydra.launcher.ray.remote`` (Ray's default for a task: 1 CPU)."""
    demand = {"CPU": float(remote.get("num_cpus", 1) or 0), "GPU": float(remote.get("num_gpus", 0) or 0),
              "memory": float(remote.get("memory", 0) or 0)}
    demand.update({k: float(v) for k, v in (remote.get("resources") or {}).items()})
    return {k: v for k, v in demand.items() if v > 0}


def unmet_demand(demand: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """Why no live node can run a job with ``demand`` (ray.nodes() entries), or None if one can."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(all(resources.get(k, 0) >= v for k, v in demand.items()) for resources in alive):
        return None
    have = ", ".join(f"{k}={max((r.get(k, 0) for r in alive), default=0):g}" for k in demand)
    want = ", ".join(f"{k}={v:g}" for k, v in demand.items())
    return (f"each job asks Ray for {want} (hydra.launcher.ray.remote) but no node of the cluster has that "
            f"(the most on one of its {len(alive)} live node(s): {have}); the jobs would wait forever. Lower "
            f"hydra.launcher.ray.remote (e.g. num_gpus=0 with device=cpu), or join a cluster with such nodes "
            f"(hydra.launcher.ray.init.address=auto)")


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def check_ray(config: DictConfig) -> None:
    """Start or join the Ray cluster as the launcher will, and refuse a sweep whose jobs no node can run."""
    import ray  # deferred on purpose: the launchers extra is optional, and Ray is a heavy import

    init, remote = (_plain(OmegaConf.select(config, f"hydra.launcher.ray.{key}")) for key in ("init", "remote"))
    init.setdefault("object_store_memory", 78643200)  # as the launcher sets it
    if not ray.is_initialized():
        ray.init(**init)
    reason = unmet_demand(job_demand(remote), ray.nodes())
    if reason:
        raise ConfigError(reason)


def check_launcher(config: DictConfig) -> None:
    """Launcher-specific checks before the first job is submitted (a ConfigError names what to change)."""
    if str(OmegaConf.select(config, "hydra.launcher._target_") or "") == RAY_LAUNCHER:
        check_ray(config)
