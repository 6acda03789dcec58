"""Method.selection_flops equals what torch's FlopCounterMode counts over the method's select (the projector that
merging methods call through VisionTokens.project is a free stand-in here: the family's cost, counted elsewhere)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hiprune
from hiprune.methods.base import VisionTokens

N, GRID, D, HIDDEN, KEYS, PROMPT = 144, (12, 12), 48, 40, 16, 24


def _tokens():
    g = torch.Generator().manual_seed(0)
    return VisionTokens(
        features=torch.randn(2, N, D, generator=g), grid=GRID,
        scores={"cls": torch.rand(2, N, generator=g), "importance": torch.rand(2, N, generator=g),
                "late": torch.rand(2, N, generator=g), "early": torch.rand(2, N, generator=g)},
        states={"keys": torch.randn(2, N, KEYS, generator=g), "hidden": torch.randn(2, N, HIDDEN, generator=g)},
        prompt_embeds=torch.randn(2, PROMPT, generator=g), token_embeds=torch.randn(2, N, PROMPT, generator=g),
        project=lambda states: states[..., :1].expand(*states.shape[:-1], D),  # no arithmetic
    )


@pytest.mark.parametrize("name, options", [
    ("fastervlm", {}), ("divprune", {}), ("vispruner", {}), ("vispruner", {"important_ratio": 0.75}),
    ("hired", {}), ("visionzip", {}), ("trim", {}),
])
@pytest.mark.parametrize("budget", [32, 17])
def test_selection_flops_match_the_flop_counter(name, options, budget):
    method = hiprune.build_method(name, budget=budget, **options)
    tokens = _tokens()
    with FlopCounterMode(display=False) as counter:
        method.select(tokens, budget)
    widths = {"features": D, "hidden": HIDDEN, "keys": KEYS, "prompt": PROMPT}
    assert counter.get_total_flops() == tokens.batch_size * method.selection_flops(N, budget, widths)
    if name == "divprune":
        assert method.selection_flops(N, budget, widths) == 2 * N * N * D
