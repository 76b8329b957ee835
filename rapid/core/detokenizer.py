"""Incremental detokenization with stop strings.

`IncrementalDetokenizer` turns one request's generated token ids into text deltas, one token at a
time, with the prefix_offset / read_offset algorithm of HF text-generation-inference and vLLM:

    ids:  ... [prefix_offset ........ read_offset) [read_offset ...... end)
               already emitted context               not yet emitted

    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]   if new_text grew and does not end in U+FFFD

Decoding a short window (not the whole output) keeps each step O(1)-ish, and decoding with a few
tokens of left context keeps tokenizer-specific joins right: byte-level BPE bytes that only form a
character together, SentencePiece's "▁" word boundaries and leading-space stripping.  A window whose
text ends in U+FFFD holds an incomplete UTF-8 character; it is not emitted until a later token
completes it.  The window starts inside the prompt's last tokens, so the first output token is
decoded in context (for SentencePiece tokenizers a first token "▁Hello" yields " Hello").

Stop strings are searched in the decoded text, across token boundaries.  Unless
include_stop_str_in_output, text that could still be the beginning of a stop string is held back
from the deltas until it is resolved, so a streaming client never sees text that is later trimmed;
`flush()` releases it when generation ends for another reason (EOS, max_tokens).

Invariant: ``"".join(deltas) == detok.text``.  After `flush()` (or a stop), for byte-level BPE
tokenizers and for SentencePiece ones with an empty prompt, ``text`` equals
``tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``,
trimmed at the stop string; with a prompt, SentencePiece output is the continuation of the prompt's
text (``decode(prompt + output)[len(decode(prompt)):]``).  Tokenization-space clean-up is never
applied (as in vLLM).  Known limits, shared with vLLM: a byte-fallback decoder replaces a whole
*invalid* byte run by U+FFFDs, which piecewise decoding cannot reproduce exactly (valid UTF-8 is
exact); a prompt that ends inside a character is not used as context.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

__all__ = ["DetokenizerResult", "IncrementalDetokenizer"]

# Prompt tokens used as left context for the first output token.
INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class DetokenizerResult(NamedTuple):
    """What one `add_token` produced: the new text (maybe "") and the stop string matched, if any."""

    delta: str
    matched_stop: str | None


def _make_decode(tokenizer: Any, skip_special_tokens: bool) -> tuple[Callable[[list[int]], str], int]:
    """(decode(ids) -> str, vocabulary size including added tokens) for a HF or `tokenizers` tokenizer.

    For HF fast tokenizers this calls the Rust backend directly: the same text as
    ``tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`` without
    the Python overhead.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and _overrides_decode(tokenizer):
        backend = None  # a tokenizer class with its own decode: call it
    if backend is None and hasattr(tokenizer, "get_vocab_size") and hasattr(tokenizer, "decode"):
        backend = tokenizer  # a bare tokenizers.Tokenizer
    if backend is not None:
        size = backend.get_vocab_size(with_added_tokens=True)

        def decode(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode, size

    def decode_slow(ids: list[int]) -> str:
        return tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    return decode_slow, len(tokenizer)


def _overrides_decode(tokenizer: Any) -> bool:
    """True when a HF fast tokenizer's class changes `_decode` beyond the backend's decode."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    base = getattr(PreTrainedTokenizerFast, "_decode", None)
    return base is not None and getattr(type(tokenizer), "_decode", base) is not base


def _held_back_length(text: str, stops: Sequence[str], max_len: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max_len - 1), 0, -1):
        suffix = text[-n:]
        if any(s.startswith(suffix) for s in stops):
            return n
    return 0


class IncrementalDetokenizer:
    """Streams one request's output text.

    tokenizer:        a Hugging Face tokenizer (fast or slow) or a `tokenizers.Tokenizer`.
    prompt_token_ids: the prompt; its last few tokens give the first output token its context.
    stop:             stop strings (may span tokens); output is trimmed at the first one completed.
    min_tokens:       stop strings are looked for only once more tokens than this were added (vLLM's rule: one
                      that completes later may begin in earlier text).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] | str | None = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._decode, self._vocab_size = _make_decode(tokenizer, skip_special_tokens)
        self._stop: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not s for s in self._stop):
            raise ValueError(f"stop strings must be non-empty, got {self._stop!r}")
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens  # stop strings match only in text decoded after this many tokens, as vLLM
        self._max_stop_len = max((len(s) for s in self._stop), default=0)

        # Window state: ids[prefix_offset:read_offset] is emitted context; ids[read_offset:] is
        # decoded-but-not-yet-stable.  Starts with the prompt's tail as context.
        self._ids: list[int] = [
            t for t in list(prompt_token_ids)[-INITIAL_CONTEXT_TOKENS:] if 0 <= t < self._vocab_size
        ]
        self._prefix_text = self._decode(self._ids) if self._ids else ""
        if self._prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character (prompt given as ids): its bytes cannot be context
            # for the output, which then decodes on its own, as tokenizer.decode(output_ids) does.
            self._ids, self._prefix_text = [], ""
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._num_output_tokens = 0

        # Text state.
        self._chunks: list[str] = []  # emitted deltas
        self._text_cache: str | None = ""
        self._pending = ""  # decoded text held back as a possible stop-string prefix
        self._tail = ""  # last (max_stop_len - 1) chars of emitted + pending text, for matching
        self._matched_stop: str | None = None
        self._finished = False

    # -- public API ------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The output text emitted so far (the concatenation of all deltas)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._matched_stop

    @property
    def finished(self) -> bool:
        """True after a stop string matched or `flush()` was called; later tokens are ignored."""
        return self._finished

    def add_token(self, token_id: int) -> DetokenizerResult:
        """Add one generated token; return the new stable text and the stop string it completed.

        The delta is "" while a multi-byte character is incomplete or while the text could still
        be the start of a stop string.  After a stop (or `flush`) further tokens are ignored and
        ("", None) is returned.
        """
        if self._finished:
            return DetokenizerResult("", None)
        self._num_output_tokens += 1
        if not 0 <= token_id < self._vocab_size:
            return DetokenizerResult("", None)  # e.g. padded vocabulary rows: no text
        self._ids.append(token_id)
        new_text = self._decode_new(force=False)
        if not new_text:
            return DetokenizerResult("", None)
        delta = self._process(new_text, final=False)
        return DetokenizerResult(delta, self._matched_stop)

    def flush(self) -> str:
        """End the output: emit held-back text and any incomplete trailing bytes (as U+FFFD, like
        `tokenizer.decode`).  Stop strings in not-yet-decoded text are still honoured
        (see `matched_stop`).  Idempotent."""
        if self._finished:
            return ""
        new_text = self._decode_new(force=True)
        delta = self._process(new_text, final=True)
        self._finished = True
        return delta

    # -- internals -------------------------------------------------------------------------------

    def _decode_new(self, force: bool) -> str:
        """Text of ids[read_offset:] decoded in its window context; advances the offsets when the
        result is stable (or when `force`), returns "" otherwise."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not force and (
            len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)
        ):
            return ""  # nothing new yet, or an incomplete character at the end
        delta = new_text[len(self._prefix_text) :]
        # Slide the window: the just-emitted tokens become the next step's context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        # Drop ids that can no longer be part of any window (keeps memory bounded).
        if self._prefix_offset > 1024:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
        return delta

    def _process(self, new_text: str, final: bool) -> str:
        """Append newly decoded text: find stop strings, hold back possible stop prefixes."""
        if not self._stop:
            return self._emit(new_text)

        window = self._tail + new_text  # the pending text is the end of self._tail
        new_start = len(self._tail)
        pending_start = new_start - len(self._pending)

        # The stop completed first: smallest end position, then the longest at that end.
        best: tuple[int, int, str] | None = None
        armed = self._num_output_tokens > self._min_tokens  # before that, possible stops are only held back
        for s in self._stop if armed else ():
            i = window.find(s, max(0, new_start - len(s) + 1))
            if i != -1:
                key = (i + len(s), i, s)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is not None:
            end, start, s = best
            cut = end if self._include_stop else start
            self._pending = ""
            self._matched_stop = s
            self._finished = True
            return self._emit(window[pending_start:cut])

        combined = self._pending + new_text
        hold = 0
        if not final and not self._include_stop:
            hold = _held_back_length(combined, self._stop, self._max_stop_len)
        self._pending = combined[len(combined) - hold :] if hold else ""
        keep = self._max_stop_len - 1
        self._tail = window[-keep:] if keep > 0 else ""
        return self._emit(combined[: len(combined) - hold])
