"""Registers the harness's models with lmms-eval through the ``lmms_eval.models`` entry-point group."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifests() -> list[ModelManifest]:
    return [ModelManifest(model_id="hiprune_llava", simple_class_path="eval.lmms_model.HiPruneLlava")]
