"""lmms-eval model class ``hiprune_llava_onevision``: an HF LLaVA-OneVision checkpoint with any harness method.

    python -m lmms_eval --model hiprune_llava_onevision \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,method=hiprune,budget=0.25 --tasks pope

Prompts as lmms-eval's own ``llava_onevision`` model (LLaVA's ``qwen_1_5`` conversation): the system prompt "You are
a helpful assistant.", one user turn "<image>\\n<question>" (the placeholder in front unless the task placed it) and an
open assistant turn, tokenised chunk-wise around ``<image>`` as LLaVA's ``tokenizer_image_token``; answers are not cut
at the task's stop strings (lmms-eval's model drops ``until``), only stripped. Images go through the checkpoint's
anyres image processor. Layout (``layout=auto``): ``method=none`` runs the standard model (native: unpad,
anyres_max_9 downsampling, newline tokens), and so do LLM-side methods (FastV, PDrop, SparseVLM: nothing is pruned
before the LLM); methods that prune before the LLM run the 'spatial' layout with per-crop budgets (see
hiprune/adapters/llava_onevision.py); the kept tokens per sample list one entry per crop grid, base first.

Multi-image samples as lmms-eval's model (LLaVA's ``image_aspect_ratio="pad"`` for several images): one placeholder
per image ("<image> <image>\\n<question>"), each image padded to a square with the mean colour and resized to 384 px,
one crop of 729 tokens pruned with the image's whole budget; no newline token in the pruning layout (LLaVA's code
encodes the stacked images without one), HF's one newline per image in the native layout (method none).
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from eval.lmms.base import HiPruneLMM
from eval.lmms.prompting import IMAGE_PLACEHOLDER, left_pad, to_rgb, tokenize_with_visuals, with_image_placeholders
from hiprune.adapters.llava_onevision import resolve_layout

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # LLaVA's conv_qwen_1_5


def qwen_conversation(question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """LLaVA's ``qwen_1_5`` conversation: system turn, one user turn, an open assistant turn."""
    return (f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


class HiPruneLlavaOnevision(HiPruneLMM):
    """LLaVA-OneVision (HF ``LlavaOnevisionForConditionalGeneration``), prompted like lmms-eval's llava_onevision."""

    family = "llava_onevision"
    kept_unit = "crop (the base image and each anyres crop)"
    default_pretrained = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    adapter_option_names = ("layout",)
    loading_options = {
        "system_prompt": DEFAULT_SYSTEM_PROMPT,
        # auto: native for method none (the standard model), official ('spatial', per-crop budgets) for pruning
        "layout": "auto",
    }

    @classmethod
    def resolve_adapter_options(cls, options, method):
        return {**options, "layout": resolve_layout(options["layout"], method)}

    def load(self, pretrained, revision, attn_implementation, system_prompt, layout):
        self.system_prompt = str(system_prompt)
        model, processor = self.load_pretrained(
            LlavaOnevisionForConditionalGeneration, pretrained, revision, attn_implementation
        )
        return model, processor

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens of the reference image (one filling the largest anyres grid)."""
        return self.session.tokens_per_image()

    def build_inputs(self, contexts, images):
        if len(contexts) != len(images):
            raise ValueError(f"{len(contexts)} prompts but {len(images)} image lists")
        adapter = self.session.adapter
        nested = [[to_rgb(image) for image in sample] for sample in images if sample]
        batch: dict[str, torch.Tensor] = {}
        layouts = []
        if nested:
            # a sample of several images: each one padded to a square and resized, one crop (HF's batch_num_images)
            pixels = self.processor.image_processor(nested, return_tensors="pt")
            batch["pixel_values"] = pixels["pixel_values"]
            batch["image_sizes"] = pixels["image_sizes"]
            batch["batch_num_images"] = pixels["batch_num_images"]
            multi = [len(sample) > 1 for sample in nested for _ in sample]
            layouts = [adapter.single_crop_layout(self.method) if m else adapter.image_layout(size, self.method)
                       for size, m in zip(pixels["image_sizes"], multi)]
        image_id = self.processor.image_token_id
        sequences, expected, cursor = [], [], 0
        for context, sample in zip(contexts, images):
            sample_layouts = layouts[cursor : cursor + len(sample)]
            cursor += len(sample)
            prompt = qwen_conversation(with_image_placeholders(context, len(sample)), self.system_prompt)
            fills = [(IMAGE_PLACEHOLDER, image_id, layout.total) for layout in sample_layouts]
            sequences.append(tokenize_with_visuals(self.tokenizer, prompt, fills))
            expected.append([kept for layout in sample_layouts for kept in layout.kept])
        batch["input_ids"], batch["attention_mask"] = left_pad(sequences, self.pad_token_id)
        return batch, expected

    def finish_answers(self, answers: list[str], until: list[str] | None) -> list[str]:
        """lmms-eval's llava_onevision drops the task's stop strings and strips the answers."""
        return [answer.strip() for answer in answers]
