"""OpenAI completions and chat over an EngineFrontend: validate, fan out (prompts x n), stream or collect.

Runs on the HTTP server's event loop: the frontend's callbacks hand deltas over through a LoopMailbox (one loop
wake-up per burst), so nothing here blocks the engine loop. A stream that falls behind the engine sends the
tokens that queued up meanwhile in one chunk (as vLLM's server does).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec

from rapid.engine.client import EngineDeadError
from rapid.entrypoints.frontend import EngineFrontend, NeverFitsError, OverloadedError
from rapid.entrypoints.llm_inputs import check_truncation
from rapid.generation_defaults import max_tokens_cap
from rapid.entrypoints.openai import protocol as P
from rapid.entrypoints.openai.mailbox import LoopMailbox
from rapid.entrypoints.openai.metrics import ServerMetrics
from rapid.entrypoints.openai.responses import SSE_DONE, Builder, ChoiceState, sse, usage
from rapid.entrypoints.zmq_limits import ServerLimits
from rapid.params import SamplingParams
from rapid.protocol.engine import RequestDelta

logger = logging.getLogger(__name__)
request_logger = logging.getLogger(__name__ + ".requests")  # log_requests' lines (rapid serve --enable-log-requests)

# OpenAI's and vLLM's default for /v1/completions without the field (chat takes the model's max_new_tokens)
COMPLETION_DEFAULT_MAX_TOKENS = 16


def refused(e: OverloadedError | NeverFitsError, n: int = 1) -> P.ApiError:
    """The frontend's refusal as OpenAI's 429 (retry later), or a 400 when the request alone can never fit."""
    if isinstance(e, NeverFitsError):
        return P.ApiError(400, str(e), param="n" if n > 1 else "prompt")
    return P.ApiError(429, str(e), type="rate_limit_error", code="overloaded")


@dataclass
class Item:
    """One engine request of an HTTP request: choice `index` of prompt `prompt_index`."""

    index: int
    prompt_index: int
    text: str | None
    ids: list[int]
    params: SamplingParams


class Job:
    """The engine requests of one HTTP request and their deltas (consumed on the event loop)."""

    def __init__(self, serving: "OpenAIServing", items: list[Item]):
        self.serving, self.items = serving, items
        self.items_by_index = {it.index: it for it in items}
        self.base = uuid.uuid4().hex
        self.queue: asyncio.Queue[tuple[int, RequestDelta]] = asyncio.Queue()
        self.unfinished: set[int] = set()

    def rid(self, index: int) -> str:
        return f"{self.base}-{index}"

    def submit(self) -> None:
        """Every choice at once, or none (a 429 or 503 leaves nothing in the engine, and nothing in the metrics)."""
        mailbox, frontend = self.serving.mailbox, self.serving.frontend
        try:
            frontend.submit_all([(self.rid(it.index), it.ids, it.params,
                                  lambda d, i=it.index: mailbox.post(self.queue.put_nowait, (i, d)), it.text)
                                 for it in self.items])
            self.unfinished.update(it.index for it in self.items)
        except (OverloadedError, NeverFitsError) as e:
            self.abort()
            raise refused(e, len(self.items) // len({it.prompt_index for it in self.items})) from None
        except EngineDeadError as e:
            self.abort()
            raise P.ApiError(503, f"the engine is not available: {e}", type="service_unavailable") from None
        self.serving.jobs.add(self)

    async def deltas(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        """Each choice's deltas in order; consecutive ones of a choice already queued are merged into one."""
        held = None  # a delta taken off the queue that could not be merged: the next one yielded
        while self.unfinished or held is not None:
            index, d = held if held is not None else await self.queue.get()
            held = None
            self._note(index, d)
            while not self.queue.empty():
                index2, d2 = self.queue.get_nowait()
                if index2 != index or not mergeable(d, d2):
                    held = (index2, d2)
                    break
                self._note(index2, d2)
                d = merged(d, d2)
            yield index, d

    def _note(self, index: int, d: RequestDelta) -> None:
        if d.finished or d.error is not None:
            self.unfinished.discard(index)

    def abort(self) -> None:
        """End every unfinished engine request (their final deltas, finish_reason 'abort', still reach the
        frontend's observers: the server's metrics)."""
        if self.unfinished:
            self.serving.frontend.abort([self.rid(i) for i in sorted(self.unfinished)])
        self.serving.jobs.discard(self)


class RequestConverter:
    """Request Structs to engine Items, every check done here (nothing invalid reaches a worker)."""

    def __init__(self, llm, model_name: str | None, chat_template: str | None = None, aliases: tuple[str, ...] = (),
                 *, trust_request_chat_template: bool = False):
        """`chat_template`: the server's template (`rapid serve --chat-template`) where a request gives none;
        `aliases`: more names requests may use (`--served-model-name A B`); a request's own chat template is
        refused unless `trust_request_chat_template` (vLLM's flag: a template is a program the server runs)."""
        self.llm, self.model_name, self.chat_template = llm, model_name, chat_template
        self.trust_request_chat_template = trust_request_chat_template
        self.max_tokens_cap = max_tokens_cap(llm.config.generation_config, llm.default_sampling_params,
                                             llm.config.override_generation_config)
        self.accepted_models = {model_name, llm.config.model, *aliases} if model_name is not None else None
        # the longest text tokenized at all, the ZeroMQ side's bound (a 20 MB prompt is refused in microseconds)
        self.limits = ServerLimits()
        self.max_chars = self.limits.max_prompt_chars(llm.config.scheduler.max_model_len)

    def _check_chars(self, size: int, what: str, param: str) -> None:
        if size > self.max_chars:
            raise P.ApiError(400, f"{what} has {size} characters; at most {self.max_chars} are tokenized "
                             f"(max_model_len {self.llm.config.scheduler.max_model_len} x "
                             f"{self.limits.max_chars_per_token} characters per token)", param=param)

    def _check_messages_size(self, req) -> None:
        """The messages' size as JSON (an upper bound of their text) against the same bound, before the template."""
        self._check_chars(len(msgspec.json.encode(req.messages)), "the messages' JSON", "messages")

    def _check_model(self, req) -> None:
        if self.accepted_models is not None and req.model is not None and req.model not in self.accepted_models:
            raise P.ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                             param="model", code="model_not_found")

    def _validate(self, prompt, req, param: str = "prompt") -> tuple[str | None, list[int]]:
        """(text, ids) of one prompt, truncate_prompt_tokens applied, or ApiError 400."""
        try:
            truncate = SamplingParams(max_tokens=1, truncate_prompt_tokens=req.truncate_prompt_tokens)
            check_truncation(truncate, self.llm.config.scheduler.max_model_len)
        except (ValueError, TypeError) as e:
            raise P.ApiError(400, str(e), param="truncate_prompt_tokens") from None
        try:
            return self.llm.validate(prompt, truncate)
        except (ValueError, TypeError) as e:
            raise P.ApiError(400, str(e), param=param) from None

    def _items(self, req, prompts: list[tuple[str | None, list[int]]], max_tokens, logprobs) -> list[Item]:
        """`max_tokens` None: the model's default (generation_config.json's max_new_tokens), within the room left."""
        items, index = [], itertools.count()
        limit = self.llm.longest_sequence  # max_model_len, or the KV pool where it is smaller
        model = self.llm.default_sampling_params  # generation_config.json's, for what the request leaves out
        if max_tokens is not None and self.max_tokens_cap is not None:
            max_tokens = min(max_tokens, self.max_tokens_cap)
        for p_idx, (text, ids) in enumerate(prompts):
            room = max(limit - len(ids), 1)
            for i in range(req.n):
                params = P.sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, index=i, defaults=model,
                                           default_max_tokens=min(model.get("max_tokens", room), room))
                try:  # the params the engine runs: max_tokens=None resolved, bad_words tokenized
                    _, ids_run, params = self.llm.prepare({"prompt_token_ids": ids}, params)
                except (ValueError, TypeError) as e:  # the field it names; else the length (prompt + max_tokens)
                    raise P.field_error(e, req, "max_tokens") from None
                items.append(Item(next(index), p_idx, text, ids_run, params))
        return items

    def completion_items(self, req: P.CompletionRequest) -> list[Item]:
        self._check_model(req)
        given = P.prompts(req)
        for p in given:
            if isinstance(p, str):
                self._check_chars(len(p), "a prompt", "prompt")
        prompts = [self._validate(p if isinstance(p, str) else {"prompt_token_ids": p}, req) for p in given]
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is msgspec.UNSET else req.max_tokens
        return self._items(req, prompts, max_tokens, req.logprobs)

    def chat_items(self, req: P.ChatCompletionRequest) -> list[Item]:
        self._check_model(req)
        self._check_messages_size(req)
        _, ids = self._validate({"prompt_token_ids": self._chat_prompt_ids(req)}, req, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return self._items(req, [(None, ids)], max_tokens, P.chat_logprobs(req))

    def _chat_prompt_ids(self, req: P.ChatCompletionRequest | P.TokenizeRequest) -> list[int]:
        """The messages through the chat template (the request's, else the server's), or ApiError 400."""
        own = req.chat_template is not None or "chat_template" in (req.chat_template_kwargs or {})
        if own and not self.trust_request_chat_template:
            raise P.ApiError(400, "the request carries a chat template, which this server does not run: it uses "
                             "its own (`rapid serve --chat-template`, else the tokenizer's); start it with "
                             "--trust-request-chat-template to let requests bring theirs", param="chat_template")
        try:
            return self.llm.chat_prompt_ids(P.chat_messages(req), req.add_generation_prompt,
                                            chat_template=req.chat_template or self.chat_template,
                                            continue_final_message=req.continue_final_message,
                                            chat_template_kwargs=req.chat_template_kwargs)
        except (ValueError, TypeError) as e:
            raise P.ApiError(400, str(e), param="messages") from None

    def tokenize(self, req: P.TokenizeRequest) -> dict:
        """vLLM's /tokenize: {"count", "max_model_len", "tokens", "token_strs"} of a prompt or of messages (the chat
        template); token_strs (the tokenizer's token strings) only when asked for, else null."""
        self._check_model(req)
        if (req.prompt is None) == (req.messages is None):
            raise P.ApiError(400, "give exactly one of prompt and messages", param="prompt")
        tokenizer = self.llm.tokenizer
        if tokenizer is None:
            raise P.ApiError(400, "this server has no tokenizer (skip_tokenizer_init)", param="prompt")
        if req.prompt is not None:
            self._check_chars(len(req.prompt), "the prompt", "prompt")
            ids = list(tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        else:
            self._check_messages_size(req)
            ids = self._chat_prompt_ids(req)
        token_strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.llm.longest_sequence, "tokens": ids, "token_strs": token_strs}

    def detokenize(self, req: P.DetokenizeRequest) -> dict:
        """vLLM's /detokenize: {"prompt"} of token ids."""
        self._check_model(req)
        vocab = self.llm.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise P.ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        if self.llm.tokenizer is None:
            raise P.ApiError(400, "this server has no tokenizer (skip_tokenizer_init)", param="tokens")
        return {"prompt": self.llm.tokenizer.decode(req.tokens)}

    def builder(self, chat: bool, logprobs: int | None, return_token_ids: bool = False) -> Builder:
        prefix = "chatcmpl" if chat else "cmpl"
        return Builder(f"{prefix}-{uuid.uuid4().hex}", self.model_name or self.llm.config.model, chat,
                       self.llm.tokenizer, logprobs, return_token_ids)


class OpenAIServing(RequestConverter):
    """Turns request bodies into engine requests on the frontend and engine deltas into OpenAI bodies."""

    def __init__(self, frontend: EngineFrontend, model_name: str, metrics: ServerMetrics,
                 chat_template: str | None = None, aliases: tuple[str, ...] = (), log_requests: bool = False,
                 trust_request_chat_template: bool = False):
        """`log_requests`: an INFO line per engine request received (vLLM's --enable-log-requests)."""
        super().__init__(frontend.llm, model_name, chat_template, aliases,
                         trust_request_chat_template=trust_request_chat_template)
        self.frontend, self.metrics, self.log_requests = frontend, metrics, log_requests
        self.jobs: set[Job] = set()  # touched on the event loop only
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.mailbox: LoopMailbox | None = None  # the engine thread's way onto the event loop
        self.stop_metrics = frontend.observe_requests(metrics.track)  # ZeroMQ's requests beside these too
        # Tokenizing and templating run here, one request at a time, so a long prompt never stalls the event loop
        # (its streams, /health) while it is tokenized.
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapid-http-tokenize")

    def completion_items(self, req: P.CompletionRequest) -> list[Item]:
        """As RequestConverter's, after the 429 (or 400) the frontend would give its prompts x n choices, before
        tokenizing (100,000 prompts took 5.9 s to reach it)."""
        try:
            self.frontend.check_room(len(P.prompts(req)) * req.n)
        except (OverloadedError, NeverFitsError) as e:
            raise refused(e, req.n) from None
        return super().completion_items(req)

    async def off_loop(self, fn: Callable, *args):
        """fn(*args) on the tokenizing thread (completion_items, chat_items, tokenize, detokenize)."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)
        except RuntimeError:  # closed: the executor takes nothing more
            raise P.ApiError(503, "the server is shutting down", type="service_unavailable") from None
        return await future

    # ------------------------------------------------------------------ running
    def start(self, items: list[Item], response_id: str) -> Job:
        """Submit `items` (the engine requests of response `response_id`), logged first when log_requests."""
        if self.closing:
            raise P.ApiError(503, "the server is shutting down", type="service_unavailable")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self.mailbox = loop, LoopMailbox(loop)
        job = Job(self, items)
        if self.log_requests:
            for it in items:
                request_logger.info("received request %s (response %s): prompt of %d tokens, %s", job.rid(it.index),
                                    response_id, len(it.ids), it.params)
        job.submit()
        for n in collections.Counter(it.prompt_index for it in items).values():  # its choices per prompt
            self.metrics.observe_request_n(n)
        return job

    def abort_all(self, timeout_s: float = 5.0) -> None:
        """From any thread: abort every request in flight (each still ends with a final message)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def abort() -> None:
            for job in list(self.jobs):
                job.abort()

        try:
            asyncio.run_coroutine_threadsafe(abort(), loop).result(timeout_s)
        except Exception as e:  # the loop stopped meanwhile: nothing is left to abort
            logger.warning("aborting in-flight HTTP requests failed: %s", e)

    def close(self) -> None:
        """The server is done: its metrics stop following the frontend's requests (the frontend may serve on)."""
        self.closing = True
        self.stop_metrics()
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    async def collect(self, job: Job, builder: Builder) -> dict:
        """The whole response once every choice finished; ApiError 503 if the engine failed."""
        choices = {it.index: ChoiceState(it.index, it.prompt_index) for it in job.items}
        try:
            async for index, d in job.deltas():
                if d.error is not None:
                    raise P.ApiError(503, f"the engine failed: {d.error}", type="service_unavailable")
                apply_delta(choices[index], d)
        finally:
            job.abort()
        prompt_tokens = sum(len(ids) for ids in prompt_ids(job.items))
        return builder.response(list(choices.values()), prompt_tokens, {it.index: it.ids for it in job.items})

    async def stream(self, job: Job, builder: Builder, include_usage: bool, continuous_usage: bool = False
                     ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta, a usage chunk if asked, then [DONE]. `continuous_usage`
        (vLLM's stream_options.continuous_usage_stats, with include_usage): each chunk carries its choice's usage."""
        role_sent = set() if builder.chat else {it.index for it in job.items}  # completions send no role chunk
        ids_sent: set[int] = set()  # choices whose prompt token ids went out (return_token_ids)
        offsets = {it.index: 0 for it in job.items}
        produced = {it.index: 0 for it in job.items}
        prompt_len = {it.index: len(it.ids) for it in job.items}
        completion_tokens = 0
        try:
            async for index, d in job.deltas():
                if d.error is not None:
                    yield sse(P.ApiError(503, f"the engine failed: {d.error}", type="service_unavailable").body())
                    continue
                completion_tokens += len(d.new_token_ids)
                produced[index] += len(d.new_token_ids)
                entries = list(zip(d.new_token_ids, d.new_logprobs or []))
                reason = d.finish_reason if d.finished else None
                if index not in role_sent:  # chat: a chunk with the role alone comes first, as OpenAI's and vLLM's
                    body = builder.chunk(index, "", None, None, first=True, include_usage=include_usage, token_ids=[],
                                         prompt_token_ids=job.items_by_index[index].ids)
                    if include_usage and continuous_usage:
                        body["usage"] = usage(prompt_len[index], 0)
                    yield sse(body)
                    role_sent.add(index)
                    ids_sent.add(index)
                if not d.new_token_ids and not d.new_text and reason is None:
                    continue  # nothing new (a token whose text is held back still gets its chunk, as vLLM)
                body = builder.chunk(index, d.new_text, entries, reason,
                                     stop_reason=d.stop_reason if d.finished else None,
                                     text_offset=offsets[index], include_usage=include_usage,
                                     token_ids=d.new_token_ids,
                                     prompt_token_ids=None if index in ids_sent else job.items_by_index[index].ids)
                if include_usage and continuous_usage:
                    body["usage"] = usage(prompt_len[index], produced[index])
                yield sse(body)
                ids_sent.add(index)
                offsets[index] += len(d.new_text)
            if include_usage:
                prompt_tokens = sum(len(ids) for ids in prompt_ids(job.items))
                yield sse(builder.usage_chunk(prompt_tokens, completion_tokens))
            yield SSE_DONE
        finally:  # also when the client went away (the response task is cancelled)
            job.abort()


def mergeable(a: RequestDelta, b: RequestDelta) -> bool:
    """`b` can join `a` in one chunk: `a` is not the last, and neither carries an error or logprobs."""
    return (not a.finished and a.error is None and b.error is None and a.new_logprobs is None
            and b.new_logprobs is None and a.prompt_logprobs is None and b.prompt_logprobs is None)


def merged(a: RequestDelta, b: RequestDelta) -> RequestDelta:
    """One delta with `a`'s tokens then `b`'s; the end state (finish, last token time) is `b`'s."""
    return msgspec.structs.replace(
        a, new_token_ids=a.new_token_ids + b.new_token_ids, new_text=a.new_text + b.new_text,
        cumulative_logprob=b.cumulative_logprob, finished=b.finished, finish_reason=b.finish_reason,
        stop_reason=b.stop_reason, last_token_time=b.last_token_time or a.last_token_time,
        first_token_time=a.first_token_time or b.first_token_time, num_cached_tokens=max(a.num_cached_tokens,
                                                                                          b.num_cached_tokens))


def apply_delta(c: ChoiceState, d: RequestDelta) -> None:
    c.text += d.new_text
    c.token_ids.extend(d.new_token_ids)
    if d.new_logprobs is not None:
        c.logprobs.extend(zip(d.new_token_ids, d.new_logprobs))
    if d.finished:
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason


def prompt_ids(items: list[Item]) -> list[list[int]]:
    """Each prompt once (its n choices share it)."""
    seen: dict[int, list[int]] = {}
    for it in items:
        seen.setdefault(it.prompt_index, it.ids)
    return list(seen.values())
