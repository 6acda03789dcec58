"""A method is built from its config by one function (eval.running.methods.build_from_config); what a method is
(its stage, whether the harness implements it) comes from the registry, hiprune.METHODS, not from its YAML."""

import pytest
from omegaconf import OmegaConf

import hiprune
from eval.config import CONFIG_DIR, ConfigError, compose_config
from eval.running.methods import build_from_config, is_implemented, not_implemented_notice, stage_of

METHOD_CONFIGS = sorted(CONFIG_DIR.glob("method/*.yaml"))


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_a_method_config_is_its_name_and_options_only(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and set(cfg) == {"name", "options"}, set(cfg)


def test_every_registered_method_has_a_config_and_builds_from_it():
    for name, cls in hiprune.METHODS.items():
        cfg = compose_config([f"method={name}"])
        method = build_from_config(cfg.method, budget=64)
        assert type(method) is cls and stage_of(name) == cls.stage
        expected = {"name": name, **OmegaConf.to_container(cfg.method.options, resolve=True)}
        if cls.stage != "none":
            expected["budget"] = 64
        assert {k: v for k, v in method.describe().items() if k in expected} == expected


def test_the_full_model_takes_no_budget_and_options_reach_the_method():
    assert build_from_config({"name": "none", "options": {}}, budget=192).budget is None
    method = build_from_config({"name": "hiprune", "options": {"alpha": 0.2, "buffer": "square"}}, budget=0.5)
    assert (method.budget, method.alpha, method.buffer) == (0.5, 0.2, "square")


@pytest.mark.parametrize("method_cfg, budget, message", [
    ({"name": "hiprune", "options": {}}, 0, "budget must be >= 1"),
    ({"name": "hiprune", "options": {"colour": "red"}}, 64, "no option"),
    ({"name": "fastv", "options": {}}, None, "needs a budget"),
    ({"name": "future_baseline", "options": {}}, 64, "method future_baseline is not implemented in the harness"),
])
def test_impossible_configs_are_config_errors(method_cfg, budget, message):
    with pytest.raises(ConfigError, match=message):
        build_from_config(method_cfg, budget)


def test_a_listed_baseline_is_not_implemented_and_its_runs_are_skipped():
    # every config in configs/method/ has a registered method today; a config listed before its method lands
    # (its name registered by no class) is skipped with the notice
    assert all(is_implemented(p.stem) for p in METHOD_CONFIGS)
    assert not is_implemented("future_baseline") and stage_of("future_baseline") is None
    notice = not_implemented_notice(compose_config(["method=divprune", "method.name=future_baseline"]))
    assert notice.startswith("method future_baseline is not implemented in the harness; skipped")
    assert not_implemented_notice(compose_config(["method=hiprune"])) is None
