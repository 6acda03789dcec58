"""lmms-eval model class ``hiprune_qwen3_vl``: an HF Qwen3-VL checkpoint with any harness method installed.

    python -m lmms_eval --model hiprune_qwen3_vl \\
        --model_args pretrained=Qwen/Qwen3-VL-8B-Instruct,method=hiprune,budget=0.334 --tasks pope --batch_size 8

As ``hiprune_qwen2_5_vl`` (eval/lmms/qwen2_5_vl.py), following lmms-eval 0.7.3's own ``qwen3_vl`` model: the system
prompt "You are a helpful assistant.", every image before the question in one user turn, the checkpoint's chat
template; each image resized by qwen-vl-utils' ``fetch_image`` with Qwen3-VL's patch size (16: sides multiples of 32)
within ``min_pixels`` / ``max_pixels`` (lmms-eval's 256*28*28 and 1605632), passed on as a decoded image (lmms-eval's
qwen3_vl hands PIL images over: no JPEG round trip, ``jpeg_quality=0``); 128 new tokens unless the task sets
``max_new_tokens``, "\\n\\n" dropped from the stop strings and answers cut at the others, not stripped. Budgets are
ratios of each image's merged tokens or absolute counts; the DeepStack features of the kept tokens go with them
(hiprune/adapters/qwen3_vl.py). Not reproduced: lmms-eval's ``_strip_thinking`` for reasoning checkpoints (the
Instruct models answer without a thinking block).
"""

from __future__ import annotations

from transformers import Qwen3VLForConditionalGeneration

from eval.lmms.qwen2_5_vl import HiPruneQwen25VL


class HiPruneQwen3VL(HiPruneQwen25VL):
    """Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``), prompted and preprocessed like lmms-eval's qwen3_vl."""

    family = "qwen3_vl"
    default_pretrained = "Qwen/Qwen3-VL-8B-Instruct"
    model_class = Qwen3VLForConditionalGeneration
    loading_options = {**HiPruneQwen25VL.loading_options, "jpeg_quality": 0}  # lmms-eval's qwen3_vl: PIL images as is
