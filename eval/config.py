"""Where the harness's files live, and the harness's Hydra config composed outside a Hydra entry point."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model weights load."""


def repo_path(path: str | Path) -> Path:
    """``path`` as is if absolute, else relative to the repository root."""
    path = Path(str(path))
    return path if path.is_absolute() else REPO_ROOT / path


def repo_relative(text: str | Path) -> str:
    """``text`` (a path or a command line) with every path under the repository written relative to its root, so
    committed results read the same on every clone."""
    return str(text).replace(f"{REPO_ROOT}/", "").replace(str(REPO_ROOT), ".")


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """configs/<config_name>.yaml composed with Hydra ``overrides`` (any Hydra state of this process is reset)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))
