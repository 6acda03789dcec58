"""FastV, PyramidDrop and SparseVLM on LLaVA-NeXT (an image = all its crops in the 'spatial' layout), Qwen2.5-VL
(images of any size; kept tokens keep their M-RoPE positions), Video-LLaVA (an image, or a whole video),
LLaVA-OneVision (HF's native layout: an image = base grid, unpadded crop grid and newlines), InternVL3 (an image = all
its tiles) and Qwen3-VL (as Qwen2.5-VL, plus the DeepStack features cut to the kept tokens).

The tiny models of these families have 2-layer LLMs (Qwen3-VL: 4, DeepStack after layers 0, 1, 2); multi-stage
schedules run on the same checkpoints with a 4-layer LLM (a config override at load time: layers 2 and 3 are copies
of layers 0 and 1, no asset to build). Each (family, method):
- every decoder layer of the prefill runs on text + the schedule's visual tokens (hooks on the decoder layers);
- cached greedy decoding equals a no-cache recomputation on the pruned sequence: the prompt and the tokens generated
  so far, run from scratch with the prefill's kept tokens replayed (the method's selection returns what the cached
  prefill kept; SparseVLM's raters stay the prompt's), logits of every step;
- batch size 4 (left padding, prompts of different lengths) equals batch size 1 for one method per family.
Plus budgets checked before loading on the real architectures, and one lmms-eval run per family.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import transformers
from conftest import REPO, built, loaded
from hydra import compose, initialize_config_dir
from llm_support import attention_variant, noise_images, single_input

import hiprune
from eval.efficiency.flops import flops_exact, flops_measured, llm_scoring_flops
from eval.running import run as run_module
from eval.running.store import read_record
from hiprune.adapters.llm_pruning import own_last_query_attention, resolve_schedule, visual_per_layer

LAYERS = 4
FAMILIES = ("llava_next", "qwen2_5_vl", "video_llava", "llava_onevision", "internvl", "qwen3_vl")
METHODS = {
    "fastv": {"budget": 0.6},  # K = 2, avg_layers (Qwen3-VL: a drop inside the DeepStack layers 0..2)
    "pdrop": {"budget": 0.4, "layers": [1, 2, 3]},  # lambda solved
    "sparsevlm": {"budget": 0.334, "layers": [0, 1, 2]},  # the official 192-of-576 schedule, scaled (derived)
}
# Qwen3-VL refuses recycling inside its DeepStack layers: SparseVLM prunes after layer 2 (stage at layer 3) there
FAMILY_METHODS = {("qwen3_vl", "sparsevlm"): {"budget": None, "layers": [2], "schedule": [16]}}
QUESTIONS = ["What is it?", "Is there a red circle in the picture? Answer briefly.", "Colour?",
             "Describe the shapes you can see, from left to right."]
IMAGE_SIZE = {"llava_next": 96, "qwen2_5_vl": 224, "video_llava": 96, "llava_onevision": 96, "internvl": 96,
              "qwen3_vl": 224}
TOWERS = {"qwen2_5_vl": "visual", "qwen3_vl": "visual", "video_llava": "image_tower"}  # else vision_tower
APPLY = {"llava_onevision": {"layout": "native"}}  # LLM-side methods get HF's own sequence
CHAT_TEMPLATE = ("qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl")

# FastV budget 0.6, K = 2, avg_layers, 4 layers, by hand: N' = round(0.6 n), k = (4 N' - 2 n) / 2 after layer 1
FASTV_BY_HAND = {
    "llava_onevision": [1485, 1485, 297, 297],  # n = 729 base + 27 x 27 crop + 27 newlines; N' = 891
    "internvl": [256, 256, 52, 52],  # one tile; N' = round(153.6) = 154
    "qwen3_vl": [49, 49, 9, 9],  # 224 px: 7 x 7 merged tokens; N' = round(29.4) = 29
}


def method_for(family: str, name: str):
    return hiprune.build_method(name, **FAMILY_METHODS.get((family, name), METHODS[name]))


@functools.cache
def deep(family: str):
    """(model, processor) of the family's tiny checkpoint with a 4-layer LLM (layers 2, 3 copy layers 0, 1)."""
    path = built(family)
    config = transformers.AutoConfig.from_pretrained(path)
    text = config.text_config
    copies = range(text.num_hidden_layers, LAYERS)  # Qwen3-VL's tiny LLM has 4 layers already
    text.num_hidden_layers = LAYERS
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[0]] * LAYERS
    cls = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(path, config=config, local_files_only=True, dtype=torch.float32).eval()
    layers = model.model.language_model.layers
    for i in copies:
        layers[i].load_state_dict(layers[i % 2].state_dict())
    memoize(getattr(model.model, TOWERS.get(family, "vision_tower")))
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor


def memoize(module) -> None:
    """Cache ``module``'s outputs by the bytes of its tensor inputs (the vision towers: the same images run again
    and again here, and LLM-side methods leave the towers untouched)."""
    original, outputs = module.forward, {}

    def key(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype), hash(value.detach().cpu().numpy().tobytes()))
        return repr(value)

    def forward(*args, **kwargs):
        k = (tuple(key(a) for a in args), tuple((n, key(v)) for n, v in sorted(kwargs.items())))
        if k not in outputs:
            outputs[k] = original(*args, **kwargs)
        return copy.copy(outputs[k])  # callers set fields on the output (Qwen2.5-VL splits pooler_output)

    module.forward = forward


def prompt(family: str, processor, question: str) -> str:
    if family in CHAT_TEMPLATE:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def inputs(family: str, questions, seeds):
    _, processor = deep(family)
    images = [noise_images(max(seeds) + 1, IMAGE_SIZE[family])[s] for s in seeds]
    return processor(text=[prompt(family, processor, q) for q in questions], images=images, padding=True,
                     return_tensors="pt")


def image_token_ids(model) -> list[int]:
    ids = [model.config.image_token_id]
    if getattr(model.config, "video_token_id", None) is not None:
        ids.append(model.config.video_token_id)
    return ids


def greedy(model, batch, steps):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


def replayed(method, record, schedule, prompt_after_image: int):
    """A copy of ``method`` whose selections return what ``record``'s prefill kept (one image, batch 1) and whose
    text raters are chosen among the prompt's tokens only."""
    held = torch.arange(record.visual_in)[None]
    picks = []
    for stage, (_, kept) in zip(schedule, record.stages, strict=True):
        picks.append(torch.searchsorted(held.contiguous(), kept[:, : stage.keep].contiguous()))
        held = kept
    clone = copy.copy(method)
    counter = iter(range(10**6))

    def select(scores, keep):
        pick = picks[next(counter) % len(picks)]
        assert pick.shape == (scores.shape[0], keep)
        return pick.to(scores.device)

    def raters(image, text):
        chosen = type(method).text_raters(method, image, text[:prompt_after_image])
        return torch.cat([chosen, torch.zeros(len(text) - prompt_after_image, dtype=torch.bool)])

    clone.select_from_attention = select
    clone.text_raters = raters
    return clone


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_layers_follow_the_schedule_and_cached_decoding_equals_recomputation(family, method_name):
    model, processor = deep(family)
    method = method_for(family, method_name)
    seen: list[int] = []

    def spy(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    steps = 3
    with hiprune.apply(model, method, processor, **APPLY.get(family, {})) as session:  # the family's layout
        batch = inputs(family, QUESTIONS[:1], [0])
        handles = [layer.register_forward_pre_hook(spy, with_kwargs=True) for layer in model.model.language_model.layers]
        try:
            generated, logits = greedy(model, batch, steps)
        finally:
            for handle in handles:
                handle.remove()
        [record] = session.pop_layer_records()
    ids = batch["input_ids"]
    visual = torch.isin(ids[0], torch.tensor(image_token_ids(model)))
    n_visual, length = int(visual.sum()), ids.shape[1]
    schedule = resolve_schedule(method, n_visual, LAYERS)
    expected = [length - n_visual + v for v in visual_per_layer(schedule, n_visual, LAYERS)]
    assert seen[:LAYERS] == expected == record.tokens
    stages = 1 if method_name == "fastv" or (family, method_name) in FAMILY_METHODS else 3
    if method_name == "fastv" and family in FASTV_BY_HAND:
        assert record.visual == FASTV_BY_HAND[family]
    assert record.visual_in == n_visual and record.images == 1 and len(schedule) == stages
    assert all(s == 1 for s in seen[LAYERS:])  # decode steps: one token per layer

    after = length - 1 - int(visual.nonzero()[-1])
    replay = replayed(method, record, schedule, after)
    with hiprune.apply(model, replay, processor, **APPLY.get(family, {})) as session, torch.no_grad():
        for step in range(1, steps):  # step 0 is the prefill itself
            full = torch.cat([ids, generated[:, :step]], dim=1)
            call = {**batch, "input_ids": full, "attention_mask": torch.ones_like(full)}
            if "mm_token_type_ids" in batch:
                call["mm_token_type_ids"] = torch.cat(
                    [batch["mm_token_type_ids"], torch.zeros_like(generated[:, :step])], dim=1)
            out = model(**call, use_cache=False)
            [again] = session.pop_layer_records()
            for (_, kept), (_, kept_again) in zip(record.stages, again.stages, strict=True):
                assert torch.equal(kept, kept_again)
            torch.testing.assert_close(out.logits[0, -1], logits[0, step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, method_name", [("llava_next", "pdrop"), ("qwen2_5_vl", "sparsevlm"),
                                                 ("video_llava", "fastv"), ("qwen3_vl", "pdrop")])
def test_batch_of_four_equals_each_alone(family, method_name):
    model, processor = deep(family)
    method = method_for(family, method_name)
    seeds = [0, 1, 2, 3]
    with hiprune.apply(model, method, processor, **APPLY.get(family, {})) as session:
        tokens, logits = greedy(model, inputs(family, QUESTIONS, seeds), 2)
        [record] = session.pop_layer_records()
        assert record.indices.shape[0] == 4
        for row, (question, seed) in enumerate(zip(QUESTIONS, seeds)):
            alone_tokens, alone_logits = greedy(model, inputs(family, [question], [seed]), 2)
            [alone] = session.pop_layer_records()
            assert torch.equal(alone.indices[0], record.indices[row])
            assert torch.equal(alone_tokens[0], tokens[row])
            torch.testing.assert_close(alone_logits[0], logits[row], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method_name", ["fastv", "pdrop"])
def test_qwen3_vl_deepstack_rows_follow_the_kept_tokens(method_name, monkeypatch):
    # HF adds deepstack_visual_embeds[i] at visual_pos_masks after decoder layer i (i = 0, 1, 2). FastV drops at
    # layer 2, PDrop at 1, 2, 3: after layer i the sequence holds the image tokens kept by the stages at layers <= i,
    # and each must get its own DeepStack rows, in order (rows of the tokens it dropped: none)
    model, processor = deep("qwen3_vl")
    calls = []
    unpatched = type(model.model.language_model)._deepstack_process

    def spy(self, hidden_states, visual_pos_masks, visual_embeds):
        calls.append((hidden_states.shape[1], visual_pos_masks.clone(), visual_embeds.clone()))
        return unpatched(self, hidden_states, visual_pos_masks, visual_embeds)

    monkeypatch.setattr(type(model.model.language_model), "_deepstack_process", spy)
    batch = inputs("qwen3_vl", QUESTIONS[1:2], [0])
    with hiprune.apply(model, method_for("qwen3_vl", method_name), processor) as session, torch.no_grad():
        model(**batch)
        [record] = session.pop_layer_records()
        full = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).deepstack_features
    ids = batch["input_ids"][0]
    first = int((ids == model.config.image_token_id).nonzero()[0])
    n = record.visual_in
    assert len(calls) == len(full) == 3 and n == 49
    for layer, (length, mask, embeds) in enumerate(calls):
        kept = torch.arange(n)
        for stage_layer, stage_kept in record.stages:
            if stage_layer <= layer:
                kept = stage_kept[0]
        assert length == record.tokens[layer] == ids.shape[0] - n + len(kept), layer
        expected_mask = torch.zeros(1, length, dtype=torch.bool)
        expected_mask[0, first : first + len(kept)] = True  # the kept image tokens stay together, in order
        assert torch.equal(mask, expected_mask), layer
        torch.testing.assert_close(embeds, full[layer][0][kept], rtol=0, atol=0)
    assert record.stages[0][0] <= 2 and len(kept) < n  # a drop inside the DeepStack layers


def test_own_attention_includes_qwen3_vl_query_and_key_norms():
    # PDrop's "own" score (the last query row from the layer's inputs) equals the eager attention of a Qwen3-VL layer,
    # which normalizes every head's queries and keys (q_norm, k_norm) before RoPE
    model = attention_variant(deep("qwen3_vl")[0], "eager")
    lm = model.model.language_model
    batch = inputs("qwen3_vl", QUESTIONS[:1], [0])
    captured = {}

    def grab(module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], kwargs=dict(kwargs))

    handle = lm.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
            scores = own_last_query_attention(lm.layers[1], captured["hidden"], captured["kwargs"])
    finally:
        handle.remove()
    torch.testing.assert_close(scores, out.attentions[1][:, :, -1].float().mean(dim=1), rtol=1e-5, atol=1e-6)


def _skeleton(arch: str):
    config = transformers.AutoConfig.from_pretrained(REPO / "configs" / "arch" / arch)
    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(config)


def test_budgets_are_checked_on_the_real_architectures_before_loading():
    next_7b = hiprune.adapter_for(_skeleton("llava-v1.6-vicuna-7b-hf"))  # official layout: 5 x 576 = 2880 tokens
    for name, options in (("fastv", {}), ("pdrop", {}), ("sparsevlm", {})):
        next_7b.check_supported(hiprune.build_method(name, budget=320, **options))
        with pytest.raises(ValueError, match="infeasible|official schedules"):  # the spec's 160 on LLaVA-NeXT
            next_7b.check_supported(hiprune.build_method(name, budget=160, **options))
    qwen_3b = _skeleton("qwen2.5-vl-3b-instruct")  # 36 layers; budgets are ratios of each image's tokens
    for name in ("fastv", "pdrop", "sparsevlm"):
        hiprune.adapter_for(qwen_3b).check_supported(hiprune.build_method(name, budget=0.112))
    with pytest.raises(ValueError, match="infeasible"):  # avg_layers: 2 full layers of 36 exceed 0.05 on average
        hiprune.adapter_for(qwen_3b).check_supported(hiprune.build_method("fastv", budget=0.05))
    with pytest.raises(ValueError, match="keep their M-RoPE positions"):
        hiprune.adapter_for(qwen_3b, positions="compact").check_supported(hiprune.build_method("fastv", budget=0.5))
    # the newer families: every method's defaults at the paper's smallest ratio
    qwen3 = hiprune.adapter_for(_skeleton("qwen3-vl-8b-instruct"))  # 36 layers, DeepStack after layers 0, 1, 2
    internvl = hiprune.adapter_for(_skeleton("internvl3-8b-hf"))  # checked on a one-tile image (256 tokens)
    onevision = hiprune.adapter_for(_skeleton("llava-onevision-qwen2-7b-ov-hf"), layout="native")
    for adapter in (qwen3, internvl, onevision):
        for name in ("fastv", "pdrop", "sparsevlm"):
            adapter.check_supported(hiprune.build_method(name, budget=0.112))
    with pytest.raises(ValueError, match="recycled token"):  # SparseVLM adding tokens inside the DeepStack layers
        qwen3.check_supported(hiprune.build_method("sparsevlm", budget=0.334, layers=[1, 6, 15]))
    qwen3.check_supported(hiprune.build_method("sparsevlm", budget=0.334, layers=[1, 6, 15], recycle=False))
    with pytest.raises(ValueError, match="the image has only 256"):
        internvl.check_supported(hiprune.build_method("fastv", budget=320))
    with pytest.raises(ValueError, match="layout=native"):
        hiprune.adapter_for(onevision.model).check_supported(hiprune.build_method("fastv", budget=0.112))


def _run(tmp_path, model, benchmark, method, *extra):
    with initialize_config_dir(config_dir=str(run_module.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"benchmark={benchmark}", "device=cpu",
                                           f"store={tmp_path}", f"method={method}", "limit=2", "batch_size=2", *extra])
    return read_record(run_module.run(cfg))


def _sparsevlm_image_tokens(n: int, keep: int) -> int:
    """By hand (spec §10): keep + the clusters of the pruned: floor(floor(0.3 (n - keep)) + 1) / 10) + 1."""
    candidates = int(0.3 * (n - keep)) + 1
    return keep + candidates // 10 + 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, benchmark, method, extra, per_layer",
    [
        # LLaVA-NeXT: one visual = the image's 3 crops x 576 (96 x 96 -> a 1 x 2 anyres grid), spatial layout;
        # 2 layers: 1 stage
        ("tiny_llava_next", "smoke_pope", "sparsevlm", ["budget=null", "method.options.layers=[0]",
                                                        "method.options.schedule=[500]"], [1728, 500 + 37]),
        ("tiny_llava_next", "smoke_pope", "fastv", ["budget=500", "method.options.layer=1",
                                                    "method.options.budget_mode=keep_after"], [1728, 500]),
        ("tiny_llava_next", "smoke_pope", "pdrop", ["budget=null", "method.options.layers=[1]",
                                                    "method.options.ratios=[0.5]"], [1728, 864]),
        # Qwen2.5-VL: images of different sizes in one batch of 2: generated in groups, each image its own schedule
        ("tiny_qwen25vl", "smoke_pope", "pdrop", ["budget=null", "method.options.layers=[1]",
                                                  "method.options.ratios=[0.5]"], lambda n: [n, n // 2]),
        ("tiny_qwen25vl", "smoke_pope", "fastv", ["budget=0.5", "method.options.layer=1",
                                                  "method.options.budget_mode=keep_after"], lambda n: [n, n // 2]),
        ("tiny_qwen25vl", "smoke_pope", "sparsevlm", ["budget=null", "method.options.layers=[0]",
                                                      "method.options.schedule=[4]"],
         lambda n: [n, _sparsevlm_image_tokens(n, 4)]),
        # Video-LLaVA: a video of 4 frames x (CLS + 256) is one visual
        ("tiny_video_llava", "smoke_video", "fastv", ["budget=0.75", "method.options.layer=1"], [1028, 514]),
        ("tiny_video_llava", "smoke_video", "pdrop", ["budget=null", "method.options.layers=[1]",
                                                      "method.options.ratios=[0.5]"], [1028, 514]),
        ("tiny_video_llava", "smoke_video", "sparsevlm", ["budget=null", "method.options.layers=[0]",
                                                          "method.options.schedule=[500]"],
         [1028, _sparsevlm_image_tokens(1028, 500)]),
        # LLaVA-OneVision: layout=auto runs HF's native layout for LLM-side methods (base + unpadded, downsampled
        # crop grid + newlines: one visual); InternVL3: one visual = all tiles of an image (thumbnail included);
        # Qwen3-VL: FastV at layer 2, inside the DeepStack layers 0..2 of the tiny LLM (4 layers)
        ("tiny_llava_onevision", "smoke_pope", "pdrop", ["budget=null", "method.options.layers=[1]",
                                                         "method.options.ratios=[0.5]"], lambda n: [n, n // 2]),
        ("tiny_internvl3", "smoke_pope", "sparsevlm", ["budget=null", "method.options.layers=[0]",
                                                       "method.options.schedule=[100]"],
         lambda n: [n, _sparsevlm_image_tokens(n, 100)]),
        ("tiny_qwen3vl", "smoke_pope", "fastv", ["budget=0.5", "method.options.layer=2",
                                                 "method.options.budget_mode=keep_after"],
         lambda n: [n, n, round(n / 2), round(n / 2)]),  # round half to even
    ],
)
def test_lmms_eval_run_per_family(tmp_path, model, benchmark, method, extra, per_layer):
    record = _run(tmp_path, model, benchmark, method, *extra)
    [(key, docs)] = record["llm_visual_per_layer_by_doc"].items()
    assert sorted(docs) == ["0", "1"]
    for doc, visual in docs.items():
        expected = per_layer(visual[0]) if callable(per_layer) else per_layer
        assert visual == expected, doc
        assert record["kept_tokens_by_doc"][key][doc] == [expected[-1]], doc
    if callable(per_layer):  # the two docs' images differ in size, so in token count (each its own schedule)
        assert len({visual[0] for visual in docs.values()}) == 2


@pytest.mark.parametrize(
    "name, options, ops",
    [
        # PyramidDrop: each boundary layer's own last-query row (q of 1 token, k of all it holds, QK^T)
        ("pdrop", {"budget": None, "layers": [1, 2], "ratios": [0.5, 0.25]}, [("own", 1, 76), ("own", 1, 44)]),
        # SparseVLM: the raters' choice (7 text x 64 image embeddings), their 3 rows in each pruning layer, the
        # recycling's pairwise distances among floor(0.3 n) + 1 candidates (24 -> 8, 33 -> 10)
        ("sparsevlm", {"budget": None, "layers": [0, 1], "schedule": [40, 10]},
         [("rater_choice", 7, 64), ("raters", 3, 76), ("recycle", 8, 8), ("raters", 3, 53), ("recycle", 10, 10)]),
    ],
)
def test_flops_exact_counts_the_scoring_as_measured(name, options, ops):
    model, _ = loaded("scene")  # 3 Llama layers (4 heads of 32, hidden 128), 64 visual tokens, 12 text tokens
    ids, pixels = single_input(model)
    with hiprune.apply(model, hiprune.build_method(name, **options)) as session:
        measured = flops_measured(model, {"input_ids": ids, "pixel_values": pixels})
    [record] = session.layer_records
    assert record.scoring == [ops]
    exact = flops_exact(model.config, ids.shape[1] - 64, record.visual,
                        llm_scoring=llm_scoring_flops(model.config, record.scoring[0]))
    for part in ("vision", "projector", "lm_head", "attention_scores", "total"):
        assert exact[part if part != "total" else "total"] == measured[part], part
    assert exact["llm_prefill"] == measured["language_model"]
    # by hand: d = 128, H = Hkv = 4, hd = 32; cdist's mm form has inner width d + 2
    d, h, hd = 128, 4, 32
    own = lambda q, n: 2 * q * d * h * hd + 2 * n * d * h * hd + 2 * h * q * n * hd  # noqa: E731
    by_hand = {"own": own, "raters": own, "rater_choice": lambda q, n: 2 * q * n * d,
               "recycle": lambda q, n: 2 * q * n * (d + 2)}
    assert llm_scoring_flops(model.config, ops) == sum(by_hand[k](q, n) for k, q, n in ops)
