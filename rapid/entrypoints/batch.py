"""`rapid batch INPUT OUTPUT`: offline batch inference, JSONL in, JSONL out, written as results finish.

Two input line formats (mixable; blank lines are skipped):
- OpenAI batch (as `vllm run_batch` reads): {"custom_id", "method": "POST", "url": "/v1/chat/completions" or
  "/v1/completions", "body": {...}}. Output: {"id", "custom_id", "response": {"status_code", "request_id",
  "body"}, "error"}; a line that fails has status_code 400 (or 500), body {"error": {...}} and "error"
  {"code", "message"}, and keeps its custom_id.
- Simple: exactly one of "prompt" / "messages" / "prompt_token_ids", optionally "id" (default: the line
  number), "max_tokens", "temperature" (defaults: --max-tokens / --temperature) and "sampling_params"
  (other SamplingParams fields, n = 1). Output: {"id", "line", "text", "token_ids", "finish_reason",
  "stop_reason", "num_prompt_tokens", "num_output_tokens"} or {"id", "line", "error"}.

Each result is one whole line, written and flushed as its request finishes (so not in input order). OUTPUT `-`
is standard output (as is any OUTPUT that is no regular file, such as /dev/stdout: never read back). A re-run
on the same OUTPUT file skips the lines whose custom_id (or simple "id") it holds a result for, removes its error
records, and appends the rest: failed lines are tried again.
At most `chunk_size` lines are in the engine at once, so memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm.auto import tqdm

from rapid.entrypoints.openai import protocol as P
from rapid.entrypoints.openai.responses import ChoiceState
from rapid.entrypoints.openai.serving import Item, RequestConverter, apply_delta, prompt_ids
from rapid.params import SamplingParams
from rapid.protocol.engine import AddRequest

logger = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")
OPTIONAL_KEYS = ("id", "max_tokens", "temperature", "sampling_params")
OPENAI_KEYS = ("custom_id", "method", "url", "body")
OPENAI_URLS = {"/v1/chat/completions": True, "/v1/completions": False}  # url -> chat?


class LineError(ValueError):
    pass


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during run_file: what was written by then ({'ok', 'errors', 'skipped'}), all of it whole lines."""

    def __init__(self, counts: dict[str, int]):
        super().__init__(f"interrupted after {counts['ok'] + counts['errors']} records")
        self.counts = counts


@dataclass
class Unit:
    """One input line: its engine Items (none if it failed to parse) and how to write its result."""

    lineno: int
    key: Any  # custom_id (OpenAI) or id (simple)
    openai: bool
    chat: bool = False
    items: list[Item] = field(default_factory=list)
    builder: Any = None
    error: BaseException | None = None
    choices: dict[int, ChoiceState] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)


def parse_simple(obj: dict, lineno: int, defaults: dict[str, Any]) -> tuple[Any, dict, SamplingParams]:
    """(id, prompt spec {'prompt'|'messages'|'prompt_token_ids': ...}, params) or LineError/ValueError/TypeError."""
    unknown = set(obj) - set(PROMPT_KEYS) - set(OPTIONAL_KEYS)
    if unknown:
        raise LineError(f"unknown key(s) {sorted(unknown)}; allowed: {list(PROMPT_KEYS + OPTIONAL_KEYS)}")
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise LineError(f"a line needs exactly one of {list(PROMPT_KEYS)}, got {given or 'none'}")
    extra = obj.get("sampling_params", {})
    if not isinstance(extra, dict):
        raise LineError("sampling_params must be an object")
    fields = {**defaults, **extra}
    for k in ("max_tokens", "temperature"):
        if k in obj:
            fields[k] = obj[k]
    params = SamplingParams(**fields)
    if params.n != 1:
        raise LineError("n must be 1 in a simple batch line (repeat the line with distinct seeds, or use the "
                        "OpenAI batch format)")
    return obj.get("id", lineno), {given[0]: obj[given[0]]}, params


def _simple_items(llm, spec: dict, params: SamplingParams) -> list[Item]:
    if "messages" in spec:
        messages = spec["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise LineError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        prompt: Any = {"prompt_token_ids": llm.chat_prompt_ids(messages)}
    elif "prompt" in spec:
        prompt = spec["prompt"]
        if not isinstance(prompt, str):
            raise LineError(f"prompt must be a string, got {type(prompt).__name__}")
    else:
        prompt = {"prompt_token_ids": spec["prompt_token_ids"]}
    text, ids, params = llm.prepare(prompt, params, cap_max_tokens=True)  # as LLM.generate
    return [Item(0, 0, text, ids, params)]


def parse_unit(llm, converter: RequestConverter, text: str, lineno: int, defaults: dict[str, Any]) -> Unit:
    """A Unit for one line; a bad line gets a Unit with `error` set (and its key when it could be read)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Unit(lineno, lineno, False, error=LineError(f"invalid JSON: {e}"))
    if not isinstance(obj, dict):
        return Unit(lineno, lineno, False, error=LineError(f"a line must be a JSON object, got {type(obj).__name__}"))
    if "custom_id" in obj or "body" in obj or "url" in obj:
        unit = Unit(lineno, obj.get("custom_id"), True)
        try:
            if not isinstance(unit.key, str) or not unit.key:
                raise P.ApiError(400, "custom_id must be a non-empty string", param="custom_id")
            unknown = set(obj) - set(OPENAI_KEYS)
            if unknown:
                raise P.ApiError(400, f"unknown key(s) {sorted(unknown)}; allowed: {list(OPENAI_KEYS)}")
            if obj.get("method", "POST") != "POST" or obj.get("url") not in OPENAI_URLS:
                raise P.ApiError(400, f"method must be 'POST' and url one of {list(OPENAI_URLS)}, got "
                                 f"{obj.get('method')!r} {obj.get('url')!r}", param="url")
            unit.chat = OPENAI_URLS[obj["url"]]
            body = json.dumps(obj.get("body")).encode()
            req = P.decode(body, P.ChatCompletionRequest if unit.chat else P.CompletionRequest)
            if req.stream:
                raise P.ApiError(400, "stream is not supported in a batch", param="stream")
            unit.items = converter.chat_items(req) if unit.chat else converter.completion_items(req)
            unit.builder = converter.builder(unit.chat, P.chat_logprobs(req) if unit.chat else req.logprobs)
        except Exception as e:
            unit.error = e
        return unit
    unit = Unit(lineno, obj.get("id", lineno), False)
    if unit.key is None or isinstance(unit.key, (dict, list)):  # _done_keys could not find it again
        unit.key, unit.error = lineno, LineError(f"id must be a string or a number, got {obj['id']!r}")
        return unit
    try:
        unit.key, spec, params = parse_simple(obj, lineno, defaults)
        unit.items = _simple_items(llm, spec, params)
    except Exception as e:  # a bad line never stops the batch
        unit.error = e
    return unit


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, (ValueError, TypeError)) else f"{type(e).__name__}: {e}"


def record(unit: Unit) -> dict:
    """The output line of a finished (or failed) unit."""
    if not unit.openai:
        if unit.error is not None:
            return {"id": unit.key, "line": unit.lineno, "error": _message(unit.error)}
        c, ids = unit.choices[0], unit.items[0].ids
        return {"id": unit.key, "line": unit.lineno, "text": c.text, "token_ids": c.token_ids,
                "finish_reason": c.finish_reason, "stop_reason": getattr(c, "stop_reason", None),
                "num_prompt_tokens": len(ids), "num_output_tokens": len(c.token_ids)}
    request_id = f"batch-req-{uuid.uuid4().hex}"
    out = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": unit.key}
    if unit.error is None:
        body = unit.builder.response(list(unit.choices.values()), sum(len(i) for i in prompt_ids(unit.items)))
        return out | {"response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
    e = unit.error
    api = e if isinstance(e, P.ApiError) else P.ApiError(400 if isinstance(e, (ValueError, TypeError)) else 500,
                                                         _message(e), type="invalid_request_error"
                                                         if isinstance(e, (ValueError, TypeError)) else "server_error")
    return out | {"response": {"status_code": api.status, "request_id": request_id, "body": api.body()},
                  "error": {"code": api.code or api.type, "message": api.message}}


def _failed(rec: dict) -> bool:
    response = rec.get("response")
    return rec.get("error") is not None or (isinstance(response, dict) and response.get("status_code") != 200)


def is_stream(path: str) -> bool:
    """`-` (standard output) or an existing path that is no regular file (/dev/stdout, a pipe): written, never
    read back for a resume."""
    return path == "-" or (os.path.exists(path) and not os.path.isfile(path))


@contextmanager
def open_output(path: str) -> Iterator[TextIO]:
    """OUTPUT opened for appending; `-`: standard output (left open)."""
    if path == "-":
        yield sys.stdout
    else:
        with open(path, "a", encoding="utf-8") as f:
            yield f


def _done_keys(path: str) -> set:
    """custom_ids / ids already done in OUTPUT. Its error records (and a torn last line from a crash) are
    removed from the file, so a re-run redoes those lines and OUTPUT keeps one record per line."""
    keys: set = set()
    if is_stream(path) or not os.path.exists(path):
        return keys
    with open(path, "rb") as f:
        data = f.read()
    kept: list[str] = []
    lines = data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines()
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = rec.get("custom_id", rec.get("id")) if isinstance(rec, dict) else None
        if key is None or isinstance(key, (dict, list)) or _failed(rec):
            continue
        keys.add(json.dumps(key))
        kept.append(line)
    if len(kept) != len(lines) or (data and not data.endswith(b"\n")):
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)  # never a half-written OUTPUT, even if this run is killed now
    return keys


def _numbered_lines(f: TextIO) -> Iterator[tuple[int, str]]:
    for lineno, text in enumerate(f, start=1):
        if text.strip():
            yield lineno, text


class _Runner:
    """Keeps up to `window` lines in the engine, writing each line's result when its last request finishes."""

    def __init__(self, llm, out: TextIO, bar, counts: dict[str, int]):
        self.llm, self.out, self.bar, self.counts = llm, out, bar, counts
        self.units: dict[str, tuple[Unit, int]] = {}  # engine request id -> (unit, item index)
        self.active: set[int] = set()  # line numbers in flight

    def write(self, unit: Unit) -> None:
        rec = record(unit)
        failed = unit.error is not None
        self.counts["errors" if failed else "ok"] += 1
        self.out.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one write per whole line
        self.out.flush()
        self.bar.update(1)
        self.bar.set_postfix(errors=self.counts["errors"])

    def add(self, unit: Unit) -> None:
        if unit.error is not None:
            self.write(unit)
            return
        submitted = []
        try:
            for it in unit.items:
                rid = f"{unit.lineno}-{it.index}"
                self.llm.engine.add_request(AddRequest(rid, it.ids, it.params, prompt=it.text))
                submitted.append(rid)
                self.units[rid] = (unit, it.index)
                unit.choices[it.index] = ChoiceState(it.index, it.prompt_index)
                unit.pending.add(it.index)
        except ValueError as e:  # refused by the engine (e.g. more KV blocks than the whole pool)
            if submitted:
                self.llm.engine.abort(submitted)
            unit.error = e
            if unit.pending:  # written once the aborted requests' final deltas are in
                self.active.add(unit.lineno)
            else:
                self.write(unit)
            return
        self.active.add(unit.lineno)

    def pump(self) -> None:
        for d in self.llm.engine.get_deltas(timeout_s=0.1):
            entry = self.units.get(d.request_id)
            if entry is None:
                continue
            unit, index = entry
            apply_delta(unit.choices[index], d)
            unit.choices[index].stop_reason = d.stop_reason
            if d.error is not None:
                unit.error = unit.error or RuntimeError(f"engine error: {d.error}")
            if d.finished or d.error is not None:
                del self.units[d.request_id]
                unit.pending.discard(index)
                if not unit.pending:
                    self.active.discard(unit.lineno)
                    self.write(unit)


def run_file(llm, input_path: str, output_path: str, *, max_tokens: int = 128, temperature: float = 0.0,
             chunk_size: int | None = None, use_tqdm: bool = True) -> dict[str, int]:
    """Run every line of `input_path` not yet in `output_path` (appending); returns {'ok', 'errors', 'skipped'}."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"the batch size (lines in the engine at once) must be >= 1, got {chunk_size}")
    _check_distinct(input_path, output_path)
    defaults = {"max_tokens": max_tokens, "temperature": temperature}
    window = chunk_size or max(64, 4 * llm.config.scheduler.max_num_seqs)
    converter = RequestConverter(llm, None, trust_request_chat_template=True)  # the user's own file
    done = _done_keys(output_path)
    with open(input_path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    counts = {"ok": 0, "errors": 0, "skipped": 0}
    bar = tqdm(total=total, desc="Batch", unit="line", disable=not use_tqdm, dynamic_ncols=True)
    runner = None
    try:
        with open(input_path, encoding="utf-8") as f, open_output(output_path) as out:
            runner = _Runner(llm, out, bar, counts)
            for lineno, text in _numbered_lines(f):
                unit = parse_unit(llm, converter, text, lineno, defaults)
                if json.dumps(unit.key) in done and unit.key is not None:
                    counts["skipped"] += 1
                    bar.update(1)
                    continue
                runner.add(unit)
                while len(runner.active) >= window:
                    runner.pump()
            while runner.active:
                runner.pump()
    except BaseException as e:
        if runner is not None and runner.units:
            llm.engine.abort(sorted(runner.units))
        if isinstance(e, KeyboardInterrupt):
            raise BatchInterrupted(counts) from None
        raise
    finally:
        bar.close()
    return counts


def _check_distinct(input_path: str, output_path: str) -> None:
    """The output is appended to and repaired on resume: it must not be the input (the same file by any path)."""
    if not is_stream(output_path) and os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise ValueError(f"the output {output_path} is the input file {input_path}: give another output path")


def run_batch(args) -> int:
    """`rapid batch INPUT OUTPUT [--max-tokens N] [--temperature T]`; exit status 1 when any line failed."""
    from rapid.config import EngineArgs
    from rapid.entrypoints.llm import LLM
    from rapid.worker.gc_heap import startup_heap_frozen

    if os.path.isdir(args.input):
        raise IsADirectoryError(f"{args.input}: the input is a folder; give a JSONL file")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: no such input file")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_distinct(args.input, args.output)  # before the engine starts
    with open_output(args.output):  # the output can be written (a missing folder fails now, not later)
        pass
    where = "standard output" if args.output == "-" else args.output
    try:
        with LLM.from_engine_args(EngineArgs.from_cli_args(args)) as llm, startup_heap_frozen("rapid batch"):
            counts = run_file(llm, args.input, args.output, max_tokens=args.max_tokens,
                              temperature=args.temperature, chunk_size=args.batch_size)
    except BatchInterrupted as e:
        resume = "" if is_stream(args.output) else "; run the same command again to do the rest"
        print(f"interrupted: wrote {e.counts['ok'] + e.counts['errors']} records to {where}{resume}", file=sys.stderr)
        return 130
    skipped = f", {counts['skipped']} already done" if counts["skipped"] else ""
    print(f"wrote {counts['ok'] + counts['errors']} records to {where} ({counts['errors']} errors{skipped})",
          file=sys.stderr if is_stream(args.output) else sys.stdout)
    return 1 if counts["errors"] else 0
