"""The offline batch script end to end on the CPU: JSONL in, JSONL out in input order, bad lines reported."""

import json

import pytest

from rapid import LLM, SamplingParams
from rapid.entrypoints.batch import run_file
from rapid.entrypoints.cli import main


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


LINES = [
    {"id": "a", "prompt": "Paris is", "max_tokens": 5},
    {"prompt_token_ids": [5, 6, 7], "temperature": 0.0},
    "{not json",
    {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "",  # blank: skipped
    {"prompt": ""},
    {"prompt": "x", "max_tokens": 0},
    {"prompt_token_ids": [1, 99999]},
    {"prompt": "a", "messages": []},
    {"prompt": "a", "colour": "red"},
    {"id": 7, "prompt": "The quick brown", "sampling_params": {"seed": 1, "temperature": 1.0}},
    [1, 2],
]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(tiny_llama, max_model_len=512) as llm:
        yield llm


def test_batch_end_to_end_with_error_lines(llm, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, LINES)
    counts = run_file(llm, str(src), str(dst), max_tokens=4, temperature=0.0, chunk_size=3, use_tqdm=False)
    recs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert counts == {"ok": 4, "errors": 7} and len(recs) == 11
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert [r["id"] for r in recs] == ["a", 2, 3, "chat", 6, 7, 8, 9, 10, 7, 12]
    ok = [r for r in recs if "error" not in r]
    assert [r["line"] for r in ok] == [1, 2, 4, 11]
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    for line, match in {3: "invalid JSON", 6: "empty", 7: "max_tokens", 8: "vocabulary", 9: "exactly one",
                        10: "colour", 12: "JSON object"}.items():
        assert match in errors[line], (line, errors[line])

    greedy = llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert ok[0]["text"] == greedy.outputs[0].text and ok[0]["token_ids"] == greedy.outputs[0].token_ids
    assert ok[0]["num_prompt_tokens"] == len(greedy.prompt_token_ids)
    ids = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)[0].outputs[0]
    assert ok[1]["token_ids"] == ids.token_ids and ok[1]["num_prompt_tokens"] == 3
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3),
                    use_tqdm=False)[0].outputs[0]
    assert ok[2]["text"] == chat.text
    seeded = llm.generate("The quick brown", SamplingParams(seed=1, temperature=1.0, max_tokens=4),
                          use_tqdm=False)[0].outputs[0]
    assert ok[3]["token_ids"] == seeded.token_ids
    for r in ok:
        assert r["finish_reason"] in ("length", "stop") and r["num_output_tokens"] == len(r["token_ids"])


def test_engine_refusal_isolated_to_its_line(tiny_llama, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt_token_ids": [5] * 10}, {"prompt_token_ids": [6] * 40}])
    # a 2-block pool (32 tokens): the second line can never fit, the first still runs
    with LLM(tiny_llama, kv_cache_memory_bytes=2 * 8192) as llm:
        run_file(llm, str(src), str(dst), max_tokens=4, use_tqdm=False)
    first, second = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(first["token_ids"]) == 4 and "whole pool" in second["error"]


def test_cli_batch(tiny_llama, tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "hello"}, {"prompt": ""}])
    assert main(["batch", str(src), str(dst), "--model", str(tiny_llama), "--max-tokens", "3"]) == 0
    recs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(recs[0]["token_ids"]) <= 3 and "error" in recs[1]
    assert "2 records" in capsys.readouterr().out
