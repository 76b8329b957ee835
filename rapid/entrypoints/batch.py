"""`rapid batch INPUT OUTPUT`: offline batch inference, JSONL in, JSONL out (in input order).

Each input line is one JSON object with exactly one of
    "prompt": "text"                                   (a plain completion)
    "messages": [{"role": "user", "content": "..."}]   (through the model's chat template)
    "prompt_token_ids": [1, 2, 3]
and optionally "id" (any JSON value; default: the line number), "max_tokens", "temperature" (defaults:
--max-tokens / --temperature) and "sampling_params" (an object of other SamplingParams fields, n = 1).
Blank lines are skipped. Each non-blank line gives one output line:
    {"id", "line", "text", "token_ids", "finish_reason", "stop_reason", "num_prompt_tokens", "num_output_tokens"}
or, for a line that cannot be run (bad JSON, unknown key, empty or too long prompt, bad parameters...),
    {"id", "line", "error"}
and the batch goes on. Lines are read and run in chunks (LLM.generate on a whole chunk at once), so the
engine stays full while memory stays bounded; outputs are written as each chunk finishes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

from rapid.params import SamplingParams

logger = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")
OPTIONAL_KEYS = ("id", "max_tokens", "temperature", "sampling_params")


class LineError(ValueError):
    pass


def parse_line(text: str, lineno: int, defaults: dict[str, Any]) -> tuple[Any, dict, SamplingParams]:
    """(id, prompt spec {'prompt'|'messages'|'prompt_token_ids': ...}, params) or LineError/ValueError/TypeError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LineError(f"a line must be a JSON object, got {type(obj).__name__}")
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
        raise LineError("n must be 1 in a batch file (repeat the line with distinct seeds instead)")
    return obj.get("id", lineno), {given[0]: obj[given[0]]}, params


def _prepare(llm, spec: dict, params: SamplingParams) -> dict:
    """The engine prompt for one line, checked exactly as generate() would check it."""
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
    llm.validate(prompt, params)
    return prompt


def _result(rid, lineno: int, out) -> dict:
    comp = out.outputs[0]
    return {"id": rid, "line": lineno, "text": comp.text, "token_ids": comp.token_ids,
            "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason,
            "num_prompt_tokens": len(out.prompt_token_ids), "num_output_tokens": len(comp.token_ids)}


def _error(rid, lineno: int, e: BaseException) -> dict:
    message = str(e) if isinstance(e, (ValueError, TypeError)) else f"{type(e).__name__}: {e}"
    return {"id": rid, "line": lineno, "error": message}


def run_chunk(llm, lines: list[tuple[int, str]], defaults: dict[str, Any]) -> list[dict]:
    """Records for (line number, text) pairs, in order: valid lines run together, bad ones get an error."""
    records: list[dict | None] = [None] * len(lines)
    todo: list[tuple[int, Any, dict, SamplingParams]] = []  # (slot, id, prompt, params)
    for slot, (lineno, text) in enumerate(lines):
        rid: Any = lineno
        try:
            rid, spec, params = parse_line(text, lineno, defaults)
            todo.append((slot, rid, _prepare(llm, spec, params), params))
        except Exception as e:  # a bad line never stops the batch
            records[slot] = _error(rid, lineno, e)
    if todo:
        try:
            outs = llm.generate([t[2] for t in todo], [t[3] for t in todo], use_tqdm=False)
        except ValueError:
            # Refused by the engine itself (e.g. more KV blocks than the whole pool): find the culprit(s).
            outs = None
        if outs is not None:
            for (slot, rid, _, _), out in zip(todo, outs):
                records[slot] = _result(rid, lines[slot][0], out)
        else:
            for slot, rid, prompt, params in todo:
                try:
                    records[slot] = _result(rid, lines[slot][0], llm.generate(prompt, params, use_tqdm=False)[0])
                except ValueError as e:
                    records[slot] = _error(rid, lines[slot][0], e)
    return records  # type: ignore[return-value]


def _numbered_lines(f: TextIO) -> Iterator[tuple[int, str]]:
    for lineno, text in enumerate(f, start=1):
        if text.strip():
            yield lineno, text


def _chunks(it: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_file(llm, input_path: str, output_path: str, *, max_tokens: int = 128, temperature: float = 0.0,
             chunk_size: int | None = None, use_tqdm: bool = True) -> dict[str, int]:
    """Run every line of `input_path` through `llm`, writing `output_path`; returns {'ok': n, 'errors': m}."""
    defaults = {"max_tokens": max_tokens, "temperature": temperature}
    if chunk_size is None:
        chunk_size = max(64, 4 * llm.config.scheduler.max_num_seqs)
    with open(input_path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    counts = {"ok": 0, "errors": 0}
    bar = tqdm(total=total, desc="Batch", unit="line", disable=not use_tqdm, dynamic_ncols=True)
    try:
        with open(input_path, encoding="utf-8") as f, open(output_path, "w", encoding="utf-8") as out:
            for chunk in _chunks(_numbered_lines(f), chunk_size):
                for rec in run_chunk(llm, chunk, defaults):
                    counts["errors" if "error" in rec else "ok"] += 1
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(chunk))
                bar.set_postfix(errors=counts["errors"])
    finally:
        bar.close()
    return counts


def run_batch(args) -> None:
    """`rapid batch INPUT OUTPUT [--max-tokens N] [--temperature T]` with the engine arguments."""
    from rapid.config import EngineArgs
    from rapid.entrypoints.llm import LLM

    with LLM.from_engine_args(EngineArgs.from_cli_args(args)) as llm:
        counts = run_file(llm, args.input, args.output, max_tokens=args.max_tokens, temperature=args.temperature,
                          chunk_size=getattr(args, "batch_size", None))
    print(f"wrote {counts['ok'] + counts['errors']} records to {args.output} ({counts['errors']} errors)")
