"""Official LLaVA-1.5 prompt and tokenisation, image mode handling, left padding."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from eval.lmms.llava import HiPruneLlava, llava_answers
from eval.lmms.llava_next import HiPruneLlavaNext
from eval.lmms.prompting import (
    LlavaInputBuilder,
    conversation_prompt,
    left_pad,
    to_rgb,
    tokenize_with_images,
    with_image_placeholders,
)
from eval.lmms.video_llava import HiPruneVideoLlava
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.utils import load_yaml_config

REPO = Path(__file__).resolve().parents[1]
# LLaVA's llava/conversation.py, typed in: conv_vicuna_v1 (the LLaVA-1.5 / LLaVA-NeXT evaluation scripts'
# --conv-mode vicuna_v1) and conv_llava_v1 (Video-LLaVA's evaluation; the models trained here)
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_vicuna_v1_prompt_matches_llava_conversation_format():
    prompt = conversation_prompt(with_image_placeholders("Is there a dog?", 1))
    assert prompt == f"{VICUNA_V1} USER: <image>\nIs there a dog? ASSISTANT:"
    assert conversation_prompt("Q", "llava_v1") == f"{LLAVA_V1} USER: Q ASSISTANT:"
    with pytest.raises(ValueError, match="conversation"):
        conversation_prompt("Q", "hf_chat")
    assert with_image_placeholders("<image>\nQ", 1) == "<image>\nQ"  # the task placed it already
    assert with_image_placeholders("Q", 2) == "<image> <image>\nQ"
    assert with_image_placeholders("Q", 0) == "Q"


def test_system_prompt_defaults_real_checkpoints_vicuna_v1_models_trained_here_pinned(tiny_llava):
    """LLaVA-1.5 / LLaVA-NeXT default to conv_vicuna_v1 ("curious user"); Video-LLaVA to its llava_v1; the models
    trained or built here keep the "curious human" prompt they were built with, pinned in their own model config."""
    _, processor = tiny_llava
    assert LlavaInputBuilder(processor).prompt("Is it red?", 1) == f"{VICUNA_V1} USER: <image>\nIs it red? ASSISTANT:"
    assert LlavaInputBuilder(processor, prompt_style="llava_v1").prompt("Q", 0) == f"{LLAVA_V1} USER: Q ASSISTANT:"
    assert HiPruneLlava.loading_options["prompt_style"] == "vicuna_v1"
    assert HiPruneLlavaNext.loading_options["prompt_style"] == "vicuna_v1"
    assert HiPruneVideoLlava.loading_options["prompt_style"] == "llava_v1"
    styles = {name: OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml").get("prompt_style")
              for name in ("llava15_7b", "llava15_13b", "llava_next_7b", "video_llava_7b",
                           "scene_llava", "tiny_llava", "tiny_llava_next", "tiny_video_llava")}
    assert styles == {"llava15_7b": "vicuna_v1", "llava15_13b": "vicuna_v1", "llava_next_7b": "vicuna_v1",
                      "video_llava_7b": "llava_v1", "scene_llava": "llava_v1", "tiny_llava": "llava_v1",
                      "tiny_llava_next": "llava_v1", "tiny_video_llava": "llava_v1"}
    assert "prompt_style" not in OmegaConf.load(REPO / "configs" / "model" / "llava_next_13b.yaml")  # inherits 7b's


# LLaVA-1.5's TextVQA question file (llava_textvqa_val_v051_ocr.jsonl, question 34602) as its script prompts with it
LLAVA_TEXTVQA_34602 = ("What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, "
                       "Pire, digitat\nAnswer the question using a single word or phrase.")


def test_textvqa_benchmark_prompts_llava_families_with_the_ocr_tokens():
    """benchmark=textvqa renders LLaVA's TextVQA script prompt (question, OCR-token line, short-answer instruction)
    for the LLaVA families through lmms-eval's own task machinery; other models, and lmms-eval's plain textvqa_val
    (benchmark=textvqa_no_ocr), get lmms-eval's default without OCR tokens. The sample is local (tests/data)."""
    bench = OmegaConf.load(REPO / "configs" / "benchmark" / "textvqa.yaml")
    assert list(bench.tasks) == ["hiprune_textvqa_val"] and bench.include_path == "eval/tasks"
    assert list(OmegaConf.load(REPO / "configs" / "benchmark" / "textvqa_no_ocr.yaml").tasks) == ["textvqa_val"]
    config = load_yaml_config(str(REPO / "eval" / "tasks" / "hiprune_textvqa" / "hiprune_textvqa_val.yaml"))
    assert config["dataset_path"] == "lmms-lab/textvqa" and config["test_split"] == "validation"
    config.update(dataset_path="json", dataset_kwargs={
        "data_files": {"validation": str(REPO / "tests" / "data" / "textvqa_sample" / "validation.jsonl")}})
    rendered = {}
    for name in ("hiprune_llava", "hiprune_llava_next", "hiprune_qwen2_5_vl", None):  # the registered names
        task = ConfigurableTask(config=copy.deepcopy(config), model_name=name)
        rendered[name] = task.doc_to_text(task.test_docs()[0])
    assert rendered["hiprune_llava"] == rendered["hiprune_llava_next"] == LLAVA_TEXTVQA_34602
    no_ocr = "What is the brand of this camera?\nAnswer the question using a single word or phrase."
    assert rendered["hiprune_qwen2_5_vl"] == rendered[None] == no_ocr
    # the whole prompt the LLaVA-1.5 model builds from it (vicuna_v1, image first)
    assert conversation_prompt(with_image_placeholders(rendered["hiprune_llava"], 1)) == (
        f"{VICUNA_V1} USER: <image>\n{LLAVA_TEXTVQA_34602} ASSISTANT:")


def test_chunkwise_tokenisation_splices_image_tokens(tiny_llava):
    _, processor = tiny_llava
    tok = processor.tokenizer
    prompt = "USER: <image>\nIs it red? ASSISTANT:"
    ids = tokenize_with_images(tok, prompt, image_token_id=processor.image_token_id, tokens_per_image=5)
    head = tok("USER: ").input_ids
    tail = tok("\nIs it red? ASSISTANT:").input_ids[1:]  # the chunk's own BOS is dropped
    assert ids == head + [processor.image_token_id] * 5 + tail
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK", "1"])
def test_any_image_mode_becomes_rgb(mode):
    base = Image.fromarray((np.arange(60 * 40) % 251).reshape(40, 60).astype("uint8"))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray((np.arange(2400).reshape(40, 60) * 27).astype("uint16"))
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (60, 40)
    if mode == "I;16":  # 16-bit is rescaled, not clipped to white
        assert 0 < np.asarray(out).mean() < 255


def test_builder_pads_to_square_with_the_mean_colour(tiny_llava):
    _, processor = tiny_llava
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    batch = LlavaInputBuilder(processor)(["Q"], [[wide]], tokens_per_image=576)
    pixels = batch["pixel_values"][0]
    # top rows are padding: mean colour normalises to ~0 in every channel; the centre row is the black image
    assert pixels[:, 5].abs().max() < 0.02
    assert pixels[:, 168].mean() < -1.5
    cropped = LlavaInputBuilder(processor, image_backend="checkpoint")(["Q"], [[wide]], tokens_per_image=576)
    assert cropped["pixel_values"][0][:, 5].mean() < -1.5  # HF's processor centre-crops the black image instead


def test_builder_batches_samples_without_images(tiny_llava):
    _, processor = tiny_llava
    image = Image.new("RGB", (50, 50), (10, 200, 30))
    batch = LlavaInputBuilder(processor)(["with", "without"], [[image], []], tokens_per_image=7)
    assert batch["pixel_values"].shape[0] == 1
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 7
    assert torch.equal(batch["attention_mask"].sum(1) > 0, torch.tensor([True, True]))


def test_builder_rejects_unknown_options(tiny_llava):
    _, processor = tiny_llava
    with pytest.raises(ValueError, match="prompt_style"):
        LlavaInputBuilder(processor, prompt_style="alpaca")
    with pytest.raises(ValueError, match="image_backend"):
        LlavaInputBuilder(processor, image_backend="opencv")


def test_llava_answers_are_returned_as_lmms_evals_llava_class_returns_them(tiny_llava_dir):
    """answers=official (the default, LLaVA-1.5 and LLaVA-NeXT): the decoded new tokens as they are, neither cut at
    the task's `until` strings nor stripped (lmms-eval's llava class; lmms-eval strips before scoring);
    answers=cut_strip: cut at the first stop string, stripped."""
    decoded = [" Yes ASSISTANT: no\n", "two\n\nthree "]
    assert llava_answers(decoded, ["ASSISTANT:", "\n\n"], "official") == decoded
    assert llava_answers(decoded, ["ASSISTANT:", "\n\n"], "cut_strip") == ["Yes", "two"]
    assert llava_answers(decoded, None, "cut_strip") == ["Yes ASSISTANT: no", "two\n\nthree"]
    with pytest.raises(ValueError, match="answers"):
        llava_answers(decoded, None, "strip")
    assert HiPruneLlava.loading_options["answers"] == HiPruneLlavaNext.loading_options["answers"] == "official"
    for style, expected in [("official", decoded), ("cut_strip", ["Yes", "two"])]:
        lmm = HiPruneLlava(pretrained=str(tiny_llava_dir), method="none", device="cpu", answers=style)
        try:
            assert lmm.finish_answers(decoded, ["ASSISTANT:", "\n\n"]) == expected
        finally:
            lmm.close()
    with pytest.raises(ValueError, match="answers"):
        HiPruneLlava(pretrained=str(tiny_llava_dir), method="none", device="cpu", answers="strip")
