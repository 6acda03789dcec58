"""Every family describes how it presents visual tokens (grid, CLS, feature layer, merge) the same way."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import hiprune

REPO = Path(__file__).resolve().parents[1]

ARCHS = ["llava-1.5-7b-hf", "llava-v1.6-vicuna-7b-hf", "qwen2.5-vl-3b-instruct"]


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_encoder_of_the_real_architectures(arch):
    config = AutoConfig.from_pretrained(REPO / "configs" / "arch" / arch)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    description = hiprune.adapter_for(model).describe_encoder()
    assert {"family", "layers", "feature_layer", "grid", "cls", "merge"} <= set(description)
    if arch.startswith("llava"):
        assert description["grid"] == [24, 24] and description["layers"] == 24 and description["feature_layer"] == 23
    else:
        assert description["cls"] == "none" and description["feature_layer"] == description["layers"] == 32
