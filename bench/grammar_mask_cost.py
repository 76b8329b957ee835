"""Per-token grammar mask cost on the CPU: xgrammar vs llguidance, with a tiny tokenizer and the default model's.

Measured (2-core CPU container, session 13): tiny tokenizer xgrammar 1.0 us median / 1.3 us p90 per mask,
llguidance 3.9 / 10.1 us; SmolLM2 (49152 tokens) xgrammar 2.9 / 7.1 us, llguidance 7.8 / 33.2 us; compile
of the JSON schema 81 ms (xgrammar) vs 213 ms (llguidance) with SmolLM2. RAPID uses xgrammar.

For each library and tokenizer: compile a JSON schema grammar once, then walk a fixed valid JSON output token
by token, filling the allowed-token bitmask before each token and advancing the matcher with it. Reports the
compile time and the median / p90 microseconds per mask.

    python bench/grammar_mask_cost.py            # tiny test tokenizer + the bundled SmolLM2 tokenizer
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
OUTPUT = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"]}'


def tokenizers():
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tokenizer

    yield "tiny (300 tokens)", build_tokenizer()
    from rapid.model.default_model import default_model_path

    yield "SmolLM2 (49152 tokens)", AutoTokenizer.from_pretrained(default_model_path())


def bench_xgrammar(tok, ids):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for t in ids:
        t1 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t1)
        if not matcher.accept_token(t):
            raise RuntimeError(f"xgrammar rejected token {t}")
    return compile_s, times


def bench_llguidance(tok, ids):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lltorch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    mask = lltorch.allocate_token_bitmask(1, lltok.vocab_size)
    times = []
    for t in ids:
        t1 = time.perf_counter()
        lltorch.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t1)
        if not matcher.consume_token(t):
            raise RuntimeError(f"llguidance rejected token {t}: {matcher.get_error()}")
    return compile_s, times


def main() -> None:
    print(f"{'tokenizer':24} {'library':11} {'compile ms':>10} {'median us/mask':>15} {'p90 us/mask':>12} tokens")
    for name, tok in tokenizers():
        ids = tok.encode(OUTPUT, add_special_tokens=False)
        for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            fn(tok, ids)  # warm (caches, lazy imports)
            compile_s, times = fn(tok, ids)
            us = sorted(t * 1e6 for t in times)
            print(f"{name:24} {lib:11} {compile_s * 1e3:10.1f} {statistics.median(us):15.1f} "
                  f"{us[int(0.9 * (len(us) - 1))]:12.1f} {len(ids)}")


if __name__ == "__main__":
    main()
