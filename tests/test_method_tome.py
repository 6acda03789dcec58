"""ToMe (hiprune/methods/tome.py): the specification's golden merge, the exact schedule, properties, and the
encoder-stage pipeline on the tiny models."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import hiprune
from hiprune.adapters.base import EncoderMerging
from hiprune.methods.tome import ToMe, exact_schedule, tome_slots


def test_golden_merge_from_the_specification():
    # keys CLS (1,0), x1 (0,1), x2 (0.6,0.8), x3 (1,0), x4 (0.6,-0.8); r = 1. A = [CLS, x2, x4], B = [x1, x3];
    # s(x2) = 0.8 -> x1, s(x4) = 0.6 -> x3: x2 merges into x1. Output [CLS, x4, x1' = (2 + 6) / 2, x3].
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.6, -0.8]]])
    slots = tome_slots(keys, merges=1)
    assert slots.tolist() == [[0, 2, 2, 3, 1]]
    merging = EncoderMerging(ToMe(budget=3), num_patches=4, layers=1, protected=1)
    merging.expect(3)
    hidden = torch.tensor([[[0.0], [2.0], [6.0], [3.0], [5.0]]])
    out = merging.step(1, hidden, keys)
    assert out.tolist() == [[[0.0], [5.0], [4.0], [3.0]]] and merging.sizes.tolist() == [[1.0, 1.0, 2.0, 1.0]]
    (result,) = merging.finish()
    assert result.sources.tolist() == [1, 1, 2, 0]  # patch slots (CLS excluded): x1, x2 -> x1', x3, x4 first
    assert result.indices.tolist() == [3, 0, 2]


def test_sizes_weight_later_merges():
    # Layer 1 merges x2 into x1 (size 2, value 4); layer 2 merges x3 into that token: (2 * 4 + 1 * 10) / 3 = 6,
    # where a plain mean would give 7.
    merging = EncoderMerging(ToMe(budget=2, schedule="constant", r=1), num_patches=4, layers=2, protected=1)
    merging.expect(2)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.6, -0.8]]])
    out = merging.step(1, torch.tensor([[[0.0], [2.0], [6.0], [10.0], [5.0]]]), keys)
    assert out.tolist() == [[[0.0], [5.0], [4.0], [10.0]]]
    # now [CLS, x4, x1', x3]: A = [CLS, x1'], B = [x4, x3]; x1' is most similar to x3 and merges into it
    out = merging.step(2, out, torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.0]]]))
    assert out.tolist() == [[[0.0], [5.0], [6.0]]] and merging.sizes.tolist() == [[1.0, 1.0, 3.0]]


def test_exact_schedule_spreads_the_merges():
    assert exact_schedule(576, 192, 23) == [17] * 16 + [16] * 7
    assert sum(exact_schedule(576, 64, 23)) == 512
    assert ToMe(budget=192).merge_schedule(576, 192, 23) == [17] * 16 + [16] * 7
    constant = ToMe(budget=208, schedule="constant", r=16)
    assert constant.merge_schedule(576, 208, 23) == [16] * 23
    with pytest.raises(ValueError, match="use budget=208 with r=16"):
        ToMe(budget=192, schedule="constant", r=16).merge_schedule(576, 192, 23)
    with pytest.raises(ValueError, match="too small for bipartite merging"):
        ToMe(budget=1).merge_schedule(16, 1, 2)


def test_schedule_without_a_cls_token_may_merge_one_more_a_token():
    # 15 patches, one layer: with a CLS token in front A = 8 tokens, 7 mergeable (8 patches left: budget 7 refused);
    # without one (SigLIP) A = the 8 even patches, all mergeable: 7 left, as tome_slots merges them
    with pytest.raises(ValueError, match="leaves 8 of 15"):
        ToMe(budget=7).merge_schedule(15, 7, 1)
    assert ToMe(budget=7).merge_schedule(15, 7, 1, protected=0) == [8]
    slots = tome_slots(torch.randn(1, 15, 4, generator=torch.Generator().manual_seed(0)), 8, protected=0)
    assert slots.unique().numel() == 7


@pytest.mark.parametrize("options, match", [
    ({"schedule": "fast"}, "unknown ToMe schedule"),
    ({"schedule": "constant"}, "needs r"),
    ({"r": 4}, "'constant' only"),
    ({"proportional_attention": "yes"}, "true or false"),
])
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        hiprune.build_method("tome", budget=64, **options)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(3, 40), st.data())
def test_slots_are_a_valid_merge(batch, length, data):
    merges = data.draw(st.integers(0, (length + 1) // 2 - 1))
    keys = torch.randn(batch, length, 4, generator=torch.Generator().manual_seed(length * 7 + merges))
    slots = tome_slots(keys, merges)
    assert slots.shape == (batch, length)
    for row in slots:
        assert row[0] == 0  # CLS stays first
        assert sorted(set(row.tolist())) == list(range(length - merges))  # every slot used, exactly T - r
    singles = torch.cat([tome_slots(keys[i : i + 1], merges) for i in range(batch)])
    assert torch.equal(slots, singles)  # rows are independent
    with pytest.raises(ValueError, match="can merge"):
        tome_slots(keys, (length + 1) // 2)


def test_non_finite_keys_are_rejected():
    keys = torch.zeros(1, 5, 2)
    keys[0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tome_slots(keys, 1)


# --- the families ----------------------------------------------------------------------------------------------------
def _llm_image_tokens(model, batch):
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_llava_passes_exactly_the_budget(tiny_llava, shape_images, budget):
    model, processor = tiny_llava
    with torch.no_grad(), hiprune.apply(model, hiprune.build_method("tome", budget=budget), processor) as session:
        batch = processor(text=["USER: <image>\nWhat is it? ASSISTANT:"] * 3, images=shape_images, padding=True,
                          return_tensors="pt")
        assert _llm_image_tokens(model, batch) == [budget] * 3
        model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [(r.tokens_in, r.tokens_kept) for r in session.records[0]] == [(576, budget)] * 3
    for record in session.records[0]:  # the merge map covers every patch, every output token has members
        assert sorted(set(record.sources.tolist())) == list(range(budget))


def test_proportional_attention_and_batching(tiny_llava, shape_images):
    model, processor = tiny_llava
    pixels = processor.image_processor(shape_images, return_tensors="pt")["pixel_values"]
    features = {}
    for proportional in (True, False):
        method = hiprune.build_method("tome", budget=64, proportional_attention=proportional)
        with torch.no_grad(), hiprune.apply(model, method):
            features[proportional] = model.model.get_image_features(pixels).pooler_output
            if proportional:
                singles = [model.model.get_image_features(pixels[i : i + 1]).pooler_output[0] for i in range(3)]
    assert not torch.allclose(features[True][0], features[False][0])  # + log(size) changes later layers
    for row, single in zip(features[True], singles):
        torch.testing.assert_close(row, single, rtol=1e-4, atol=1e-5)  # batch invariance


def test_llava_next_merges_every_crop_with_its_share(tiny_llava_next):
    model, processor = tiny_llava_next
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (700, 700), (20, 30, 200))]
    images[0].paste((0, 255, 0), (20, 20, 120, 90))
    images[1].paste((255, 255, 0), (30, 300, 120, 500))
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    method = hiprune.build_method("tome", budget=320)
    adapter = hiprune.adapter_for(model)
    with torch.no_grad(), hiprune.apply(model, method, processor) as session:
        batch = processor(text=[prompt] * 2, images=images, padding=True, padding_side="left", return_tensors="pt")
        crops = [adapter.image_layout(size, method).crops for size in batch["image_sizes"]]
        assert crops[0] != crops[1]  # two crop counts: two tower calls with their own schedules
        assert _llm_image_tokens(model, batch) == [(320 // c) * c for c in crops]
        batched = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)[:, -3:]
        singles = [
            model.generate(**processor(text=[prompt], images=[image], return_tensors="pt"), max_new_tokens=3,
                           min_new_tokens=3, do_sample=False)[0, -3:]
            for image in images
        ]
    assert [(r.tokens_in, r.tokens_kept) for r in session.records[0]] == [
        (576, 320 // c) for c in crops for _ in range(c)
    ]
    assert torch.equal(batched, torch.stack(singles))
    with pytest.raises(ValueError, match="official 'spatial' layout"), hiprune.apply(model, method, layout="native"):
        pass


def test_video_llava_merges_per_frame_and_per_image(tiny_video_llava):
    model, processor = tiny_video_llava
    frames = np.random.default_rng(0).integers(0, 256, (8, 48, 64, 3), dtype=np.uint8)
    with torch.no_grad(), hiprune.apply(model, hiprune.build_method("tome", budget=1024), processor) as session:
        batch = processor(text="USER: <video>\nWhat happens? ASSISTANT:", videos=[frames], return_tensors="pt")
        assert int((batch["input_ids"] == model.config.video_token_id).sum()) == 8 * (128 + 1)  # + each frame's CLS
        model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    (record,) = session.records
    assert record.kind == "video" and [(r.tokens_in, r.tokens_kept) for r in record] == [(256, 128)] * 8
    image = Image.fromarray(frames[0])
    with torch.no_grad(), hiprune.apply(model, hiprune.build_method("tome", budget=64), processor) as session:
        batch = processor(text="USER: <image>\nWhat is it? ASSISTANT:", images=[image], return_tensors="pt")
        model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert session.records[0].kind == "image" and session.records[0][0].tokens_kept == 64


def test_qwen2_5_vl_refuses_before_patching(tiny_qwen):
    model, _ = tiny_qwen
    with pytest.raises(ValueError, match="merges inside the vision encoder.*windowed attention"):
        with hiprune.apply(model, hiprune.build_method("tome", budget=0.25)):
            pass
    assert "get_image_features" not in vars(model.model)


@pytest.mark.slow
def test_lmms_eval_runs_tome(tiny_llava_dir, smoke_task_dir):
    from lmms_eval.evaluator import simple_evaluate

    from eval.config import REPO_ROOT
    from eval.lmms.llava import HiPruneLlava
    from eval.running.run import task_manager

    lmm = HiPruneLlava(pretrained=str(tiny_llava_dir), method="tome", budget=64, device="cpu", batch_size=2)
    try:
        results = simple_evaluate(model=lmm, tasks=["hiprune_smoke_pope"], limit=4, batch_size=2, bootstrap_iters=0,
                                  task_manager=task_manager(str(REPO_ROOT / "eval" / "tasks")))
    finally:
        lmm.close()
    assert 0.0 <= results["results"]["hiprune_smoke_pope"]["pope_accuracy,none"] <= 1.0
    assert list(lmm.kept_tokens[("hiprune_smoke_pope", "test")].values()) == [[64]] * 4
