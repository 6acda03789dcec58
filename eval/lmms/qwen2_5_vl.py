"""lmms-eval model class ``hiprune_qwen2_5_vl``: an HF Qwen2.5-VL checkpoint with any harness method installed.

    python -m lmms_eval --model hiprune_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-3B-Instruct,method=hiprune,budget=0.334,object_layer=16 \\
        --tasks pope --batch_size 8

Prompts and images are prepared as lmms-eval's own ``qwen2_5_vl`` model does: a system message "You are a helpful
assistant.", then one user turn with every image before the question ("<image>" placeholders removed from the
question), the checkpoint's chat template with the generation prompt; each image is saved as a JPEG and resized by
qwen-vl-utils' ``fetch_image``. The JPEG quality is 75 by default, PIL's default quality, as the authors' lmms-eval copy
saves each image (the protocol of the paper's Qwen2.5-VL numbers); lmms-eval 0.7.3 encodes its data URLs at quality
85 (``jpeg_quality=85``), and ``jpeg_quality=0`` passes the decoded image on with no round trip. Images are resized
within ``min_pixels`` / ``max_pixels`` (lmms-eval's defaults 256*28*28 and 1605632), and the processor is loaded with
the same limits. Unlike lmms-eval's model, batches larger than 1 run together with left padding (lmms-eval pads on the
right at batch size 1; a single sample has no padding, so this changes nothing), and every failure stops the run.

Budgets are ratios of each image's merged tokens (``budget=0.334``: N' = round(n * 0.334)) or absolute counts; the
kept count per image is checked after every batch. ``positions=original|compact`` chooses how kept tokens are placed
(see hiprune.adapters.qwen2_5_vl).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import SizeDict

from eval.lmms.base import HiPruneLMM, resolve_device

try:  # optional: fetch_image below carries a copy of what it needs
    from qwen_vl_utils import fetch_image as library_fetch_image
except ImportError:
    library_fetch_image = None

# lmms-eval 0.7.3 lmms_eval/models/simple/qwen2_5_vl.py
DEFAULT_MIN_PIXELS = 256 * 28 * 28
DEFAULT_MAX_PIXELS = 1605632
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The authors' lmms-eval copy saves each image with PIL's default JPEG quality (75) before the processor; lmms-eval
# 0.7.3's data URLs use 85.
DEFAULT_JPEG_QUALITY = 75
LMMS_EVAL_JPEG_QUALITY = 85
# lmms-eval's qwen2_5_vl generation: 128 new tokens unless the task sets max_new_tokens (the authors' copy; 0.7.3 has
# 32768), and "\n\n" is never a stop string (it would cut Qwen's answers short)
DEFAULT_MAX_NEW_TOKENS = 128


class HiPruneQwen25VL(HiPruneLMM):
    """Qwen2.5-VL (HF ``Qwen2_5_VLForConditionalGeneration``), prompted and preprocessed like lmms-eval's qwen2_5_vl."""

    family = "qwen2_5_vl"
    default_pretrained = "Qwen/Qwen2.5-VL-3B-Instruct"
    model_class = Qwen2_5_VLForConditionalGeneration  # Qwen3-VL's class reuses this one (eval/lmms/qwen3_vl.py)
    adapter_option_names = ("positions", "window_scores")
    default_max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    loading_options = {
        "min_pixels": DEFAULT_MIN_PIXELS,
        "max_pixels": DEFAULT_MAX_PIXELS,
        "system_prompt": DEFAULT_SYSTEM_PROMPT,
        "jpeg_quality": DEFAULT_JPEG_QUALITY,  # 0: pass the decoded image on as is (no JPEG round trip)
        "positions": "original",  # original (kept tokens keep their M-RoPE positions) | compact
        # windowed vision blocks (non-default layers only): image (official flash path: all of the image's patches,
        # no window mask) | window (each window on its own)
        "window_scores": "image",
    }

    def __init__(self, *args: Any, dtype: str = "auto", device: str = "auto", **kwargs: Any) -> None:
        # Qwen2.5-VL is trained and served in bfloat16; float16 (the base class's "auto" on CUDA) can overflow.
        if dtype == "auto":
            dtype = "bfloat16" if resolve_device(device).startswith("cuda") else "float32"
        super().__init__(*args, dtype=dtype, device=device, **kwargs)

    def load(self, pretrained, revision, attn_implementation, min_pixels, max_pixels, system_prompt, jpeg_quality,
             positions, window_scores):
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.system_prompt = str(system_prompt)
        self.jpeg_quality = int(jpeg_quality)
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [0, 100] (0: no JPEG round trip), got {jpeg_quality}")
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        # lmms-eval passes min_pixels / max_pixels to from_pretrained, which transformers 5 routes through a deprecated
        # per-call path; setting the image processor's size is the same limit on the resize.
        processor.image_processor.size = SizeDict(shortest_edge=self.min_pixels, longest_edge=self.max_pixels)
        self.patch_size = int(processor.image_processor.patch_size)
        self.merge_size = int(processor.image_processor.merge_size)
        self.pad_token_id = processor.tokenizer.pad_token_id
        model = self.model_class.from_pretrained(
            pretrained, revision=revision, dtype=self._dtype, attn_implementation=attn_implementation
        )
        return model, processor

    @property
    def tokens_per_image(self) -> None:
        """None: the number of visual tokens depends on each image's size (kept counts are logged per image)."""
        return None

    def build_inputs(self, contexts, images):
        messages, resized = [], []
        for context, sample in zip(contexts, images):
            content = [{"type": "image", "image": "<pil>", "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
                       for _ in sample]
            content.append({"type": "text", "text": context.replace("<image>", "")})
            messages.append([{"role": "system", "content": self.system_prompt}, {"role": "user", "content": content}])
            resized.extend(self.prepare_image(image) for image in sample)
        texts = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = self.processor(
            text=texts, images=resized or None, padding=True, padding_side="left", return_tensors="pt"
        )
        grids = iter(batch["image_grid_thw"]) if resized else iter(())
        adapter = self.session.adapter
        expected = [[adapter.tokens_for_grid(self.method, next(grids)) for _ in sample] for sample in images]
        return dict(batch), expected

    def finish_answers(self, answers: list[str], until: list[str] | None) -> list[str]:
        """lmms-eval's qwen2_5_vl: the stop strings default to the end-of-text token, "\\n\\n" is dropped from them,
        and each answer is cut at every remaining stop string in turn, with no stripping."""
        stops = [self.tokenizer.decode(self.tokenizer.eos_token_id)] if until is None else until
        stops = [stop for stop in stops if stop != "\n\n"]
        finished = []
        for answer in answers:
            for stop in stops:
                if stop:
                    answer = answer.split(stop)[0]
            finished.append(answer)
        return finished

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """lmms-eval's path: a JPEG round trip (``jpeg_quality``; 0: none), then qwen-vl-utils' fetch_image resize."""
        if self.jpeg_quality:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=self.jpeg_quality)
            source: Any = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        else:
            source = image
        return fetch_image(
            {"image": source, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
            patch_size=self.patch_size,
            merge_size=self.merge_size,
        )


def fetch_image(element: dict, patch_size: int = 14, merge_size: int = 2) -> Image.Image:
    """qwen-vl-utils' ``fetch_image`` (what lmms-eval's process_vision_info calls); a copy when it is not installed.

    The copy decodes a PIL image or a base64 data URL, converts to RGB (white background for RGBA) and resizes with
    PIL's default filter to the ``smart_resize`` size (multiples of patch_size * merge_size within the pixel limits).
    """
    if library_fetch_image is not None and merge_size == 2:
        return library_fetch_image(element, image_patch_size=patch_size)

    image = element["image"]
    if isinstance(image, str):
        if not image.startswith("data:image") or "base64," not in image:
            raise ValueError("only PIL images and base64 data URLs are supported without qwen-vl-utils")
        image = Image.open(io.BytesIO(base64.b64decode(image.split("base64,", 1)[1])))
        image.load()
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    else:
        image = image.convert("RGB")
    width, height = image.size
    h, w = smart_resize(height, width, patch_size * merge_size, element["min_pixels"], element["max_pixels"])
    return image.resize((w, h))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize: sides multiples of ``factor``, area within the limits, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
