"""Registers the harness's models with lmms-eval through the ``lmms_eval.models`` entry-point group."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifests() -> list[ModelManifest]:
    return [
        ModelManifest(model_id="hiprune_llava", simple_class_path="eval.lmms.llava.HiPruneLlava"),
        ModelManifest(model_id="hiprune_qwen2_5_vl", simple_class_path="eval.lmms.qwen2_5_vl.HiPruneQwen25VL"),
        ModelManifest(model_id="hiprune_llava_next", simple_class_path="eval.lmms.llava_next.HiPruneLlavaNext"),
        ModelManifest(model_id="hiprune_video_llava", simple_class_path="eval.lmms.video_llava.HiPruneVideoLlava"),
        ModelManifest(model_id="hiprune_llava_onevision",
                      simple_class_path="eval.lmms.llava_onevision.HiPruneLlavaOnevision"),
        ModelManifest(model_id="hiprune_qwen3_vl", simple_class_path="eval.lmms.qwen3_vl.HiPruneQwen3VL"),
        ModelManifest(model_id="hiprune_internvl", simple_class_path="eval.lmms.internvl.HiPruneInternVL"),
    ]
