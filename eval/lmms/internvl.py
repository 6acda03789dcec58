"""lmms-eval model class ``hiprune_internvl``: an HF InternVL3 checkpoint (``-hf``) with any harness method installed.

    python -m lmms_eval --model hiprune_internvl \\
        --model_args pretrained=OpenGVLab/InternVL3-8B-hf,method=hiprune,budget=0.25 --tasks pope --batch_size 4

As lmms-eval 0.7.3's ``internvl_hf`` chat model: one user turn with every image before the question, the
checkpoint's chat template with the generation prompt, dynamic tiling by the checkpoint's processor with
``min_patches=1`` / ``max_patches=12`` tiles (plus the thumbnail), 1024 new tokens unless the task sets
``max_new_tokens``, greedy, answers decoded without cutting at stop strings or stripping. "<image>" placeholders in
the question are removed (the images go first). Budgets are per tile (hiprune/adapters/internvl.py): a ratio of every
tile, or an int N' per image split int(N' / tiles) over its tiles; prompt-aware methods (hiprune_pp) compare every
tile with its own sample's question. The kept tokens per sample list one entry per tile, in tile order (thumbnail last
of each image).
"""

from __future__ import annotations

from transformers import InternVLForConditionalGeneration

from eval.lmms.base import HiPruneLMM
from eval.lmms.prompting import IMAGE_PLACEHOLDER, to_rgb

# lmms-eval's internvl_hf
DEFAULT_MIN_PATCHES = 1
DEFAULT_MAX_PATCHES = 12


class HiPruneInternVL(HiPruneLMM):
    """InternVL3 (HF ``InternVLForConditionalGeneration``), prompted and tiled like lmms-eval's internvl_hf."""

    family = "internvl"
    kept_unit = "tile (every 448-px tile and the thumbnail)"
    default_pretrained = "OpenGVLab/InternVL3-8B-hf"
    loading_options = {"min_patches": DEFAULT_MIN_PATCHES, "max_patches": DEFAULT_MAX_PATCHES}
    adapter_option_names = ("max_patches",)  # the most-tiled image, for the int budget check before patching

    def load(self, pretrained, revision, attn_implementation, min_patches, max_patches):
        self.min_patches, self.max_patches = int(min_patches), int(max_patches)
        if not 1 <= self.min_patches <= self.max_patches:
            raise ValueError(f"need 1 <= min_patches <= max_patches, got {min_patches} and {max_patches}")
        model, processor = self.load_pretrained(
            InternVLForConditionalGeneration, pretrained, revision, attn_implementation
        )
        return model, processor

    @property
    def tokens_per_image(self) -> None:
        """None: the number of visual tokens depends on each image's tile count (kept counts are logged per tile)."""
        return None

    def build_inputs(self, contexts, images):
        if len(contexts) != len(images):
            raise ValueError(f"{len(contexts)} prompts but {len(images)} image lists")
        texts = []
        for context, sample in zip(contexts, images):
            content = [{"type": "image"}] * len(sample)
            content.append({"type": "text", "text": context.replace(IMAGE_PLACEHOLDER, "")})
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True))
        flat = [to_rgb(image) for sample in images for image in sample]
        batch = self.processor(text=texts, images=flat or None, padding=True, padding_side="left",
                               return_tensors="pt", min_patches=self.min_patches, max_patches=self.max_patches,
                               crop_to_patches=True)
        # tiles per image, as the (patched) processor recorded them; the adapter checks them against input_ids
        adapter = self.session.adapter
        recorded = adapter.recorded_tiles if flat else []
        if recorded is None or len(recorded) != len(flat):
            raise ValueError(f"the processor recorded the tiles of {recorded} images for {len(flat)} images")
        tiles = iter(recorded)
        expected = [[keep for _ in sample for keep in adapter.tile_keeps(self.method, next(tiles))]
                    for sample in images]
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        return batch, expected

    def finish_answers(self, answers: list[str], until: list[str] | None) -> list[str]:
        """lmms-eval's internvl_hf returns the decoded answers as they are (no stop strings, no stripping)."""
        return list(answers)
