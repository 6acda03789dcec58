"""A method built from its Hydra config, once, by the one function every tool of the harness uses (eval.running.run,
eval.efficiency.bench, eval.report.reproduce, eval.report.visualize), and whether a configured run can happen at all.

configs/method/<name>.yaml gives a method's name and options. What the method is comes from the library's registry,
``hiprune.METHODS``: its class, its stage (``hiprune.METHODS[name].stage``) and whether the harness implements it
(its name is registered). The configs of baselines the harness does not implement yet stay in configs/method/ so
that the paper's tables list them (their cells read 'not run'); building one is a :class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

import hiprune
from eval.config import ConfigError
from eval.lmms.base import lmms_model_class
from hiprune.adapters.base import family_supports_stage, unsupported_stage_message

NOT_RUN = "the table shows the paper's numbers marked 'not run'"


def is_implemented(name: str) -> bool:
    """True if the harness implements the method ``name`` (it is registered in ``hiprune.METHODS``)."""
    return name in hiprune.METHODS


def stage_of(name: str) -> str | None:
    """Where the method ``name`` reduces tokens ("none", "vision", "llm", ...), or None if it is not implemented."""
    return hiprune.METHODS[name].stage if is_implemented(name) else None


def _name_and_options(method_cfg: DictConfig | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    node = OmegaConf.to_container(method_cfg, resolve=True) if isinstance(method_cfg, DictConfig) else method_cfg
    return str(node["name"]), dict(node.get("options") or {})


def build_from_config(method_cfg: DictConfig | Mapping[str, Any], budget: int | float | None = None) -> hiprune.Method:
    """The validated method of a method config (``cfg.method``: name + options) at ``budget``.

    A method of stage "none" (the full model) takes no budget: ``budget`` is not passed to it, so a sweep over
    budgets runs it once per budget with the same identity. A method that is not implemented, an unknown option or
    an impossible setting (e.g. a budget of 0) raise :class:`ConfigError` before any model loads.
    """
    name, options = _name_and_options(method_cfg)
    if not is_implemented(name):
        raise ConfigError(f"method {name} is not implemented in the harness (hiprune.METHODS has "
                          f"{', '.join(sorted(hiprune.METHODS))}); configs/method/{name}.yaml only lists it")
    kwargs = options if stage_of(name) == "none" else {"budget": budget, **options}
    try:
        return hiprune.build_method(name, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


@lru_cache(maxsize=None)  # asked per table cell by eval.report.reproduce; the answer depends on the names only
def unsupported_reason(lmms_model: str, method: str) -> str | None:
    """Why the family of ``lmms_model`` cannot run ``method`` at all (its pruning stage), or None."""
    if not is_implemented(method):
        return None  # an unknown method fails later, when it is built, with its own message
    family = lmms_model_class(lmms_model).family
    stage = stage_of(method)
    if family_supports_stage(family, stage):
        return None
    return unsupported_stage_message(method, family, stage)


def not_implemented_notice(cfg: DictConfig) -> str | None:
    """A notice if the config names a method the harness does not implement, a model marked ``implemented: false``
    (default true), or a method whose stage the model family's adapter cannot run (e.g. FastV on Qwen2.5-VL); else
    None. Such runs are skipped, not failed: a table sweep lists every baseline of the paper."""
    model = cfg.get("model")
    if model is not None and not model.get("implemented", True):
        return f"model {model.get('name')} is not implemented in the harness; skipped — {NOT_RUN}"
    name = str(cfg.method.name)
    if not is_implemented(name):
        return f"method {name} is not implemented in the harness; skipped — {NOT_RUN}"
    reason = unsupported_reason(str(cfg.model.lmms_model), name)
    if reason:
        return f"{reason}; skipped — {NOT_RUN}"
    return None
