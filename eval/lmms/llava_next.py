"""lmms-eval model class ``hiprune_llava_next``: an HF LLaVA-NeXT (llava-v1.6) checkpoint with any harness method.

    python -m lmms_eval --model hiprune_llava_next \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=hiprune,budget=640 --tasks pope --batch_size 4

Defaults reproduce the official HiPrune evaluation of LLaVA-NeXT (the authors' lmms-eval ``llava`` model with
``conv_template=vicuna_v1``): the vicuna_v1 conversation ("curious user" system prompt) and LLaVA's chunk-wise
tokenisation around ``<image>``; anyres preprocessing by the checkpoint's image processor (best-fit grid, black
padding, base image squashed to 336 x 336, as LLaVA's ``process_anyres_image``) with LLaVA's tie-breaking between
grids (``pinpoint_order``). Layout (``layout=auto``, the default): pruning methods run the 'spatial' layout without
unpadding or newline tokens that the authors' pruning code forces (``official``), while ``method=none`` runs the
standard model (``native``: HF's unpad + newline layout, LLaVA's ``spatial_unpad``), as the paper's vanilla rows;
``layout=official`` / ``native`` force one for every method (see hiprune/adapters/llava_next.py). The settings
recorded with a run hold the layout that ran. The expected kept tokens
per sample list one entry per crop grid (base first, then the sub-image crops), matching the adapter's records.
"""

from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from eval.lmms.base import HiPruneLMM
from eval.lmms.prompting import (
    CONVERSATION_SYSTEMS,
    IMAGE_PLACEHOLDER,
    PROMPT_STYLES,
    conversation_prompt,
    fill_placeholders,
    left_pad,
    to_rgb,
    tokenize_with_visuals,
    with_image_placeholders,
)
from hiprune.adapters.llava_next import resolve_layout


class HiPruneLlavaNext(HiPruneLMM):
    """LLaVA-NeXT (HF ``LlavaNextForConditionalGeneration``), prompted like the official evaluation."""

    family = "llava_next"
    kept_unit = "crop (the base image and each anyres crop)"
    default_pretrained = "llava-hf/llava-v1.6-vicuna-7b-hf"
    adapter_option_names = ("layout",)
    loading_options = {
        "prompt_style": "vicuna_v1",  # LLaVA's eval conversation; llava_v1 (the "curious human" wording) | hf_chat
        # auto: native for method none (the standard model, the paper's vanilla rows), official for pruning methods;
        # official ('spatial', 5 x 576 on a 2x2 grid, the authors' pruning code) | native (HF: unpad + image_newline)
        "layout": "auto",
        # official: LLaVA reads image_grid_pinpoints as (width, height), HF as (height, width); the v1.6 list is
        # symmetric, so only ties differ (a square image <= 336 px: LLaVA picks a 2x1 grid, HF a 1x2 grid).
        # "official" swaps every pinpoint in the model config and the image processor so HF breaks ties like LLaVA;
        # "checkpoint" keeps HF's reading.
        "pinpoint_order": "official",
        # CLIP checkpoint paired with the vision tower; loaded only for prompt-aware methods (HiPrune++)
        "text_tower": "openai/clip-vit-large-patch14-336",
        "prompt_pooling": "mean",
    }

    @classmethod
    def resolve_adapter_options(cls, options, method):
        return {**options, "layout": resolve_layout(options["layout"], method)}

    def load(self, pretrained, revision, attn_implementation, prompt_style, layout, pinpoint_order, text_tower,
             prompt_pooling):
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; choose one of {PROMPT_STYLES}")
        if pinpoint_order not in ("official", "checkpoint"):
            raise ValueError(f"unknown pinpoint_order {pinpoint_order!r}; choose official or checkpoint")
        self.load_clip_prompt_encoder(text_tower, prompt_pooling)
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        model = LlavaNextForConditionalGeneration.from_pretrained(
            pretrained, revision=revision, dtype=self._dtype, attn_implementation=attn_implementation
        )
        if pinpoint_order == "official":
            swapped = [[int(b), int(a)] for a, b in model.config.image_grid_pinpoints]
            model.config.image_grid_pinpoints = swapped
            processor.image_processor.image_grid_pinpoints = swapped
        self.prompt_style = prompt_style
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return model, processor

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens of the reference image (one filling the largest anyres grid, e.g. 2880 unpruned)."""
        return self.session.tokens_per_image()

    def prompt(self, context: str, n_images: int) -> str:
        question = with_image_placeholders(context, n_images)
        if self.prompt_style in CONVERSATION_SYSTEMS:
            return conversation_prompt(question, self.prompt_style)
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def build_inputs(self, contexts, images):
        if len(contexts) != len(images):
            raise ValueError(f"{len(contexts)} prompts but {len(images)} image lists")
        adapter = self.session.adapter
        flat = [to_rgb(image) for sample in images for image in sample]
        batch: dict[str, torch.Tensor] = {}
        layouts = []
        if flat:
            pixels = self.processor.image_processor(flat, return_tensors="pt")
            batch["pixel_values"] = pixels["pixel_values"]
            batch["image_sizes"] = pixels["image_sizes"]
            layouts = [adapter.image_layout(size, self.method) for size in pixels["image_sizes"]]
        image_id = self.processor.image_token_id
        sequences, expected, cursor = [], [], 0
        for context, sample in zip(contexts, images):
            sample_layouts = layouts[cursor : cursor + len(sample)]
            cursor += len(sample)
            prompt = self.prompt(context, len(sample))
            if self.prompt_style in CONVERSATION_SYSTEMS:
                fills = [(IMAGE_PLACEHOLDER, image_id, layout.total) for layout in sample_layouts]
                sequences.append(tokenize_with_visuals(self.tokenizer, prompt, fills))
            else:
                fills = [(IMAGE_PLACEHOLDER, self.processor.image_token, layout.total) for layout in sample_layouts]
                sequences.append(self.tokenizer(fill_placeholders(prompt, fills)).input_ids)
            expected.append([kept for layout in sample_layouts for kept in layout.kept])
        batch["input_ids"], batch["attention_mask"] = left_pad(sequences, self.pad_token_id)
        return batch, expected
