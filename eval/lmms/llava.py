"""lmms-eval model class ``hiprune_llava``: an HF LLaVA-1.5 checkpoint with any harness method installed.

    python -m lmms_eval --model hiprune_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=hiprune,budget=192 --tasks pope --batch_size 8

Prompts and images as the official LLaVA-1.5 evaluation builds them by default (eval/lmms/prompting.py).
"""

from __future__ import annotations

from transformers import AutoProcessor, LlavaForConditionalGeneration

from eval.lmms.base import HiPruneLMM, cut_and_strip
from eval.lmms.prompting import LlavaInputBuilder

# how a decoded answer is returned: "official" as lmms-eval's llava model class (the authors' evaluation of LLaVA-1.5
# and LLaVA-NeXT) returns it, the decoded new tokens as they are (its cut at the task's `until` strings is commented
# out; lmms-eval strips every answer before scoring); "cut_strip" cuts at the first stop string of `until` and strips
ANSWER_STYLES = ("official", "cut_strip")


def llava_answers(answers: list[str], until: list[str] | None, style: str) -> list[str]:
    """Decoded answers post-processed as ``style`` (ANSWER_STYLES) says."""
    if style == "official":
        return list(answers)
    if style == "cut_strip":
        return cut_and_strip(answers, until)
    raise ValueError(f"unknown answers {style!r}; choose one of {ANSWER_STYLES}")


class HiPruneLlava(HiPruneLMM):
    """LLaVA-1.5 (HF ``LlavaForConditionalGeneration``), prompted and preprocessed like the official evaluation."""

    family = "llava"
    default_pretrained = "llava-hf/llava-1.5-7b-hf"
    loading_options = {
        "prompt_style": "vicuna_v1",  # LLaVA's eval conversation; llava_v1 (the "curious human" wording) | hf_chat
        "image_backend": "pil",
        "pad_to_square": True,
        # CLIP checkpoint paired with the vision tower; loaded only for prompt-aware methods (HiPrune++)
        "text_tower": "openai/clip-vit-large-patch14-336",
        "prompt_pooling": "mean",
        "answers": "official",  # official (lmms-eval's llava: decoded as is) | cut_strip (cut at `until`, strip)
    }

    def load(self, pretrained, revision, attn_implementation, prompt_style, image_backend, pad_to_square,
             text_tower, prompt_pooling, answers):
        if answers not in ANSWER_STYLES:
            raise ValueError(f"unknown answers {answers!r}; choose one of {ANSWER_STYLES}")
        self.answers = answers
        self.load_clip_prompt_encoder(text_tower, prompt_pooling)

        processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        self.inputs = LlavaInputBuilder(
            processor, prompt_style=prompt_style, image_backend=image_backend, pad_to_square=pad_to_square
        )
        self.pad_token_id = self.inputs.pad_id
        model = LlavaForConditionalGeneration.from_pretrained(
            pretrained, revision=revision, dtype=self._dtype, attn_implementation=attn_implementation
        )
        return model, processor

    @property
    def tokens_per_image(self) -> int:
        return self.session.tokens_per_image()

    def finish_answers(self, answers, until):
        return llava_answers(answers, until, self.answers)

    def build_inputs(self, contexts, images):
        keep = self.tokens_per_image
        return self.inputs(contexts, images, keep), [[keep] * len(sample) for sample in images]
