"""The harness's lmms-eval model base class: an HF VLM with any harness method installed, batched generation, and the
per-document logs a run records (kept visual tokens, their digest, prefill lengths, per-layer visual tokens). One
subclass per family: eval/lmms/llava.py (``hiprune_llava``), llava_next.py, qwen2_5_vl.py, video_llava.py, all
registered in eval/lmms/plugin.py.

    hiprune-lmms-eval --model hiprune_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=hiprune,budget=192 --tasks pope --batch_size 8

Unlike lmms-eval's own ``llava_hf``, batches of any size run together (left padding), and any exception in pruning
or generation stops the run with the task, sample id and cause: an evaluation never continues on empty answers.
Images are decoded strictly (lmms-eval lets PIL decode truncated files, partly black): a broken image stops the run
naming task, split and doc id, unless ``broken_images=skip``, which answers such a sample with an empty string and
lists it in ``broken_docs`` (recorded with the run).
Every model_arg that is not a loading/prompting option is a method option (``alpha=0.1,object_layer=9`` ...).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models import get_model
from lmms_eval.utils import Collator, eval_logger
from PIL import Image, ImageFile
from tqdm import tqdm
from transformers import AutoProcessor

import hiprune
from eval.config import ConfigError
from eval.lmms.compiled import CompiledGeneration, check_compile, options_from, pad_to_bucket
from eval.lmms.prompting import IMAGE_PLACEHOLDER
from hiprune.adapters.base import GridRecord, check_family_method, splits_visuals
from hiprune.adapters.llm_pruning import resolve_schedule, visual_per_layer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The model's per-doc logs, {(task, split): {doc: ...}} (llm_visual_per_layer: LLM-side methods only, else empty);
# a run records them, a data-parallel run merges them over its ranks.
DOC_LOGS = ("kept_tokens", "kept_digests", "prefill_tokens", "visual_input_tokens", "llm_visual_per_layer",
            "llm_scoring", "capped_new_tokens", "broken_docs")
BROKEN_IMAGES = ("error", "skip")  # a sample whose image does not decode: stop the run | answer "" and record it


class GenerationError(RuntimeError):
    """Raised when pruning or generation fails for a sample; the message names the task and sample ids."""


class BrokenImageError(RuntimeError):
    """A sample's image does not decode (truncated or corrupt file); the message names task, split and doc id."""


@contextmanager
def strict_decoding():
    """PIL refuses truncated files inside (lmms-eval turns LOAD_TRUNCATED_IMAGES on for the whole process)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def data_parallel_state(device: str = "auto"):
    """accelerate's state of this process; under a multi-process launcher this sets up the process group.

    accelerate builds a CPU (gloo) group only when asked, so a CPU model asks: device=cpu, no CUDA, or
    ACCELERATE_USE_CPU (`accelerate launch --cpu`). Otherwise it is nccl with one GPU per process."""
    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or resolve_device(device) == "cpu"
    state = PartialState(cpu=on_cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate set up {state.num_processes} "
            f"(distributed type {state.distributed_type}): CPU processes need device=cpu, and ACCELERATE_USE_CPU=1 "
            f"where accelerate was set up before the model (lmms-eval's own CLI)"
        )
    return state


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class HiPruneLMM(lmms):
    """A VLM family evaluated with a token-pruning method; subclasses load the family and build its inputs.

    Subclasses set ``loading_options`` (name -> default) and implement :meth:`load` and :meth:`build_inputs`;
    every other keyword argument is a method option. ``method`` is a registered method's name, or a method the
    harness already built and validated from its config (eval.running.methods), which then takes no options.
    """

    # The unit each kept-token count of the per-doc logs refers to (each pruned grid is counted on its own).
    kept_unit: ClassVar[str] = "image"

    is_simple = True
    family: ClassVar[str] = ""
    default_pretrained: ClassVar[str] = ""
    loading_options: ClassVar[dict[str, Any]] = {}
    # loading options that are adapter options of hiprune.apply (e.g. Qwen2.5-VL "positions", LLaVA-NeXT "layout")
    adapter_option_names: ClassVar[tuple[str, ...]] = ()
    # generation length when neither the task's generation_kwargs nor model_args give max_new_tokens
    default_max_new_tokens: ClassVar[int] = 1024

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | hiprune.Method = "hiprune",
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        attn_implementation: str = "sdpa",
        max_new_tokens: int | None = None,
        broken_images: str = "error",
        compile: bool | str = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if broken_images not in BROKEN_IMAGES:
            raise ValueError(f"broken_images={broken_images!r}: choose one of {', '.join(BROKEN_IMAGES)}")
        self.broken_images = broken_images
        compiling = options_from(compile, options)  # static cache + torch.compile (eval/lmms/compiled.py)
        loading = {k: options.pop(k, default) for k, default in self.loading_options.items()}
        check_option_types(type(self), loading)
        # Validate everything cheap before the (possibly multi-GB) model loads.
        if isinstance(method, hiprune.Method):
            if options:
                raise ValueError(f"options {sorted(options)} given with an already built method {method.name!r}")
            self.method = method
        else:
            self.method = hiprune.build_method(method, **{name: list_option(v) for name, v in options.items()})
        check_family_method(self.family, self.method)  # no CLS token, no paired CLIP text tower, ...: before loading
        if compiling is not None:
            check_compile(self.method, self.family)
        # adapter options that depend on the method (LLaVA-NeXT's layout=auto) resolve here: loading and the settings
        # recorded with the run hold what runs
        loading.update(self.resolve_adapter_options({k: loading[k] for k in self.adapter_option_names}, self.method))
        self.adapter_options = {k: loading[k] for k in self.adapter_option_names}
        self._device = self._setup_data_parallel(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(self.default_max_new_tokens if max_new_tokens is None else max_new_tokens)
        pretrained = pretrained or self.default_pretrained

        self._model, self.processor = self.load(pretrained, revision, attn_implementation, **loading)
        self._model.to(self._device).eval()
        # for the run's summary (LLM-side methods' drop schedule), written after lmms-eval released the model
        self.decoder_layers = int(self._model.config.text_config.num_hidden_layers)
        self.tokenizer = self.processor.tokenizer
        self._stack = ExitStack()
        self.compiled = None if compiling is None else CompiledGeneration(self._model, compiling, self._device)
        if self.compiled is not None:
            self._stack.callback(self.compiled.close)
        self.session = self._stack.enter_context(
            hiprune.apply(
                self._model, self.method, self.processor, getattr(self, "prompt_encoder", None), **self.adapter_options
            )
        )
        # doc ids per (task, split) -> visual tokens the LLM received for each image of that sample
        self.kept_tokens: dict[tuple[str, str], dict[int, list[int]]] = {}
        # doc ids per (task, split) -> hash of the kept indices of every image (determinism checks across runs)
        self.kept_digests: dict[tuple[str, str], dict[int, str]] = {}
        # doc ids per (task, split) -> tokens the LLM prefilled (text + visual), for FLOPs accounting
        self.prefill_tokens: dict[tuple[str, str], dict[int, int]] = {}
        # doc ids per (task, split) -> visual placeholders of its prompt (the LLM's visual input: kept tokens plus a
        # layout's extras such as LLaVA-NeXT's newline tokens), for FLOPs accounting
        self.visual_input_tokens: dict[tuple[str, str], dict[int, int]] = {}
        # LLM-side methods (FastV) only: doc ids per (task, split) -> visual tokens of that sample at each decoder
        # layer of its prefill (as the stages of the method's drop schedule left them), for FLOPs accounting
        self.llm_visual_per_layer: dict[tuple[str, str], dict[int, list[int]]] = {}
        # LLM-side methods only: doc ids per (task, split) -> the scoring arithmetic its prefill row ran in the
        # decoder (LayerRecord.scoring: (kind, queries, keys)), for FLOPs accounting
        self.llm_scoring: dict[tuple[str, str], dict[int, list[tuple[str, int, int]]]] = {}
        # doc ids per (task, split) -> max_new_tokens of a sample whose prompt left less context than the task asked
        self.capped_new_tokens: dict[tuple[str, str], dict[int, int]] = {}
        # broken_images=skip: doc ids per (task, split) -> why its image did not decode (answered with "")
        self.broken_docs: dict[tuple[str, str], dict[int, str]] = {}
        self.settings = {
            "family": self.family,
            "pretrained": pretrained,
            "revision": revision,
            "device": self._device,
            "dtype": str(self._dtype).removeprefix("torch."),
            "attn_implementation": attn_implementation,
            "batch_size": self.batch_size_per_gpu,
            **loading,
            "method": self.method.describe(),
        }
        if self.compiled is not None:
            self.settings["compile"] = compiling.describe(self._device)

    # --- family hooks -------------------------------------------------------------------------------------
    @classmethod
    def resolve_adapter_options(cls, options: dict[str, Any], method: hiprune.Method) -> dict[str, Any]:
        """The adapter options a run of ``method`` uses (as given unless a family resolves a method-dependent one)."""
        return dict(options)

    def load_clip_prompt_encoder(self, text_tower: str, prompt_pooling: str) -> None:
        """CLIP-tower families: load the paired text tower for prompt-aware methods only, on the model's device and
        dtype (so it is part of the measured cost)."""
        if self.method.needs_prompt:
            self.prompt_encoder = hiprune.ClipPromptEncoder.from_pretrained(
                text_tower, device=self._device, dtype=self._dtype, pooling=prompt_pooling
            )

    def load(self, pretrained: str, revision: str | None, attn_implementation: str, **loading):
        """Return (model, processor) on CPU in ``self._dtype``."""
        raise NotImplementedError

    def load_pretrained(self, model_class, pretrained: str, revision: str | None, attn_implementation: str):
        """(model, processor) of ``pretrained`` as ``model_class`` in ``self._dtype``, for ``load``; sets
        ``self.pad_token_id`` (the tokenizer's pad token, else its eos token)."""
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        model = model_class.from_pretrained(
            pretrained, revision=revision, dtype=self._dtype, attn_implementation=attn_implementation
        )
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return model, processor

    def build_inputs(self, contexts: list[str], images: list[list[Image.Image]]) -> tuple[dict, list[list[int]]]:
        """Model inputs for a batch, and the visual tokens each image must keep (checked after generation)."""
        raise NotImplementedError

    def _setup_data_parallel(self, requested_device: str) -> str:
        """The device this process's model copy goes to.

        Under a multi-process launcher (`accelerate launch`, torchrun: one process per device) lmms-eval shards the
        requests by rank and gathers results through ``self.accelerator``; each process holds a full model copy on
        its own device: cuda:<local rank>, or the CPU for a CPU model (gloo process group)."""
        state = data_parallel_state(requested_device)
        self.accelerator = Accelerator()
        if state.num_processes == 1:
            return resolve_device(requested_device)
        wanted = state.device.type if requested_device == "auto" else torch.device(resolve_device(requested_device)).type
        if wanted != state.device.type:
            raise ValueError(
                f"data-parallel process {state.process_index} of {state.num_processes} runs on {state.device} but the "
                f"model was asked for device={requested_device!r}; use device=auto (or device=cpu for CPU processes)"
            )
        self._rank = state.process_index
        self._world_size = state.num_processes
        return str(state.device)

    # --- lmms interface -----------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> str:
        return self._device

    def close(self) -> None:
        """Uninstall the method (the model is restored exactly)."""
        self._stack.close()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{type(self).__name__} answers generation tasks only (generate_until); this task needs loglikelihood"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not implement multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def order(args):  # longest prompts first: padding waste and OOMs show up early
            return -len(args[0]), args[0]

        collator = Collator([req.args for req in requests], order, grouping=True)
        results: list[str] = []
        progress = tqdm(total=len(requests), desc=f"{self.method.name} generating", disable=self.rank != 0)
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, gen_kwargs, _, doc_ids, tasks, splits = zip(*chunk)
            task, split = tasks[0], splits[0]
            broken = {i for i, args in enumerate(chunk) if self.broken_images == "skip" and self._is_broken(*args[2:])}
            answerable = [args for i, args in enumerate(chunk) if i not in broken]
            try:
                answered = iter(self._generate_batch(
                    [a[0] for a in answerable], dict(gen_kwargs[0]), [a[2] for a in answerable],
                    [a[3] for a in answerable], task, split) if answerable else [])
            except Exception as exc:
                raise GenerationError(
                    f"{type(exc).__name__} while answering task {task!r} split {split!r} doc ids {list(doc_ids)} "
                    f"with method {self.method.name!r}: {exc}"
                ) from exc
            answers = ["" if i in broken else next(answered) for i in range(len(chunk))]
            for context, kwargs, answer in zip(contexts, gen_kwargs, answers):
                self.cache_hook.add_partial("generate_until", (context, kwargs), answer)
            results.extend(answers)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    # --- internals ----------------------------------------------------------------------------------------
    def doc_visuals(self, doc_to_visual, task, split, doc_id) -> list:
        """A doc's visuals, its images decoded strictly: a truncated or corrupt file is a BrokenImageError."""
        if doc_to_visual is None:
            return []
        try:
            with strict_decoding():
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
                for visual in visuals:
                    if isinstance(visual, Image.Image):
                        visual.load()
        except (OSError, SyntaxError) as exc:
            raise BrokenImageError(f"task {task!r} split {split!r} doc id {doc_id}: the image does not decode "
                                   f"({type(exc).__name__}: {exc}); broken_images=skip answers such samples with an "
                                   f"empty string and records them") from exc
        return visuals

    def _is_broken(self, doc_to_visual, doc_id, task, split) -> bool:
        try:
            self.doc_visuals(doc_to_visual, task, split, doc_id)
        except BrokenImageError as exc:
            print(f"[hiprune] skipping a broken image (broken_images=skip): {exc}", flush=True)
            self.broken_docs.setdefault((task, split), {})[doc_id] = str(exc.__cause__)
            return True
        return False

    def _visuals(self, doc_to_visual, doc_ids, task, split) -> list[list[Image.Image]]:
        per_sample = []
        for fn, doc_id in zip(doc_to_visual, doc_ids):
            visuals = self.doc_visuals(fn, task, split, doc_id)
            visuals = [v for v in (visuals or []) if v is not None]
            for v in visuals:
                if not isinstance(v, Image.Image):
                    raise TypeError(f"{type(self).__name__} takes images; doc {doc_id} has a {type(v).__name__} visual")
            per_sample.append(visuals)
        return per_sample

    def _generate_batch(self, contexts, gen_kwargs, doc_to_visual, doc_ids, task, split) -> list[str]:
        images = self._visuals(doc_to_visual, doc_ids, task, split)
        until = gen_kwargs.pop("until", None)
        if isinstance(until, str):
            until = [until]
        batch, expected = self.build_inputs(contexts, images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, sample in enumerate(expected):
            groups.setdefault(tuple(sample), []).append(i)
        if self.method.stage == "llm" and len(groups) > 1:
            # the LLM-side plumbing drops the same count from every row: samples whose images differ in token count
            # (Qwen2.5-VL's image sizes) are generated in groups of equal counts (rows are independent)
            answers: list[str] = [""] * len(contexts)
            for members in groups.values():
                part = self._generate_batch([contexts[i] for i in members], {**gen_kwargs, "until": until},
                                            [doc_to_visual[i] for i in members], [doc_ids[i] for i in members],
                                            task, split)
                for i, answer in zip(members, part):
                    answers[i] = answer
            return answers
        if self.compiled is not None:  # a few prompt lengths, hence few compiled shapes
            batch = pad_to_bucket(batch, self.compiled.options.bucket, self.pad_token_id)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
        caps = self._new_token_caps(batch["attention_mask"], max_new_tokens, doc_ids, task, split)
        prefill = self.prefill_tokens.setdefault((task, split), {})
        prefill.update(zip(doc_ids, batch["attention_mask"].sum(1).tolist()))
        visual_ids = torch.tensor([i for i in (getattr(self._model.config, name, None)
                                               for name in ("image_token_id", "video_token_id")) if i is not None])
        placeholders = torch.isin(batch["input_ids"], visual_ids) & batch["attention_mask"].bool()
        self.visual_input_tokens.setdefault((task, split), {}).update(zip(doc_ids, placeholders.sum(1).tolist()))
        batch = {k: v.to(self._device) for k, v in batch.items()}
        for key in [k for k in batch if k.startswith("pixel_values")]:
            batch[key] = batch[key].to(self._dtype)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = temperature > 0
        generation = {
            "max_new_tokens": max(caps),
            "do_sample": do_sample,
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "use_cache": True,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            **(self.compiled.generation_kwargs() if self.compiled is not None else {}),
        }
        if do_sample:
            generation["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                generation["top_p"] = float(gen_kwargs["top_p"])
        self.session.pop_records()
        self.session.pop_layer_records()
        if self.method.needs_prompt:  # each image is compared with the question of its own sample
            questions = [context.replace(IMAGE_PLACEHOLDER, "").strip() for context in contexts]
            self.session.set_prompts([q for q, sample in zip(questions, images) for _ in sample])
        with torch.inference_mode():
            output = self._model.generate(**batch, **generation)
        self._log_kept_tokens(task, split, doc_ids, expected)
        self._log_llm_pruning(task, split, doc_ids, expected, batch["input_ids"].shape[1])
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        if min(caps) < max(caps):  # a row past its own cap ran beyond its context: those tokens are not its answer
            new_tokens = [row[:cap] for row, cap in zip(new_tokens, caps)]
        return self.finish_answers(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True), until)

    def finish_answers(self, answers: list[str], until: list[str] | None) -> list[str]:
        """Post-process decoded answers: cut at the first stop string of ``until``, strip (families may override)."""
        return cut_and_strip(answers, until)

    def _new_token_caps(self, attention_mask: torch.Tensor, max_new_tokens: int, doc_ids, task, split) -> list[int]:
        """Each sample's max_new_tokens: the task's, capped to the context its prompt leaves (each sample as at batch
        size 1); capped samples are logged (``capped_new_tokens``). A prompt that leaves no room for one new token is
        refused, naming the sample: a sequence past the LLM's trained context would silently degrade."""
        limit = self.context_length
        caps = []
        for doc_id, length in zip(doc_ids, attention_mask.sum(1).tolist()):
            if length + 1 > limit:
                raise ValueError(f"doc {doc_id}: {length} prompt tokens + 1 new token exceed the model's context of "
                                 f"{limit} tokens")
            caps.append(min(max_new_tokens, limit - length))
        capped = {doc_id: cap for doc_id, cap in zip(doc_ids, caps) if cap < max_new_tokens}
        if capped:
            self.capped_new_tokens.setdefault((task, split), {}).update(capped)
            eval_logger.warning(f"task {task!r} split {split!r}: max_new_tokens {max_new_tokens} capped to the context "
                           f"({limit} tokens) the prompt leaves, per doc id: {capped}")
        return caps

    @property
    def context_length(self) -> int:
        return int(self._model.config.text_config.max_position_embeddings)

    def _log_kept_tokens(self, task, split, doc_ids, expected: list[list[int]]) -> None:
        records = self.session.pop_records()
        grids = [grid for forward in records for grid in forward]
        n_grids = sum(len(e) for e in expected)
        if len(grids) != n_grids:
            raise hiprune.PruningError(f"{n_grids} visual grids expected in the batch but {len(grids)} went through the method")
        log = self.kept_tokens.setdefault((task, split), {})
        digests = self.kept_digests.setdefault((task, split), {})
        cursor = 0
        for doc_id, sample_expected in zip(doc_ids, expected):
            sample_grids = grids[cursor : cursor + len(sample_expected)]
            cursor += len(sample_expected)
            kept = [grid.tokens_kept for grid in sample_grids]
            if splits_visuals(self.method):  # the method split each image's budget over its grids (HiRED on NeXT)
                # the pipeline checked every image's total (what the processor emitted); the sample's total sums them
                if len(kept) != len(sample_expected) or sum(kept) != sum(sample_expected):
                    raise hiprune.PruningError(f"doc {doc_id}: {kept} visual tokens kept over its grids, expected "
                                               f"{sum(sample_expected)} in all (split by the method)")
            elif kept != list(sample_expected):
                raise hiprune.PruningError(f"doc {doc_id}: {kept} visual tokens kept, expected {list(sample_expected)}")
            digests[doc_id] = selection_digest(sample_grids)
            log[doc_id] = kept

    def _log_llm_pruning(self, task, split, doc_ids, expected: list[list[int]], sequence_length: int) -> None:
        """LLM-side methods (FastV): log what the decoder processed, from the one pruned prefill of this batch.

        The LLM's input holds every visual token (``expected``, checked by :meth:`_log_kept_tokens`); the method drops
        them at the decoder layers of its drop schedule. Per doc this replaces the kept count by the tokens kept per
        image after the last stage, the digest by one of those kept indices, and logs the visual tokens at each
        decoder layer (checked against the schedule). Vision-side methods make no decoder records; one that did
        would be a plumbing error."""
        records = self.session.pop_layer_records()
        name = self.method.name
        if self.method.stage != "llm":
            if records:
                raise hiprune.PruningError(f"method {name!r} prunes before the LLM but {len(records)} decoder-side "
                                           "pruning records appeared")
            return
        n_layers = int(self._model.config.text_config.num_hidden_layers)
        visual_log = self.llm_visual_per_layer.setdefault((task, split), {})
        images_per_doc = {len(sample) for sample in expected}
        if images_per_doc == {0}:  # text only: nothing to prune, and the plumbing must not have pruned
            if records:
                raise hiprune.PruningError(f"{name}: a batch without images made {len(records)} pruned prefill(s)")
            visual_log.update((doc_id, [0] * n_layers) for doc_id in doc_ids)
            return
        if len(records) != 1:
            raise hiprune.PruningError(
                f"{name}: a batch with images must make exactly one pruned prefill (generate with use_cache=True), "
                f"got {len(records)}"
            )
        [record] = records
        # one visual of the drop schedule: an image (LLaVA-NeXT: all its crops as laid out), or a video
        images, per_image_in = record.images, record.visual_in
        # the grids' tokens of every sample (Video-LLaVA: each frame's CLS token comes on top of its grid)
        if images < 1 or any(not 0 < sum(sample) <= images * per_image_in for sample in expected):
            raise hiprune.PruningError(f"{name}: every sample of a batch needs {images} image(s) of {per_image_in} "
                                       f"visual tokens as the prefill pruned, got grids of {expected}")
        indices = record.indices
        schedule = resolve_schedule(self.method, per_image_in, n_layers)
        per_layer = [images * v for v in visual_per_layer(schedule, per_image_in, n_layers)]
        last = schedule[-1].keep + schedule[-1].added  # SparseVLM: recycled tokens come after the kept ones
        if (indices is None or indices.dim() != 2 or record.visual != per_layer or indices.shape[1] != last
                or record.tokens[0] != sequence_length):
            raise hiprune.PruningError(
                f"{name}: the prefill record (visual tokens per layer {record.visual}, tokens {record.tokens}, kept "
                f"indices {None if indices is None else tuple(indices.shape)}) does not match a batch of "
                f"{len(doc_ids)} samples x {images} image(s), {per_image_in} visual tokens each, length "
                f"{sequence_length}"
            )
        rows, remainder = divmod(indices.shape[0], images)
        copies = rows // len(doc_ids)  # generate expands every sample into num_beams rows (repeat_interleave)
        if remainder or copies < 1 or rows != copies * len(doc_ids):
            raise hiprune.PruningError(f"{name}: {indices.shape[0]} kept-index rows for {len(doc_ids)} samples x "
                                       f"{images} image(s)")
        kept = int(indices.shape[1])
        log = self.kept_tokens.setdefault((task, split), {})
        digests = self.kept_digests.setdefault((task, split), {})
        for row, doc_id in enumerate(doc_ids):
            start = row * copies * images
            doc_indices = indices[start : start + images]
            for beam in range(1, copies):  # the copies of one sample share its prefill input, hence its selection
                if not torch.equal(indices[start + beam * images : start + (beam + 1) * images], doc_indices):
                    raise hiprune.PruningError(f"{name}: doc {doc_id}: the {copies} beams of one sample kept "
                                               "different visual tokens")
            log[doc_id] = [kept] * images
            digests[doc_id] = selection_digest([GridRecord(per_image_in, kept, image) for image in doc_indices])
            visual_log[doc_id] = list(record.visual)
            if record.scoring:
                self.llm_scoring.setdefault((task, split), {})[doc_id] = list(record.scoring[row * copies])

    def capped_generation_summary(self) -> dict:
        """Samples whose max_new_tokens was capped to the context their prompt left, and each one's cap."""
        return {
            "capped_samples": sum(len(docs) for docs in self.capped_new_tokens.values()),
            "capped_new_tokens_by_doc": {f"{t}/{s}": docs for (t, s), docs in self.capped_new_tokens.items()},
        }

    def kept_token_summary(self) -> dict:
        """Visual tokens per image actually given to the LLM, over every sample answered so far.

        LLM-side methods (FastV): the tokens kept per image after the last stage of the drop schedule
        ("per_image_target" is its count there), "pruned_from_layer" the first stage's decoder layer;
        "llm_input_per_image" is what the LLM's input held (every visual token)."""
        counts = [c for per_doc in self.kept_tokens.values() for kept in per_doc.values() for c in kept]
        no_image = sum(1 for per_doc in self.kept_tokens.values() for kept in per_doc.values() if not kept)
        summary = {
            "per_image_target": getattr(self, "tokens_per_image", None),
            # what one count is: a whole image (LLaVA-1.5, Qwen2.5-VL), a crop (LLaVA-NeXT), an image or a frame
            "counted_per": self.kept_unit,
            "images": len(counts),
            "samples_without_image": no_image,
            "mean_kept_per_image": (sum(counts) / len(counts)) if counts else None,
            "min_kept_per_image": min(counts) if counts else None,
            "max_kept_per_image": max(counts) if counts else None,
        }
        if self.method.stage == "llm":
            # what the LLM's input held per image, from the per-doc logs (images of one size on LLaVA-1.5 / NeXT's
            # reference; each its own on Qwen2.5-VL; an image or a video on Video-LLaVA)
            inputs = sorted({visual[0] // len(self.kept_tokens[key][doc])
                             for key, per_doc in self.llm_visual_per_layer.items()
                             for doc, visual in per_doc.items() if self.kept_tokens.get(key, {}).get(doc)})
            llm_input = inputs[0] if len(inputs) == 1 else summary["per_image_target"]
            if llm_input is None:  # no image answered yet, or images of several sizes
                summary.update(per_image_target=None, llm_input_per_image=inputs or None, pruned_from_layer=None)
                return summary
            schedule = resolve_schedule(self.method, llm_input, self.decoder_layers)
            summary["per_image_target"] = schedule[-1].keep + schedule[-1].added
            summary.update(llm_input_per_image=llm_input, pruned_from_layer=schedule[0].layer)
        return summary


def list_option(value: Any) -> Any:
    """A method option from ``--model_args``: a value with semicolons is a list (lmms-eval splits the arguments on
    commas): ``layers=2;8;16`` -> [2, 8, 16], ``ratios=0.5;0.25`` -> [0.5, 0.25]; items are ints, floats,
    true / false / none or strings. ``none`` / ``null`` alone is None (``budget=none``); any other value is returned as
    lmms-eval parsed it."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    if not isinstance(value, str) or ";" not in value:
        return value
    items = []
    for item in value.split(";"):
        item = item.strip()
        lowered = item.lower()
        if lowered in ("true", "false"):
            items.append(lowered == "true")
        elif lowered in ("none", "null"):
            items.append(None)
        else:
            try:
                items.append(int(item))
            except ValueError:
                try:
                    items.append(float(item))
                except ValueError:
                    items.append(item)
    return items


def check_option_types(cls: type[HiPruneLMM], loading: dict[str, Any]) -> None:
    """Loading options whose default is a bool (or an int) take only a bool (an int): ``pad_to_square=maybe`` is
    refused, not read as true."""
    for name, value in loading.items():
        default = cls.loading_options.get(name)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be true or false")
        if isinstance(default, int) and not isinstance(default, bool) and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise TypeError(f"{name}={value!r} must be an int")


def lmms_model_class(name: str) -> type[HiPruneLMM]:
    """The harness's lmms-eval model class registered under ``name`` (entry point ``lmms_eval.models``)."""
    try:
        cls = get_model(name)
    except Exception as exc:
        raise ConfigError(f"unknown lmms-eval model {name!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, HiPruneLMM)):
        raise ConfigError(f"lmms-eval model {name!r} is not one of the harness's pruning models")
    return cls


def selection_digest(grids) -> str:
    """Short hash of the kept indices of a sample's grids ("full" grids hash as such)."""
    h = hashlib.blake2b(digest_size=8)
    for grid in grids:
        h.update(b"full" if grid.indices is None else grid.indices.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def cut_and_strip(answers: list[str], until: list[str] | None) -> list[str]:
    """Each answer cut at the first stop string of ``until`` (if any), then stripped."""
    if until:
        answers = [_cut(a, until) for a in answers]
    return [a.strip() for a in answers]


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text

