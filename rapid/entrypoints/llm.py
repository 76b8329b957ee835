"""LLM: the offline API, with vLLM's names (generate, chat, shutdown, context manager)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
from tqdm.auto import tqdm

from rapid.config import EngineArgs, EngineConfig
from rapid.model.config import ModelConfig
from rapid.entrypoints.llm_inputs import (
    check_text, check_truncation, parse_prompt, prepare_params, text_parts_joined, to_sampling_params,
)
from rapid.generation_defaults import (
    generation_config_folder, read_eos_ids, read_sampling_defaults,
)
from rapid.entrypoints.delta_router import DeltaRouter
from rapid.entrypoints.llm_outputs import LogprobConverter, apply_delta
from rapid.outputs import CompletionOutput, RequestMetrics, RequestOutput
from rapid.protocol.engine import AddRequest, RequestDelta
from rapid.engine import make_client
from rapid.engine.client import EngineClient
from rapid.core.request import check_fits, truncated_prompt
from rapid.core.tokenizer import load_tokenizer
from rapid.params import SamplingParams

logger = logging.getLogger(__name__)


def read_eos_token_ids(file_ids: list[int], model_cfg: ModelConfig, tokenizer) -> tuple[int, ...]:
    """EOS ids from config.json, generation_config.json (`file_ids`) and the tokenizer, as vLLM stops on any."""
    ids = set(model_cfg.eos_token_ids) | set(file_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class LLM:
    """Offline inference. `LLM()` serves the bundled SmolLM2-135M-Instruct on this machine."""

    __signature__ = EngineArgs.signature()  # what help() and IDEs show: EngineArgs' fields

    def __init__(self, model: str | None = None, **kwargs: Any):
        """The keyword arguments are the fields of rapid.config.EngineArgs (defaults and help text there)."""
        self.engine_args = EngineArgs.from_kwargs("LLM", model=model, **kwargs)
        config = self._config = self.engine_args.create_engine_config()
        # the model's sampling defaults (vLLM's --generation-config and --override-generation-config): what
        # generate / chat run without params
        self.default_sampling_params = read_sampling_defaults(config.generation_config, config.model,
                                                              config.override_generation_config)
        # EOS ids from the generation config's folder (vLLM's: --generation-config FOLDER may correct the model's),
        # checked before the tokenizer loads
        file_eos = read_eos_ids(generation_config_folder(config.generation_config, config.model) or config.model)
        self.model_config = ModelConfig.from_folder(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.eos_token_ids = read_eos_token_ids(file_eos, self.model_config, self.tokenizer)
        self._ids = itertools.count()
        self.engine: EngineClient = make_client(config, self.tokenizer, self.eos_token_ids)
        self._router = DeltaRouter(self.engine)  # generate / generate_stream from several threads or streams
        self._finalizer = weakref.finalize(self, self.engine.shutdown)
        self._logprobs = LogprobConverter(self.tokenizer)
        if self.longest_sequence < config.scheduler.max_model_len:  # a warning only for a length the user set
            level = logging.INFO if self.engine_args.max_model_len is None else logging.WARNING
            logger.log(level, "the KV pool holds %d tokens, fewer than max_model_len (%d): a sequence longer than "
                       "that is refused, and an output without max_tokens stops there; raise kv_cache_memory_bytes "
                       "(or gpu_memory_utilization) or lower max_model_len", self.longest_sequence,
                       config.scheduler.max_model_len)

    @property
    def longest_sequence(self) -> int:
        """The most tokens one sequence can hold: max_model_len, or the whole KV pool where that is smaller."""
        return min(self._config.scheduler.max_model_len, self.engine.num_blocks * self._config.cache.block_size)

    @property
    def config(self) -> EngineConfig:
        """The engine's configuration, max_num_seqs as the engine fitted it to its KV pool (again after a restart)."""
        fitted = self.engine.max_num_seqs
        if self._config.scheduler.max_num_seqs != fitted:
            scheduler = dataclasses.replace(self._config.scheduler, max_num_seqs=fitted)
            self._config = dataclasses.replace(self._config, scheduler=scheduler)
        return self._config

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLM":
        """LLM(**fields of engine_args), e.g. from EngineArgs.from_cli_args(parsed flags)."""
        return cls(**{f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)})

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop the engine and free what it holds (processes, shared memory, GPU memory); later calls raise."""
        self._finalizer()

    close = shutdown  # the name resource owners usually have (`with LLM() as llm:` calls it too)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams generate / chat use when given none, as vLLM's: SamplingParams() with the model's
        defaults (`default_sampling_params`, from the generation_config.json that EngineArgs.generation_config
        names, EngineArgs.override_generation_config on top) in place of its own."""
        return SamplingParams(**self.default_sampling_params)

    # ------------------------------------------------------------------ input checks
    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        text, ids = parse_prompt(prompt, self.tokenizer)
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return text, ids

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """The engine's own fit rule (max_model_len and the whole KV pool), checked before anything is queued."""
        limit, longest = self.config.scheduler.max_model_len, self.longest_sequence
        if len(ids) >= longest:  # the limit /v1/models and /tokenize report
            where = (f"max_model_len is {limit}" if longest == limit else
                     f"the KV pool holds {longest} tokens, fewer than max_model_len ({limit})")
            raise ValueError(f"prompt has {len(ids)} tokens; {where} (prompt + max_tokens must fit)")
        check_fits("this request", len(ids), params.max_tokens, limit, self.engine.num_blocks,
                   self.config.cache.block_size)

    def prepare(self, prompt: Any, sampling_params: Any = None, *, cap_max_tokens: bool = False
                ) -> tuple[str | None, list[int], SamplingParams]:
        """The edge checks generate() applies to one prompt: (prompt text or None, token ids after
        truncate_prompt_tokens, the params the engine runs: max_tokens=None resolved, bad_words tokenized),
        or TypeError / ValueError with the same message generate() would raise. cap_max_tokens (the offline API,
        as vLLM's): a max_tokens past the longest sequence is cut to it, so the output ends there ('length')."""
        params = to_sampling_params(self.get_default_sampling_params() if sampling_params is None else sampling_params)
        check_truncation(params, self.config.scheduler.max_model_len)
        text, ids = self._prompt_ids(prompt)
        ids = truncated_prompt(ids, params)
        longest = self.longest_sequence
        room = longest - len(ids)
        if cap_max_tokens and 0 < room < max(params.max_tokens or 0, params.min_tokens):  # None: up to the room
            params = msgspec.structs.replace(params, max_tokens=min(params.max_tokens or room, room),
                                             min_tokens=min(params.min_tokens, room))
        params = prepare_params(params, len(ids), tokenizer=self.tokenizer, vocab_size=self.model_config.vocab_size,
                                max_model_len=longest)
        self._check_fits(ids, params)
        return text, ids, params

    def validate(self, prompt: Any, sampling_params: SamplingParams | None = None) -> tuple[str | None, list[int]]:
        """`prepare` without the resolved params: (prompt text or None, token ids)."""
        text, ids, _ = self.prepare(prompt, sampling_params)
        return text, ids

    def chat_prompt_ids(self, conversation: list[dict], add_generation_prompt: bool = True, **template: Any
                        ) -> list[int]:
        """One conversation ({'role', 'content'} dicts) through the chat template, as token ids.
        `template`: chat_template, continue_final_message, tools, chat_template_kwargs (as chat())."""
        self._check_chat_ready(template.get("chat_template"))
        if not isinstance(conversation, list) or not conversation or not all(isinstance(m, dict) for m in conversation):
            raise TypeError("a conversation is a non-empty list of {'role': ..., 'content': ...} dicts")
        return self._apply_chat_template(conversation, add_generation_prompt, **template)

    def _check_chat_ready(self, chat_template: str | None = None) -> None:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        if chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {self.config.tokenizer} has no chat template; pass chat_template= "
                             "or use generate()")

    def _apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool, *,
                             chat_template: str | None = None, continue_final_message: bool = False,
                             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> list[int]:
        for i, message in enumerate(conversation):
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                check_text(message["content"], f"message {i}'s content")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True continues the last message: pass add_generation_prompt=False")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            ids = self.tokenizer.apply_chat_template(
                text_parts_joined(conversation), chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tools=tools, tokenize=True, **(chat_template_kwargs or {}))
        except TemplateError as e:  # a template's raise_exception ("roles must alternate ...") or a syntax error
            raise ValueError(f"the chat template refused the conversation: {e}") from None
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _normalise(self, prompts, sampling_params) -> tuple[list, list[SamplingParams]]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
            raise TypeError(f"prompts must be a str, a dict or a list of them, got {type(prompts).__name__}")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, (SamplingParams, dict)):
            params = [to_sampling_params(sampling_params)] * len(prompts)
        elif isinstance(sampling_params, Sequence) and not isinstance(sampling_params, str):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} SamplingParams for {len(prompts)} prompts; give one or one per prompt")
            params = [to_sampling_params(p) for p in sampling_params]
        else:
            raise TypeError("sampling_params must be a SamplingParams (or a dict of its fields) or a list of them")
        return list(prompts), params

    # ------------------------------------------------------------------ generation
    def _check(self, prompts, params) -> list[tuple[str | None, list[int], SamplingParams]]:
        """Every prompt validated (LLM.prepare), before any is enqueued."""
        return [self.prepare(prompt, p, cap_max_tokens=True) for prompt, p in zip(prompts, params)]

    def _submit(self, checked) -> tuple[list[tuple[str, str | None, list[int], SamplingParams]], deque]:
        """Enqueue checked prompts; one entry per (prompt, sample index), and the router's inbox of their deltas
        (the caller closes it)."""
        jobs = []
        for text, ids, p in checked:
            base = str(next(self._ids))
            for i in range(p.n):
                child = p if p.n == 1 else _child_params(p, i)
                jobs.append((base if p.n == 1 else f"{base}-{i}", text, ids, child))
        inbox = self._router.open(rid for rid, *_ in jobs)
        submitted: list[str] = []
        try:
            for rid, text, ids, p in jobs:
                self._router.call(self.engine.add_request, AddRequest(rid, ids, p, prompt=text,
                                                                      arrival_time=time.time()))
                submitted.append(rid)
        except BaseException:
            try:
                if submitted:
                    self._router.abort(submitted)
                    pending = set(submitted)
                    while pending:
                        pending -= {d.request_id for d in self._router.take(inbox) if d.finished}
            finally:
                self._router.close(rid for rid, *_ in jobs)
            raise
        return jobs, inbox

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, lora_request=None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order (n > 1: one RequestOutput with n outputs).
        `lora_request` and `priority`: vLLM's, taken as None / all 0 only (no adapters, first come first served)."""
        _refuse_unsupported(lora_request, priority)
        prompts, params = self._normalise(prompts, sampling_params)
        jobs, inbox = self._submit(self._check(prompts, params))
        results: dict[str, RequestOutput] = {}
        child_to_parent: dict[str, tuple[str, int]] = {}
        order: list[str] = []
        for rid, text, ids, p in jobs:
            parent, _, idx = rid.partition("-")
            if parent not in results:
                results[parent] = RequestOutput(parent, text, ids, [], metrics=RequestMetrics(time.time()))
                order.append(parent)
            results[parent].outputs.append(CompletionOutput(index=int(idx or 0)))
            child_to_parent[rid] = (parent, int(idx or 0))
        pending = set(child_to_parent)
        bar = tqdm(total=len(pending), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        t0, in_toks, out_toks = time.perf_counter(), 0, 0
        try:
            while pending:
                for d in self._router.take(inbox):
                    parent, idx = child_to_parent[d.request_id]
                    apply_delta(results[parent], results[parent].outputs[idx], d, self._logprobs)
                    out_toks += len(d.new_token_ids)
                    if d.error is not None:
                        raise _engine_error(d)
                    if d.finished:
                        pending.discard(d.request_id)
                        in_toks += len(results[parent].prompt_token_ids)
                        bar.update(1)
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix_str(f"in {in_toks / elapsed:.0f} tok/s, out {out_toks / elapsed:.0f} tok/s")
        except BaseException:
            if pending:
                self._router.abort(sorted(pending))
            raise
        finally:
            self._router.close(child_to_parent)
            bar.close()
        for out in results.values():
            out.finished = all(c.finish_reason is not None for c in out.outputs)
        return [results[r] for r in order]

    def generate_stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestDelta]:
        """The output deltas of one prompt as they are produced (text already detokenized). Bad input raises here,
        at the call; the request starts at the first `next()`."""
        prompts, params = self._normalise(prompt, sampling_params)
        if len(prompts) != 1 or params[0].n != 1:
            raise ValueError("generate_stream takes one prompt with n=1")
        return self._stream(self._check(prompts, params))

    def _stream(self, checked) -> Iterator[RequestDelta]:
        ((rid, *_),), inbox = self._submit(checked)
        finished = False
        try:
            while not finished:
                for d in self._router.take(inbox):
                    if d.is_empty:  # it only says the request was scheduled
                        continue
                    if d.error is not None:
                        raise _engine_error(d)
                    finished = d.finished
                    yield d
        finally:  # (also run by the garbage collector for a stream dropped unfinished, maybe inside a poll)
            try:
                if not finished:
                    self._router.abort([rid])
            finally:
                self._router.close([rid])

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, lora_request=None, *,
             chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'} dicts) or a list of them, through the chat template
        (the tokenizer's, or `chat_template`), with vLLM's options (contents reach the template as strings:
        `chat_template_content_format` "auto" or "string")."""
        _refuse_unsupported(lora_request, None)
        if chat_template_content_format not in ("auto", "string"):
            raise ValueError(f"chat_template_content_format {chat_template_content_format!r} is not supported: "
                             "contents reach the template as strings ('auto' or 'string')")
        shape = "messages must be a non-empty list of {'role': ..., 'content': ...} dicts or a list of them"
        if not isinstance(messages, list) or not messages:
            raise TypeError(shape)
        conversations = [messages] if isinstance(messages[0], dict) else messages
        for i, conv in enumerate(conversations):
            if not isinstance(conv, list) or not conv or not all(isinstance(m, dict) for m in conv):
                raise TypeError(f"{shape}; conversation {i} is {type(conv).__name__} {str(conv)[:60]!r}")
        self._check_chat_ready(chat_template)
        template = dict(chat_template=chat_template, continue_final_message=continue_final_message, tools=tools,
                        chat_template_kwargs=chat_template_kwargs)
        prompts = [{"prompt_token_ids": self._apply_chat_template(conv, add_generation_prompt, **template)}
                   for conv in conversations]
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        for out in outs:
            out.prompt = self.tokenizer.decode(out.prompt_token_ids)
        return outs


def _child_params(p: SamplingParams, index: int) -> SamplingParams:
    """The i-th of n samples: n=1, and a distinct seed when the parent is seeded (as vLLM does)."""
    return msgspec.structs.replace(p, n=1, seed=None if p.seed is None else p.seed + index)


def _engine_error(d: RequestDelta) -> Exception:
    from rapid.engine.client import EngineDeadError

    return EngineDeadError(d.error)


def _refuse_unsupported(lora_request, priority) -> None:
    """vLLM's keyword arguments that a script passes at their defaults are taken; real values are refused."""
    if lora_request is not None:
        raise ValueError("LoRA adapters are not supported: lora_request must be None")
    if priority is not None and any(priority):
        raise ValueError(f"priority scheduling is not supported (requests run first come, first served): priority "
                         f"must be None or all 0, got {list(priority)[:8]}")
