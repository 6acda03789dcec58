"""lmms-eval model class ``hiprune_llava_next``: an HF LLaVA-NeXT (llava-v1.6) checkpoint with any harness method.

    python -m lmms_eval --model hiprune_llava_next \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=hiprune,budget=640 --tasks pope --batch_size 4

Defaults reproduce the official HiPrune evaluation of LLaVA-NeXT (the authors' lmms-eval ``llava`` model with
``conv_template=vicuna_v1``): the vicuna_v1 conversation ("curious user" system prompt) and LLaVA's chunk-wise
tokenisation around ``<image>``; anyres preprocessing as LLaVA's ``process_anyres_image`` (best-fit grid, black
padding, base image squashed to 336 x 336, PIL bicubic: HF's PIL backend, ``image_backend=pil``; ``torchvision`` /
``checkpoint`` as options) with LLaVA's tie-breaking between grids (``pinpoint_order``). Layout (``layout=auto``,
the default): pruning methods run the 'spatial' layout without unpadding or newline tokens that the authors'
pruning code forces (``official``), while ``method=none`` runs the standard model (``native``: HF's unpad +
newline layout, LLaVA's ``spatial_unpad``), as the paper's vanilla rows; ``layout=official`` / ``native`` force one
for every method (see hiprune/adapters/llava_next.py). The settings recorded with a run hold the layout that ran.
The expected kept tokens per sample list one entry per crop grid (base first, then the sub-image crops), matching
the adapter's records.
"""

from __future__ import annotations

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from eval.lmms.base import HiPruneLMM
from eval.lmms.llava import ANSWER_STYLES, llava_answers
from eval.lmms.prompting import (
    CONVERSATION_SYSTEMS,
    IMAGE_BACKENDS,
    IMAGE_PLACEHOLDER,
    PROMPT_STYLES,
    fill_placeholders,
    left_pad,
    llava_prompt,
    to_rgb,
    tokenize_with_visuals,
)
from hiprune.adapters.llava_next import resolve_layout

# the anyres settings a backend processor takes over from the checkpoint's (pinpoints as the model reads them)
_ANYRES_SETTINGS = ("size", "crop_size", "image_mean", "image_std", "resample", "do_resize", "do_center_crop",
                    "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "do_pad", "image_grid_pinpoints")


def anyres_image_processor(saved, backend: str):
    """The LLaVA-NeXT image processor of ``backend`` with the checkpoint processor's settings.

    pil: HF's PIL backend, PIL bicubic resizes on uint8 images as LLaVA's ``process_anyres_image`` (resize into the
    best-fit grid and pad black, crop; the base image squashed to the crop size); torchvision: HF's tensor backend
    (antialiased bicubic on tensors, close but not equal); checkpoint: the processor as saved."""
    if backend not in IMAGE_BACKENDS:
        raise ValueError(f"unknown image_backend {backend!r}; choose one of {IMAGE_BACKENDS}")
    if backend == "checkpoint":
        return saved
    cls = LlavaNextImageProcessorPil if backend == "pil" else LlavaNextImageProcessor
    return cls(**{k: getattr(saved, k) for k in _ANYRES_SETTINGS if getattr(saved, k, None) is not None})


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
        # pil: LLaVA's process_anyres_image (PIL bicubic), as the official evaluation | torchvision | checkpoint
        "image_backend": "pil",
        # CLIP checkpoint paired with the vision tower; loaded only for prompt-aware methods (HiPrune++)
        "text_tower": "openai/clip-vit-large-patch14-336",
        "prompt_pooling": "mean",
        "answers": "official",  # official (lmms-eval's llava: decoded as is) | cut_strip (cut at `until`, strip)
    }

    @classmethod
    def resolve_adapter_options(cls, options, method):
        return {**options, "layout": resolve_layout(options["layout"], method)}

    def load(self, pretrained, revision, attn_implementation, prompt_style, layout, pinpoint_order, image_backend,
             text_tower, prompt_pooling, answers):
        if answers not in ANSWER_STYLES:
            raise ValueError(f"unknown answers {answers!r}; choose one of {ANSWER_STYLES}")
        self.answers = answers
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; choose one of {PROMPT_STYLES}")
        if image_backend not in IMAGE_BACKENDS:
            raise ValueError(f"unknown image_backend {image_backend!r}; choose one of {IMAGE_BACKENDS}")
        if pinpoint_order not in ("official", "checkpoint"):
            raise ValueError(f"unknown pinpoint_order {pinpoint_order!r}; choose official or checkpoint")
        self.load_clip_prompt_encoder(text_tower, prompt_pooling)
        model, processor = self.load_pretrained(
            LlavaNextForConditionalGeneration, pretrained, revision, attn_implementation
        )
        if pinpoint_order == "official":
            swapped = [[int(b), int(a)] for a, b in model.config.image_grid_pinpoints]
            model.config.image_grid_pinpoints = swapped
            processor.image_processor.image_grid_pinpoints = swapped
        self.image_processor = anyres_image_processor(processor.image_processor, image_backend)
        self.prompt_style = prompt_style
        return model, processor

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens of the reference image (one filling the largest anyres grid, e.g. 2880 unpruned)."""
        return self.session.tokens_per_image()

    def prompt(self, context: str, n_images: int) -> str:
        return llava_prompt(self.processor, self.prompt_style, context, n_images)

    def finish_answers(self, answers, until):
        return llava_answers(answers, until, self.answers)

    def build_inputs(self, contexts, images):
        if len(contexts) != len(images):
            raise ValueError(f"{len(contexts)} prompts but {len(images)} image lists")
        adapter = self.session.adapter
        flat = [to_rgb(image) for sample in images for image in sample]
        batch: dict[str, torch.Tensor] = {}
        layouts = []
        if flat:
            pixels = self.image_processor(flat, return_tensors="pt")
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
