"""Tests for scripts/build_tiny_llava.py (offline tiny random LLaVA-1.5-shaped checkpoint), built afresh in a
temporary folder (the session's assets/tiny-llava is the same build, tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from scripts import build_tiny_llava as builder


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny-llava"
    return builder.build_tiny_llava(out, seed=0)  # includes the reload + generate self-check


@pytest.fixture(scope="module")
def model(built):
    return LlavaForConditionalGeneration.from_pretrained(built, local_files_only=True).eval()


@pytest.fixture(scope="module")
def processor(built):
    return AutoProcessor.from_pretrained(built, local_files_only=True)


def _image(h=240, w=320, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _conversation(question="What color is the circle?"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_files_and_size(built):
    names = {p.name for p in built.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "build_info.json",
    ):
        assert required in names, required
    size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
    assert size < 4_000_000, size
    assert not any(p.name.startswith(".tiny-llava.tmp-") for p in built.parent.iterdir())


def test_config_geometry(model):
    cfg = model.config
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.image_size, vc.patch_size) == (336, 14)
    assert vc.image_size // vc.patch_size == 24  # 24x24 = 576 patch tokens (+ CLS)
    assert vc.num_hidden_layers == 12 and len(model.model.vision_tower.encoder.layers) == 12
    assert (vc.hidden_size, vc.intermediate_size, vc.num_attention_heads) == (32, 64, 4)
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu"
    assert cfg.image_seq_length == 576
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (64, 2, 4, 2)
    assert tc.intermediate_size == 128 and tc.max_position_embeddings == 2048
    assert next(model.parameters()).dtype == torch.float32
    assert cfg.pad_token_id is not None


def test_tokenizer_and_image_token(model, processor):
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id == processor.image_token_id
    assert tok.encode("<image>", add_special_tokens=False) == [image_id]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert model.config.text_config.vocab_size == len(tok)
    assert 500 <= len(tok) <= 1000
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok("USER: Is there a red circle? ASSISTANT: Yes").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # Llama-style BOS
    assert tok.decode(ids, skip_special_tokens=True) == "USER: Is there a red circle? ASSISTANT: Yes"
    # byte fallback: unseen characters round-trip instead of becoming <unk>
    assert tok.decode(tok("naïve ✓").input_ids, skip_special_tokens=True) == "naïve ✓"


def test_chat_template(processor):
    prompt = processor.apply_chat_template(_conversation("What is it?"), add_generation_prompt=True)
    assert prompt == builder.VICUNA_SYSTEM_PROMPT + " USER: <image>\nWhat is it? ASSISTANT:"
    multi = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        *_conversation("Q1?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A1."}]},
        {"role": "user", "content": [{"type": "text", "text": "Q2?"}]},
    ]
    assert processor.apply_chat_template(multi, add_generation_prompt=True) == (
        "Be brief. USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT:"
    )


def test_processor_expands_image_to_576_tokens(model, processor):
    prompt = processor.apply_chat_template(_conversation(), add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_img == 576
    assert inputs["input_ids"].shape[1] > 576
    ip = processor.image_processor
    assert ip.size["shortest_edge"] == 336 and (ip.crop_size["height"], ip.crop_size["width"]) == (336, 336)
    assert list(ip.image_mean) == builder.CLIP_MEAN and list(ip.image_std) == builder.CLIP_STD
    assert int(ip.resample) == 3  # bicubic


def test_pil_backend_loads_too(built):
    proc = AutoProcessor.from_pretrained(built, local_files_only=True, backend="pil")
    assert type(proc.image_processor).__name__ == "LlavaImageProcessorPil"
    assert tuple(proc.image_processor(_image(), return_tensors="pt")["pixel_values"].shape) == (1, 3, 336, 336)


def test_generate_extends_input(model, processor):
    prompt = processor.apply_chat_template(_conversation(), add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert isinstance(out, torch.Tensor)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert out[0, inputs["input_ids"].shape[1]].item() != processor.tokenizer.eos_token_id


def test_image_features_shape(model):
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=torch.zeros(1, 3, 336, 336))
    # transformers 5.x: projected features are a per-image list in `pooler_output`
    assert [tuple(f.shape) for f in feats.pooler_output] == [(576, model.config.text_config.hidden_size)]


def test_idempotent_and_deterministic(built, tmp_path):
    info = json.loads((built / "build_info.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    assert builder.build_tiny_llava(built, seed=0) == built  # complete build -> skipped: no file is rewritten
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in built.iterdir()}

    again = builder.build_tiny_llava(tmp_path / "again", seed=0, verify=False)
    info2 = json.loads((again / "build_info.json").read_text())
    assert info2["sha256"] == info["sha256"]  # byte-identical artefacts for the same seed


def test_unknown_override_rejected(tmp_path):
    with pytest.raises(TypeError):
        builder.build_tiny_llava(tmp_path / "x", seed=0, no_such_option=1)
