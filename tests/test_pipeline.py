"""The pipeline every family shares (hiprune.adapters.base): budget splits, requests of keys and hidden states,
merged tokens and what the session records."""

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import hiprune
from eval.lmms.prompting import LlavaInputBuilder
from hiprune.adapters.base import split_budget, spread_budget, stack_selections
from hiprune.methods.base import FEATURE_LAYER, Method, Request, Selection, VisionTokens, gather_tokens, top_k


# --- one budget split --------------------------------------------------------------------------------------------
def test_split_budget_rules():
    assert split_budget(192, [576]) == [192]
    assert split_budget(0.5, [576, 100, 3]) == [288, 50, 2]  # a ratio of every grid, round half to even
    assert split_budget(640, [576] * 5, "crop") == [128] * 5
    assert split_budget(643, [576] * 5, "crop") == [128] * 5  # int(N' / grids): the rest is not handed out
    assert split_budget(640, [576, 48, 48, 576, 576], "crop", "fill") == spread_budget(640, [576, 48, 48, 576, 576])
    with pytest.raises(ValueError, match=r"int\(4 / 5 crops\) = 0 tokens per crop \(why\); use a budget of at least 5"):
        split_budget(4, [576] * 5, "crop", why="why")
    with pytest.raises(ValueError, match=r"int\(4000 / 5 crops\) = 800 tokens per crop but a crop has only 576"):
        split_budget(4000, [576] * 5, "crop")
    with pytest.raises(ValueError, match="only 576"):
        split_budget(600, [576])
    with pytest.raises(ValueError, match="unknown budget split"):
        split_budget(10, [576, 576], rule="spread")


# --- requests: keys and hidden states ------------------------------------------------------------------------------
@dataclass
class KeysAndStates(Method):
    """Test method: keeps the top tokens of the CLS row and remembers every VisionTokens it was shown."""

    name: ClassVar[str] = "keys_and_states"
    stage: ClassVar[str] = "vision"
    layer: int = 5
    seen: list = field(default_factory=list)

    def requests(self):
        return {
            "cls": Request("attention", FEATURE_LAYER, "cls"),
            "keys": Request("keys", self.layer),
            "hidden": Request("hidden", self.layer),
        }

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        self.seen.append(tokens)
        indices = top_k(tokens.scores["cls"], budget).sort(dim=1).values
        return Selection(indices, gather_tokens(tokens.features, indices))


def test_keys_hidden_states_and_cls_row_reach_the_method(tiny_llava, shape_images):
    model, processor = tiny_llava
    adapter = hiprune.adapter_for(model)
    pixels = processor.image_processor(shape_images, return_tensors="pt")["pixel_values"]
    tower = model.model.vision_tower
    method = KeysAndStates(budget=32)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states  # [0] = embeddings, [k] = output of layer k
        with hiprune.apply(model, method) as session:
            model.model.get_image_features(pixels)
    tokens = method.seen[0]
    assert set(tokens.scores) == {"cls"} and set(tokens.states) == {"keys", "hidden"}

    layer = adapter.layer_module(method.layer)
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[method.layer - 1]))
    heads = model.config.vision_config.num_attention_heads
    expected_keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)[:, 1:]  # heads averaged, CLS dropped
    torch.testing.assert_close(tokens.states["keys"], expected_keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.states["hidden"], hidden[method.layer][:, 1:], rtol=0, atol=0)

    eager = model.model.vision_tower
    eager_attn = eager.config._attn_implementation
    try:
        eager.set_attn_implementation("eager")
        with torch.no_grad():
            attentions = eager(pixels, output_attentions=True).attentions
    finally:
        eager.set_attn_implementation(eager_attn)
    cls_row = attentions[adapter.feature_layer() - 1][:, :, 0, 1:].mean(dim=1)  # CLS query, heads averaged
    torch.testing.assert_close(tokens.scores["cls"], cls_row, rtol=1e-5, atol=1e-7)
    assert [r.tokens_kept for r in session.records[0]] == [32, 32, 32]


def test_cls_requests_are_refused_on_an_encoder_without_cls():
    class NoCls(hiprune.adapters.base.Adapter):
        family = "no_cls"
        has_cls = False

        def num_encoder_layers(self):
            return 4

        def feature_layer(self):
            return 4

    with pytest.raises(ValueError, match="has none"):
        NoCls(torch.nn.Linear(1, 1)).check_supported(KeysAndStates(budget=4, layer=2))
    with pytest.raises(ValueError, match="layers 1..4"):
        NoCls(torch.nn.Linear(1, 1)).check_supported(KeysAndStates(budget=4, layer=5))


# --- merged tokens -------------------------------------------------------------------------------------------------
@dataclass
class NearestMerge(Method):
    """Test merging method: the top tokens by global attention are representatives; every other token merges into
    the representative nearest in raster index (ties: the lower one); each passed-on token is its group's mean."""

    name: ClassVar[str] = "nearest_merge"
    stage: ClassVar[str] = "vision"

    def requests(self):
        return {"deep": Request("attention", FEATURE_LAYER)}

    def select(self, tokens: VisionTokens, budget: int) -> Selection:
        indices = top_k(tokens.scores["deep"], budget).sort(dim=1).values  # [B, K]
        n = tokens.num_tokens
        distance = (torch.arange(n).view(1, n, 1) - indices.unsqueeze(1)).abs()  # [B, N, K]
        sources = distance.argmin(dim=2)  # first minimum: the lower representative
        one_hot = torch.nn.functional.one_hot(sources, budget).to(tokens.features.dtype)  # [B, N, K]
        features = one_hot.transpose(1, 2) @ tokens.features / one_hot.sum(dim=1).unsqueeze(-1)
        return Selection(indices, features, sources=sources)


def test_merged_features_reach_the_llm_and_sources_are_recorded(tiny_llava, shape_images):
    model, processor = tiny_llava
    method = NearestMerge(budget=48)
    questions = ["What is in the image?"] * 2
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            with hiprune.apply(model, method) as session:
                batch = LlavaInputBuilder(processor)(questions, [[im] for im in shape_images[:2]],
                                                     session.tokens_per_image())
                model(**batch)
            plain = torch.stack(list(model.model.get_image_features(batch["pixel_values"]).pooler_output))
    finally:
        hook.remove()
    records = session.records[0]
    for b, record in enumerate(records):
        assert record.sources is not None and record.sources.shape == (576,)
        assert set(record.sources.tolist()) == set(range(48))  # every slot has a member
        expected = torch.stack([plain[b][record.sources == k].mean(dim=0) for k in range(48)])
        image = batch["input_ids"][b] == model.config.image_token_id
        torch.testing.assert_close(seen[0][b][image], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(session.last_selection.sources, torch.stack([r.sources for r in records]))
    assert torch.equal(session.last_selection.indices, torch.stack([r.indices for r in records]))


def test_merge_map_of_a_pure_selection():
    selection = Selection(torch.tensor([[1, 3]]), torch.zeros(1, 2, 1))
    assert selection.merge_map(5).tolist() == [[-1, 0, -1, 1, -1]]


def test_stacked_selections_need_equal_counts():
    a = Selection(torch.tensor([[0, 2]]), torch.zeros(1, 2, 3), {"x": torch.tensor([[True, False]])})
    b = Selection(torch.tensor([[1, 4]]), torch.ones(1, 2, 3), {"x": torch.tensor([[False, False]])})
    c = Selection(torch.tensor([[1]]), torch.ones(1, 1, 3))
    stacked = stack_selections([a, b])
    assert stacked.indices.tolist() == [[0, 2], [1, 4]] and stacked.roles["x"].tolist() == [[True, False], [False, False]]
    assert stack_selections([a, c]) is None and stack_selections([]) is None


# --- encoder stage: merging between vision-encoder layers ------------------------------------------------------------
@dataclass
class MergeNeighbours(Method):
    """Test encoder-stage method: in each layer, patch tokens (2i, 2i+1) merge for i < merges; the rest follow."""

    name: ClassVar[str] = "merge_neighbours"
    stage: ClassVar[str] = "encoder"
    slots_override: object = None

    def merge_schedule(self, num_patches, budget, layers, protected=1):
        total = num_patches - budget
        return [total // layers + (1 if i < total % layers else 0) for i in range(layers)]

    def merge(self, tokens, merges):
        if self.slots_override is not None:
            return self.slots_override
        batch, length = tokens.sizes.shape
        p = tokens.protected
        j = torch.arange(length - p)
        slot = torch.where(j < 2 * merges, j // 2, j - merges) + p
        return torch.cat([torch.arange(p), slot]).expand(batch, length)


def test_encoder_merging_step_is_a_size_weighted_mean_with_proportional_attention():
    from hiprune.adapters.base import EncoderMerging

    merging = EncoderMerging(MergeNeighbours(budget=2), num_patches=4, layers=2, protected=1)
    merging.expect(2)
    assert merging.schedule == [1, 1] and merging.attention_bias(torch.float32) is None
    hidden = torch.tensor([[[9.0], [1.0], [3.0], [5.0], [7.0]]])  # CLS, p0..p3
    out = merging.step(1, hidden, keys=torch.zeros(1, 5, 1))  # p0+p1 -> slot 1 (mean 2), p2 -> 2, p3 -> 3
    assert out.tolist() == [[[9.0], [2.0], [5.0], [7.0]]]
    assert merging.sizes.tolist() == [[1.0, 2.0, 1.0, 1.0]]
    bias = merging.attention_bias(torch.float32)
    assert torch.allclose(bias, torch.tensor([1.0, 2.0, 1.0, 1.0]).log().view(1, 1, 1, 4))
    out = merging.step(2, out, keys=torch.zeros(1, 4, 1))  # (p0+p1) with size 2 and p2: (2*2 + 5) / 3 = 3
    assert out.tolist() == [[[9.0], [3.0], [7.0]]] and merging.sizes.tolist() == [[1.0, 3.0, 1.0]]
    (first,) = merging.finish()
    assert first.indices.tolist() == [0, 3] and first.sources.tolist() == [0, 0, 0, 1]


def test_encoder_merging_rejects_bad_slots_and_schedules():
    from hiprune.adapters.base import EncoderMerging, PruningError

    bad = MergeNeighbours(budget=2, slots_override=torch.tensor([[1, 0, 2, 3, 3]]))  # CLS moved
    merging = EncoderMerging(bad, num_patches=4, layers=2, protected=1)
    merging.expect(2)
    with pytest.raises(PruningError, match="protected"):
        merging.step(1, torch.zeros(1, 5, 1), torch.zeros(1, 5, 1))
    empty = MergeNeighbours(budget=2, slots_override=torch.tensor([[0, 1, 1, 1, 1]]))
    merging = EncoderMerging(empty, num_patches=4, layers=2, protected=1)
    merging.expect(2)
    with pytest.raises(PruningError, match="empty"):
        merging.step(1, torch.zeros(1, 5, 1), torch.zeros(1, 5, 1))

    class Short(MergeNeighbours):
        def merge_schedule(self, num_patches, budget, layers, protected=1):
            return [1] * layers

    with pytest.raises(ValueError, match="summing to 4 - 1"):
        EncoderMerging(Short(budget=1), num_patches=4, layers=2, protected=1).expect(1)


def test_encoder_merging_in_llava_passes_exactly_the_budget_and_batches_agree(tiny_llava, shape_images):
    model, processor = tiny_llava
    pixels = processor.image_processor(shape_images, return_tensors="pt")["pixel_values"]
    method = MergeNeighbours(budget=64)
    with torch.no_grad(), hiprune.apply(model, method, processor) as session:
        assert session.tokens_per_image() == 64
        batched = model.model.get_image_features(pixels).pooler_output
        singles = [model.model.get_image_features(pixels[i : i + 1]).pooler_output[0] for i in range(3)]
        text = processor(text="USER: <image>\nWhat is it? ASSISTANT:", images=shape_images[0], return_tensors="pt")
        assert int((text["input_ids"] == model.config.image_token_id).sum()) == 64
        answer = model.generate(**text, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert answer.shape[1] == text["input_ids"].shape[1] + 3
    for row, single in zip(batched, singles):
        assert row.shape[0] == 64
        torch.testing.assert_close(row, single, rtol=1e-4, atol=1e-5)
    record = session.records[0]
    assert [(r.tokens_in, r.tokens_kept) for r in record] == [(576, 64)] * 3
    for r in record:  # the schedule merges neighbour pairs: every output token stands for >= 1 patch
        assert sorted(set(r.sources.tolist())) == list(range(64))
        assert torch.equal(r.indices, torch.stack([torch.nonzero(r.sources == k)[0, 0] for k in range(64)]))
    assert "forward" not in vars(hiprune.adapter_for(model).layer_module(1))  # restored
