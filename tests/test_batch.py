"""The offline batch script end to end on the CPU: simple and OpenAI batch lines in, JSONL results out as they
finish, bad lines reported with their ids, resumable runs, and the CLI exit status."""

import json
import os

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
    recs = sorted((json.loads(line) for line in dst.read_text().splitlines()), key=lambda r: r["line"])
    assert counts == {"ok": 4, "errors": 7, "skipped": 0} and len(recs) == 11
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
    first, second = sorted((json.loads(line) for line in dst.read_text().splitlines()), key=lambda r: r["line"])
    assert len(first["token_ids"]) == 4 and "the KV pool holds 32 tokens" in second["error"]


def test_cli_batch(tiny_llama, tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "hello"}, {"prompt": ""}])
    # a failed line makes the exit status 1; a re-run skips what is done, and drops the error record of a line
    # that is no longer in the input (a line still there would be tried again)
    assert main(["batch", str(src), str(dst), "--model", str(tiny_llama), "--max-tokens", "3"]) == 1
    recs = sorted((json.loads(line) for line in dst.read_text().splitlines()), key=lambda r: r["line"])
    assert len(recs[0]["token_ids"]) <= 3 and "error" in recs[1]
    assert "2 records" in capsys.readouterr().out
    write_jsonl(src, [{"prompt": "hello"}])
    assert main(["batch", str(src), str(dst), "--model", str(tiny_llama), "--max-tokens", "3"]) == 0
    assert len(dst.read_text().splitlines()) == 1 and "1 already done" in capsys.readouterr().out


def openai_line(custom_id, url, body, **extra):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def test_openai_batch_format_and_resume(llm, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    chat = [{"role": "user", "content": "hi"}]
    lines = [
        openai_line("c1", "/v1/chat/completions", {"model": "m", "messages": chat, "max_tokens": 3,
                                                   "temperature": 0}),
        openai_line("p1", "/v1/completions", {"model": "m", "prompt": "Paris is", "max_tokens": 5, "temperature": 0,
                                              "n": 2, "seed": 3, "logprobs": 1}),
        openai_line("bad-temp", "/v1/completions", {"prompt": "x", "temperature": -1}),
        openai_line("bad-type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}),
        openai_line("bad-url", "/v1/embeddings", {"input": "x"}),
        openai_line("too-long", "/v1/completions", {"prompt": "x", "max_tokens": 10_000}),
        {"id": "simple", "prompt": "Paris is", "max_tokens": 5},
    ]
    write_jsonl(src, lines[:4])  # a first run on part of the file (as if interrupted)
    first = run_file(llm, str(src), str(dst), use_tqdm=False)
    assert first == {"ok": 2, "errors": 2, "skipped": 0}
    write_jsonl(src, lines)
    second = run_file(llm, str(src), str(dst), chunk_size=2, use_tqdm=False)
    assert second == {"ok": 1, "errors": 4, "skipped": 2}  # the first run's two failed lines are tried again
    recs = [json.loads(line) for line in dst.read_text().splitlines()]
    by_key = {r.get("custom_id", r.get("id")): r for r in recs}
    assert len(recs) == len(lines) == len(by_key)

    greedy = llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert by_key["simple"]["text"] == greedy.text
    c1 = by_key["c1"]["response"]
    expected_chat = llm.chat(chat, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert c1["status_code"] == 200 and by_key["c1"]["error"] is None
    assert c1["body"]["object"] == "chat.completion"
    assert c1["body"]["choices"][0]["message"] == {"role": "assistant", "content": expected_chat.text}
    p1 = by_key["p1"]["response"]["body"]
    assert [c["index"] for c in p1["choices"]] == [0, 1]
    assert p1["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in p1["choices"])
    seeded = [llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=5, seed=3 + i), use_tqdm=False)[0]
              for i in range(2)]
    assert [c["text"] for c in p1["choices"]] == [s.outputs[0].text for s in seeded]
    for key, param in {"bad-temp": "temperature", "bad-type": "max_tokens", "bad-url": "url",
                       "too-long": "max_tokens"}.items():
        rec = by_key[key]
        assert rec["custom_id"] == key and rec["response"]["status_code"] == 400, rec
        assert rec["response"]["body"]["error"]["param"] == param and rec["error"]["message"], rec


def test_results_are_whole_lines_even_after_a_torn_write(llm, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [openai_line(f"r{i}", "/v1/completions", {"prompt": "a b", "max_tokens": 2}) for i in range(3)])
    run_file(llm, str(src), str(dst), use_tqdm=False)
    whole = dst.read_text().splitlines()
    dst.write_text("\n".join(whole[:2]) + "\n" + whole[2][:10])  # a crash cut the last line
    assert run_file(llm, str(src), str(dst), use_tqdm=False) == {"ok": 1, "errors": 0, "skipped": 2}
    recs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in recs) == ["r0", "r1", "r2"]


def test_a_line_whose_second_prompt_is_refused_is_still_written(tiny_llama, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # prompt 0 fits a 2-block pool (32 tokens), prompt 1 never does: the engine takes the first, refuses the second
    write_jsonl(src, [openai_line("two", "/v1/completions", {"prompt": [[5] * 10, [6] * 40], "max_tokens": 4})])
    with LLM(tiny_llama, kv_cache_memory_bytes=2 * 8192) as llm:
        counts = run_file(llm, str(src), str(dst), use_tqdm=False)
    recs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert counts == {"ok": 0, "errors": 1, "skipped": 0} and len(recs) == 1
    assert recs[0]["custom_id"] == "two" and "the KV pool holds 32 tokens" in recs[0]["error"]["message"]


@pytest.mark.parametrize("size", [0, -1])
def test_batch_size_below_one_is_refused(llm, tmp_path, size):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "hello", "max_tokens": 2}])
    with pytest.raises(ValueError, match=f"got {size}"):
        run_file(llm, str(src), str(dst), chunk_size=size, use_tqdm=False)


def test_cli_batch_size_checked_before_the_engine_starts(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "hello"}])
    assert main(["batch", str(src), str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "absent"),
                 "--batch-size", "0"]) == 2
    assert "got 0" in capsys.readouterr().err


def test_an_input_that_is_missing_or_a_folder_is_named_before_the_engine_starts(tmp_path, capsys):
    for src, message in ((tmp_path, "the input is a folder; give a JSONL file"),
                         (tmp_path / "absent.jsonl", "no such input file")):
        assert main(["batch", str(src), str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "absent")]) == 2
        assert f"error: {src}: {message}" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_fails_before_the_engine_starts(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "hello"}])
    assert main(["batch", str(src), str(tmp_path / "no" / "such" / "out.jsonl"),
                 "--model", str(tmp_path / "absent")]) == 2  # an absent model: no engine could have started
    assert "No such file or directory" in capsys.readouterr().err


def test_the_input_is_never_the_output(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "hello"}, {"prompt": "again"}])
    before = src.read_text()
    (tmp_path / "link.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    for out in (src, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", f"{tmp_path}/./in.jsonl"):  # the same file
        assert main(["batch", str(src), str(out), "--model", str(tmp_path / "absent")]) == 2  # before any model
        assert "is the input file" in capsys.readouterr().err
    assert src.read_text() == before  # it used to drop the lines it took for results


def test_ids_that_cannot_be_resumed_are_refused_by_line_number(llm, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": None, "prompt": "hello", "max_tokens": 2}, {"id": [1], "prompt": "hi", "max_tokens": 2}])
    assert run_file(llm, str(src), str(dst), use_tqdm=False) == {"ok": 0, "errors": 2, "skipped": 0}
    recs = sorted((json.loads(line) for line in dst.read_text().splitlines()), key=lambda r: r["line"])
    assert [r["id"] for r in recs] == [1, 2] and all("id must be" in r["error"] for r in recs)
    # a re-run tries the failed lines again (each known by its line number): the same two errors, not four records
    assert run_file(llm, str(src), str(dst), use_tqdm=False) == {"ok": 0, "errors": 2, "skipped": 0}
    assert sorted(json.loads(line)["line"] for line in dst.read_text().splitlines()) == [1, 2]


def test_a_rerun_retries_failed_lines_and_keeps_one_record_per_line(llm, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": "ok", "prompt": "Paris is", "max_tokens": 2},
                      openai_line("fixed-later", "/v1/completions", {"prompt": "x", "temperature": -1})])
    assert run_file(llm, str(src), str(dst), use_tqdm=False) == {"ok": 1, "errors": 1, "skipped": 0}
    write_jsonl(src, [{"id": "ok", "prompt": "Paris is", "max_tokens": 2},
                      openai_line("fixed-later", "/v1/completions", {"prompt": "x", "max_tokens": 2})])
    assert run_file(llm, str(src), str(dst), use_tqdm=False) == {"ok": 1, "errors": 0, "skipped": 1}
    recs = {r.get("custom_id", r.get("id")): r for r in map(json.loads, dst.read_text().splitlines())}
    assert len(dst.read_text().splitlines()) == 2 and recs["fixed-later"]["response"]["status_code"] == 200
    assert not (tmp_path / "out.jsonl.tmp").exists()



@pytest.mark.parametrize("output", ["-", "/dev/stdout"])
def test_results_to_standard_output(tiny_llama, tmp_path, output):
    """OUTPUT `-` (or /dev/stdout, a pipe here) gets the records alone, the summary going to stderr; /dev/stdout
    used to hang, read back for a resume, and `-` made a file of that name."""
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "Paris is"}])
    run = subprocess.run([sys.executable, "-m", "rapid.entrypoints.cli", "batch", str(src), output, "--model",
                          str(tiny_llama), "--max-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(json.loads(line)["id"] for line in run.stdout.splitlines()) == ["a", "b"]
    assert "wrote 2 records to " in run.stderr and not os.path.exists("-")  # (the working directory's)


def test_ctrl_c_says_what_was_written_and_a_rerun_does_the_rest(tiny_llama, tmp_path):
    """Ctrl-C ends `rapid batch` with one line saying how many records were written (exit 130, no traceback); the
    records are whole lines, and a re-run writes the others, each line once."""
    import signal
    import subprocess
    import sys
    import time

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": i, "prompt_token_ids": [5 + i % 50, 9, 30], "max_tokens": 64,
                       "sampling_params": {"ignore_eos": True}} for i in range(600)])
    cmd = [sys.executable, "-m", "rapid.entrypoints.cli", "batch", str(src), str(out), "--model", str(tiny_llama),
           "--max-num-seqs", "8", "--batch-size", "8"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while (not out.exists() or len(out.read_text().splitlines()) < 16) and time.monotonic() < deadline:
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"interrupted: wrote {len(written)} records to {out}; run the same command again" in stderr
    assert 16 <= len(written) < 600 and all("text" in r for r in written)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == list(range(600))
