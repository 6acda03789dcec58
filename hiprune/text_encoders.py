"""Prompt encoders for prompt-aware methods (HiPrune++): map prompts and visual tokens into one space.

CLIP-tower families (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA) pair their vision tower with CLIP's text tower: the prompt
goes through the text transformer and ``text_projection``; visual tokens are the tower's last-layer patch features
through ``post_layernorm`` and CLIP's ``visual_projection`` (the LLaVA checkpoint has the tower but not that head, so
both heads come from the CLIP checkpoint, e.g. openai/clip-vit-large-patch14-336).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPModel

POOLINGS = ("mean", "eos")


@dataclass
class ClipPromptEncoder:
    """CLIP text tower + projections. ``pooling``: "mean" (mean of the projected token embeddings of the prompt,
    the paper's "mean text embedding", default) or "eos" (CLIP's pooled sentence embedding)."""

    text_model: nn.Module  # CLIPTextTransformer-like: returns last_hidden_state and pooler_output
    text_projection: nn.Linear
    visual_projection: nn.Linear
    tokenizer: object
    pooling: str = "mean"
    max_length: int = 77  # CLIP's context; longer prompts are truncated

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown prompt pooling {self.pooling!r}; expected one of {POOLINGS}")
        # CLIP's text tower uses causal attention and absolute positions: left padding would shift every prompt by
        # the batch's longest one, so prompt embeddings would depend on batch composition.
        self.tokenizer.padding_side = "right"

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        pooling: str = "mean", revision: str | None = None) -> ClipPromptEncoder:
        """Load a CLIP checkpoint's text tower and both projection heads (its vision tower is dropped)."""
        clip = CLIPModel.from_pretrained(path, revision=revision, dtype=dtype)
        del clip.vision_model  # the VLM has its own copy of the tower; keep only the heads
        clip.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        return cls(clip.text_model, clip.text_projection, clip.visual_projection, tokenizer, pooling)

    @property
    def device(self) -> torch.device:
        return self.text_projection.weight.device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], pooling: str | None = None) -> torch.Tensor:
        """[B, E] prompt embeddings; ``pooling`` overrides the encoder's own ("mean" or "eos")."""
        pooling = self.pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"unknown prompt pooling {pooling!r}; expected one of {POOLINGS}")
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = self.text_model(**batch)
        if pooling == "eos":
            return self.text_projection(out.pooler_output)
        projected = self.text_projection(out.last_hidden_state)  # [B, L, E]
        mask = batch["attention_mask"].unsqueeze(-1).to(projected.dtype)
        return (projected * mask).sum(1) / mask.sum(1).clamp_min(1)

    @torch.no_grad()
    def encode_patches(self, last_hidden_state: torch.Tensor, post_layernorm: nn.Module) -> torch.Tensor:
        """[B, 1 + N, D] last-layer tower output (CLS first) -> [B, N, E] projected patch features."""
        patches = post_layernorm(last_hidden_state[:, 1:])
        return self.visual_projection(patches.to(self.visual_projection.weight.dtype))
