"""Tests for rapid.core.detokenizer with tokenizers built locally (no hub access).

Two tokenizers, trained in-process on a few sentences:
  * GPT-2-like byte-level BPE: characters outside the learned merges (CJK, emoji) are split into
    byte tokens that decode to U+FFFD on their own.
  * Llama-like SentencePiece-style BPE: "▁" word boundaries, byte-fallback tokens <0xE4>... for
    characters outside the vocabulary, decoder Replace/ByteFallback/Fuse/Strip.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rapid.core.detokenizer import DetokenizerResult, IncrementalDetokenizer

CORPUS = [
    "héllo 世界 🎉",
    "hello world, the quick brown fox",
    "jumps over the lazy dog",
    "héllo again, hello world",
    "stop here STOP now",
]
TEXTS = [
    "héllo 世界 🎉",
    "hello world, the quick brown fox jumps over the lazy dog",
    "🎉🎉 世界世界 ünïcödé ok",
    "x 🎉y世z",
    "  two  spaces\nnew line\ttab",
]


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # Train without CJK / emoji so that those fall back to byte tokens (and so that training is
    # deterministic: no ties when picking the alphabet).
    base.train_from_iterator([t for t in CORPUS if "世" not in t], trainer)
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def run(tok, prompt_ids, output_ids, *, skip_special_tokens=True, stop=(), include=False, flush=True, min_tokens=0):
    """Feed output_ids one by one; return (detokenizer, deltas, matched stop)."""
    detok = IncrementalDetokenizer(
        tok, prompt_ids, skip_special_tokens=skip_special_tokens, stop=tuple(stop),
        include_stop_str_in_output=include, min_tokens=min_tokens,
    )
    deltas: list[str] = []
    matched = None
    for t in output_ids:
        delta, matched = detok.add_token(t)
        deltas.append(delta)
        if matched is not None:
            break
    if flush and matched is None:
        deltas.append(detok.flush())
        matched = detok.matched_stop
    return detok, deltas, matched


# ------------------------------------------------------------------------------------------------
# Decoding without stop strings
# ------------------------------------------------------------------------------------------------


def test_multibyte_characters_split_across_byte_tokens(byte_level):
    ids = encode(byte_level, "héllo 世界 🎉")
    pieces = [byte_level.decode([t]) for t in ids]
    assert "\ufffd" in pieces  # precondition: some characters span several byte tokens
    detok, deltas, _ = run(byte_level, encode(byte_level, "hello "), ids, flush=False)
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # held while a character was incomplete
    assert "".join(deltas) == detok.text == "héllo 世界 🎉"
    assert "世" in deltas and "🎉" in deltas  # each emitted once complete


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "héllo", "the 🎉 quick"])
def test_deltas_concatenate_to_full_decode_byte_level(byte_level, text, prompt):
    ids = encode(byte_level, text)
    detok, deltas, matched = run(byte_level, encode(byte_level, prompt), ids)
    assert matched is None
    assert "".join(deltas) == detok.text == byte_level.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback(sentencepiece, text):
    ids = encode(sentencepiece, text)
    # Empty prompt: the output alone, with the decoder's leading-space stripping.
    detok, deltas, _ = run(sentencepiece, [], ids)
    assert "".join(deltas) == detok.text == sentencepiece.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    # With a prompt the output is decoded in context: the continuation of the prompt's text.
    prompt_ids = encode(sentencepiece, "hello world")
    detok, deltas, _ = run(sentencepiece, prompt_ids, ids)
    full = sentencepiece.decode(prompt_ids + ids)
    assert detok.text == full[len(sentencepiece.decode(prompt_ids)) :]
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_skipped_or_kept(byte_level):
    eos = byte_level.eos_token_id
    im_start = byte_level.convert_tokens_to_ids("<|im_start|>")
    ids = [im_start] + encode(byte_level, "hello 世界") + [eos] + encode(byte_level, " 🎉 world")
    skipped, _, _ = run(byte_level, [], ids, skip_special_tokens=True)
    assert skipped.text == byte_level.decode(ids, skip_special_tokens=True) == "hello 世界 🎉 world"
    kept, _, _ = run(byte_level, [], ids, skip_special_tokens=False)
    assert kept.text == byte_level.decode(ids, skip_special_tokens=False)
    assert kept.text == "<|im_start|>hello 世界<|endoftext|> 🎉 world"


def test_sentencepiece_special_tokens(sentencepiece):
    ids = encode(sentencepiece, "hello world") + [sentencepiece.eos_token_id]
    prompt = [sentencepiece.bos_token_id]
    assert run(sentencepiece, prompt, ids)[0].text == "hello world"
    kept = run(sentencepiece, prompt, ids, skip_special_tokens=False)[0].text
    assert kept.endswith("</s>") and "hello world" in kept


def test_incomplete_bytes_at_end_are_flushed_like_decode(byte_level):
    ids = encode(byte_level, "ok 🎉")
    cut = ids[:-2]  # the emoji's last bytes never arrive
    detok, deltas, _ = run(byte_level, [], cut, flush=False)
    assert "\ufffd" not in detok.text
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert detok.text == byte_level.decode(cut)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_token_sequences_match_decode_byte_level(byte_level, data):
    """Any id sequence (invalid UTF-8 and special tokens included) ends up as tokenizer.decode."""
    skip = data.draw(st.booleans())
    ids = data.draw(st.lists(st.integers(0, len(byte_level) - 1), max_size=40))
    prompt = data.draw(st.lists(st.integers(0, len(byte_level) - 1), max_size=8))
    detok, deltas, _ = run(byte_level, prompt, ids, skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == byte_level.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(text=st.text(alphabet="abhlo wé世界🎉\nü,", max_size=30))
def test_random_texts_match_decode_sentencepiece(sentencepiece, text):
    """Byte-fallback runs only decode the same piecewise when they are valid UTF-8 (the decoder
    replaces a whole invalid run), so here the ids come from encoding real text."""
    ids = encode(sentencepiece, text)
    detok, deltas, _ = run(sentencepiece, [], ids)
    assert "".join(deltas) == detok.text == sentencepiece.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_out_of_vocab_ids_produce_no_text(byte_level):
    ids = encode(byte_level, "hello") + [len(byte_level) + 7] + encode(byte_level, " world")
    assert run(byte_level, [], ids)[0].text == "hello world"


def test_window_stays_small(byte_level):
    """Each step decodes a few tokens, not the whole output."""
    lengths: list[int] = []

    class CountingTokenizer:  # the `tokenizers.Tokenizer` interface
        def get_vocab_size(self, with_added_tokens=True):
            return len(byte_level)

        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return byte_level.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = encode(byte_level, " ".join(TEXTS) * 20)
    assert len(ids) > 1000
    detok, _, _ = run(CountingTokenizer(), [], ids)
    assert detok.text == byte_level.decode(ids)
    assert max(lengths) <= 8
    assert len(lengths) <= 2 * len(ids) + 2


# ------------------------------------------------------------------------------------------------
# Stop strings
# ------------------------------------------------------------------------------------------------


def tokens_spanning(tok, text: str, needle: str) -> bool:
    """True when `needle` in `text` does not fall within a single token."""
    ids = encode(tok, text)
    start = text.index(needle)
    pos = 0
    for t in ids:
        piece = tok.decode([t])
        if pos <= start and start + len(needle) <= pos + len(piece):
            return False
        pos += len(piece)
    return True


@pytest.mark.parametrize(
    "stop, include, expected",
    [
        ("lo wo", False, "hel"),
        ("lo wo", True, "hello wo"),
        ("世界", False, "héllo "),
        ("世界", True, "héllo 世界"),
    ],
)
def test_stop_string_across_token_boundary(byte_level, stop, include, expected):
    text = "héllo 世界 🎉" if "世" in stop else "hello world, the quick brown fox"
    assert tokens_spanning(byte_level, text, stop)
    ids = encode(byte_level, text)
    detok, deltas, matched = run(byte_level, [], ids, stop=[stop], include=include, flush=False)
    assert matched == stop == detok.matched_stop
    assert detok.text == expected == "".join(deltas)
    assert detok.finished
    assert detok.add_token(ids[0]) == DetokenizerResult("", None)  # ignored after the stop
    assert detok.flush() == "" and detok.text == expected


def test_partial_stop_is_held_back_then_flushed(byte_level):
    ids = encode(byte_level, "the quick ST")
    detok, deltas, matched = run(byte_level, [], ids, stop=["STOP"], flush=False)
    assert matched is None
    assert detok.text == "the quick "  # "ST" might become "STOP": not shown yet
    assert detok.flush() == "ST"
    assert detok.text == "the quick ST" and detok.matched_stop is None


def test_false_start_is_released(byte_level):
    text = "stop here STOx now STOP"
    ids = encode(byte_level, text)
    detok, deltas, matched = run(byte_level, [], ids, stop=["STOP"], flush=False)
    assert matched == "STOP"
    assert detok.text == "stop here STOx now "
    # Nothing emitted was later trimmed, and "STO" was held back until "x" resolved it.
    assert "".join(deltas) == detok.text
    emitted = ""
    for d in deltas:
        emitted += d
        assert not emitted.endswith(("S", "ST", "STO"))


def test_stop_never_leaks_in_streamed_deltas(byte_level):
    text = "hello world, the quick brown fox"
    ids = encode(byte_level, text)
    for stop in ["quick", "o", "fox", "world, the", "h"]:
        detok, deltas, matched = run(byte_level, [], ids, stop=[stop], flush=False)
        assert matched == stop
        assert "".join(deltas) == detok.text == text[: text.index(stop)]
        detok, deltas, _ = run(byte_level, [], ids, stop=[stop], include=True, flush=False)
        assert "".join(deltas) == detok.text == text[: text.index(stop) + len(stop)]


def test_min_tokens_defers_stop_strings(byte_level):
    # vLLM's rule: a stop string counts only in text decoded after min_tokens tokens; one that completes then may
    # begin earlier. "o" first completes in token 1 or 2 ("hello"), again in "world" and "brown"
    text = "hello world, the quick brown fox"
    ids = encode(byte_level, text)
    first_o = next(i for i in range(len(ids)) if "o" in byte_level.decode(ids[: i + 1]))
    detok, deltas, matched = run(byte_level, [], ids, stop=["o"], flush=False, min_tokens=first_o + 1)
    assert matched == "o" and "".join(deltas) == detok.text
    assert detok.text == text[: text.index("o", len(byte_level.decode(ids[: first_o + 1])))]
    assert len(detok.text) > len("hell")
    # a stop that begins before min_tokens and completes after it still ends the output
    k = next(i for i in range(len(ids)) if byte_level.decode(ids[: i + 1]).endswith("quick"))
    begun = next(i for i in range(len(ids)) if "qu" in byte_level.decode(ids[: i + 1]))
    if begun < k:  # "quick" spans tokens: min_tokens between its first and last
        detok, _, matched = run(byte_level, [], ids, stop=["quick"], flush=False, min_tokens=begun + 1)
        assert matched == "quick" and detok.text == "hello world, the "
    # nothing after min_tokens: the whole text, stop unmatched
    detok, _, matched = run(byte_level, [], ids, stop=["o"], min_tokens=len(ids))
    assert matched is None and detok.text == text


def test_first_completed_stop_wins(byte_level):
    ids = encode(byte_level, "hello world, the quick brown fox")
    detok, _, matched = run(byte_level, [], ids, stop=["brown", "the quick", "world"], flush=False)
    assert matched == "world" and detok.text == "hello "


def test_stop_inside_one_token_trims_the_rest(byte_level):
    ids = encode(byte_level, "héllo again")
    word = ids[0]
    assert byte_level.decode([word]) == "héllo"  # a single merged token
    detok, _, matched = run(byte_level, [], [word], stop=["é"], include=True, flush=False)
    assert matched == "é" and detok.text == "hé"
    detok, _, matched = run(byte_level, [], [word], stop=["é"], flush=False)
    assert matched == "é" and detok.text == "h"


def test_stop_in_text_completed_only_at_flush():
    """A stop followed, in the same token, by an incomplete character is only decodable once flush
    forces the decode; it is still honoured.  (Also: a bare `tokenizers.Tokenizer` is accepted.)"""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["kĠð"] = len(vocab)  # bytes "k", " ", 0xF0 (the first byte of a 4-byte character)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    ids = [vocab["o"], vocab["kĠð"], vocab["Ł"], vocab["İ"]]  # "ok " + 3 of the 4 bytes of 🎉
    detok, deltas, matched = run(tok, [], ids, stop=["ok "], flush=False)
    assert matched is None and detok.text == ""
    assert detok.flush() == ""
    assert detok.matched_stop == "ok " and detok.text == ""
    # Without the stop, flush emits the incomplete bytes as tokenizer.decode does.
    detok, deltas, _ = run(tok, [], ids)
    assert detok.text == tok.decode(ids) == "ok \ufffd"


def test_sentencepiece_stop(sentencepiece):
    ids = encode(sentencepiece, "hello world, the quick brown fox")
    detok, deltas, matched = run(sentencepiece, [], ids, stop=["d, t"], flush=False)
    assert matched == "d, t" and detok.text == "hello worl" == "".join(deltas)


def test_slow_tokenizer_interface(byte_level):
    """Tokenizers without a Rust backend are driven through their own decode()."""

    class SlowLike:
        def __len__(self):
            return len(byte_level)

        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            assert clean_up_tokenization_spaces is False
            return byte_level.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = encode(byte_level, "héllo 世界 🎉")
    detok, deltas, matched = run(SlowLike(), [], ids, stop=["界"])
    assert matched == "界" and detok.text == "héllo 世" == "".join(deltas)
