#!/usr/bin/env python
"""Build a tiny random-weight CLIP (text tower + projection heads) offline, paired with the tiny LLaVA.

HiPrune++ compares the prompt (CLIP text tower + text_projection) with the LLaVA vision tower's patch features
(post_layernorm + CLIP visual_projection). The real pair is openai/clip-vit-large-patch14-336; this one has the
tiny LLaVA's vision width (32) so its visual_projection fits that tower, and reuses the tiny LLaVA's tokenizer.

    python -m scripts.build_tiny_clip [--out assets/tiny-clip] [--llava assets/tiny-llava] [--force]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts import asset_build

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-clip"
DEFAULT_LLAVA = REPO_ROOT / "assets" / "tiny-llava"
MARKER = "build_info.json"


def build_tiny_clip(out_dir: Path = DEFAULT_OUT, llava_dir: Path = DEFAULT_LLAVA, seed: int = 0,
                    force: bool = False) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    out_dir = Path(out_dir)
    if (out_dir / MARKER).is_file() and not force:
        return out_dir
    llava = AutoConfig.from_pretrained(llava_dir)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    vision = llava.vision_config
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, num_hidden_layers=1,
            num_attention_heads=vision.num_attention_heads, image_size=vision.image_size, patch_size=vision.patch_size,
        ).to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with asset_build.staged_directory(out_dir) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / MARKER).write_text(json.dumps({"seed": seed, "llava": str(llava_dir.name)}, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--llava", type=Path, default=DEFAULT_LLAVA, help="tiny LLaVA whose tokenizer and tower width to match")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(f"[build] {build_tiny_clip(args.out, args.llava, force=args.force)}")


if __name__ == "__main__":
    main()
