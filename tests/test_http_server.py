"""The OpenAI-compatible HTTP server with real clients (the `openai` package, httpx) on the CPU with a tiny model:
greedy text equals LLM.generate, streaming, usage, n, logprobs, OpenAI-shaped errors, metrics, the API key,
disconnects, a dead engine on /health, and `rapid serve` (flags checked first, SIGTERM under load)."""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rapid import LLM, SamplingParams
from rapid.entrypoints.frontend import EngineFrontend
from rapid.entrypoints.openai import protocol as P
from rapid.entrypoints.openai.api_server import build_app
from rapid.entrypoints.openai.http_server import HttpServer
from tiny import engine_pids

PROMPTS = ["Paris is", "The quick brown"]
CHAT = [{"role": "user", "content": "hi"}]
MAX_LEN = 256


@pytest.fixture(scope="module")
def served(tiny_llama):
    with LLM(tiny_llama, max_model_len=MAX_LEN) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=6)
        expected = {p: llm.generate(p, greedy, use_tqdm=False)[0] for p in PROMPTS}
        expected["chat"] = llm.chat(CHAT, greedy, use_tqdm=False)[0]
        frontend = EngineFrontend(llm)
        server = HttpServer(build_app(frontend, model_name="tiny", trust_request_chat_template=True), port=0).start()
        keyed = HttpServer(build_app(frontend, model_name="tiny", api_key="sesame"), port=0).start()
        try:
            yield server, keyed, frontend, expected
        finally:
            server.stop()
            keyed.stop()
            frontend.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def metrics(url):
    return {s.name: s for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in fam.samples
            if not s.labels.get("le")} | {
        f"{s.name}{{{s.labels.get('finished_reason', '')}}}": s
        for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in fam.samples
        if "finished_reason" in s.labels}


def test_completions_and_chat_equal_generate(served, client):
    _, _, _, expected = served
    for prompt in PROMPTS:
        want = expected[prompt]
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        assert out.choices[0].text == want.outputs[0].text and out.object == "text_completion"
        assert out.usage.prompt_tokens == len(want.prompt_token_ids)
        assert out.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens and not chunks[-1].choices
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.outputs[0].finish_reason
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=6, temperature=0)
    assert chat.choices[0].message.content == expected["chat"].outputs[0].text
    assert chat.choices[0].message.role == "assistant"
    streamed = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                                   stream=True))
    # OpenAI's and vLLM's order: a chunk with the role alone (content ""), then the content, without the role
    assert streamed[0].choices[0].delta.role == "assistant" and streamed[0].choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None and c.choices[0].delta.content is not None for c in streamed[1:])
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected["chat"].outputs[0].text
    card = client.models.list().data[0]
    assert card.id == "tiny" and card.owned_by == "rapid"
    # vLLM's card fields beyond OpenAI's: root, parent, max_model_len, permission
    assert card.parent is None and card.permission[0]["object"] == "model_permission" and card.max_model_len > 0


def test_return_token_ids_as_vllm(served, client):
    """vLLM's return_token_ids: each choice carries its token ids (and its prompt's), streamed per chunk; the
    streamed ids add up to generate's, and the text is unchanged."""
    _, _, _, expected = served
    want = expected[PROMPTS[0]]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                    extra_body={"return_token_ids": True})
    choice = out.choices[0].model_dump()
    assert choice["token_ids"] == want.outputs[0].token_ids and choice["prompt_token_ids"] == want.prompt_token_ids
    chunks = [c.model_dump() for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True,
        extra_body={"return_token_ids": True})]
    assert [i for c in chunks for i in c["choices"][0]["token_ids"]] == want.outputs[0].token_ids
    assert chunks[0]["choices"][0]["prompt_token_ids"] == want.prompt_token_ids
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.outputs[0].text
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert "token_ids" not in plain.choices[0].model_dump()  # only when asked
    streamed = [c.model_dump() for c in client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0, stream=True, extra_body={"return_token_ids": True})]
    assert [i for c in streamed for i in c["choices"][0]["token_ids"]] == expected["chat"].outputs[0].token_ids
    assert streamed[0]["prompt_token_ids"] == expected["chat"].prompt_token_ids  # chat: at the top, as vLLM
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                          extra_body={"return_token_ids": True}).model_dump()
    assert chat["prompt_token_ids"] == expected["chat"].prompt_token_ids
    assert chat["choices"][0]["token_ids"] == expected["chat"].outputs[0].token_ids


def test_n_seeds_and_logprobs(served, client):
    out = client.completions.create(model="tiny", prompt="Paris is", max_tokens=5, n=3, seed=7, temperature=1.0,
                                    logprobs=2)
    again = client.completions.create(model="tiny", prompt="Paris is", max_tokens=5, n=3, seed=7, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [c.text for c in again.choices]  # seed + i per choice: reproducible
    assert out.usage.completion_tokens == 15 and out.usage.prompt_tokens == served[3]["Paris is"].prompt_token_ids.__len__()
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content)
    assert "".join(e.token for e in content) == chat.choices[0].message.content


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": MAX_LEN + 10}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"extra_body": {"top_k": "x"}}, "top_k"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "word " * 400}, "prompt"),
    ({"extra_body": {"response_format": {"type": "json_schema"}}}, "response_format"),
    ({"seed": 2**64}, "seed"),  # past 64 bits: refused at the edge (it used to reach the engine: 503)
    ({"extra_body": {"stop_token_ids": [2**70]}}, "stop_token_ids"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),  # the field the engine-side check names, not max_tokens
    ({"extra_body": {"truncate_prompt_tokens": MAX_LEN + 1}}, "truncate_prompt_tokens"),  # past max_model_len: vLLM's
])
def test_bad_parameters_get_openai_errors(served, client, kwargs, param):
    args = {"model": "tiny", "prompt": "hello", "max_tokens": 4} | kwargs
    before = served[2].num_pending
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error" and served[2].num_pending == before


def test_a_kv_pool_smaller_than_max_model_len_bounds_the_default_output(tiny_llama):
    # the pool holds fewer tokens than max_model_len: /v1/models says what a request can use, and a chat without
    # max_tokens (whose default is the room left) is served, not refused for the blocks that room would need
    with LLM(tiny_llama, max_model_len=MAX_LEN, kv_cache_memory_bytes=6 * 8192) as llm:
        longest = llm.longest_sequence
        assert longest < MAX_LEN
        frontend = EngineFrontend(llm)
        server = HttpServer(build_app(frontend, model_name="tiny"), port=0).start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            assert client.models.list().data[0].max_model_len == longest
            assert client.models.retrieve("tiny").max_model_len == longest  # GET /v1/models/{id}
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("gpt-17")
            chat = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0,
                                                  extra_body={"ignore_eos": True})
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage.prompt_tokens + chat.usage.completion_tokens == longest
            with pytest.raises(openai.BadRequestError) as e:  # refused at the limit /v1/models reports
                client.completions.create(model="tiny", prompt=[5] * longest, max_tokens=1)
            assert e.value.body["param"] == "prompt", e.value.body
            assert f"prompt has {longest} tokens; the KV pool holds {longest} tokens, fewer than max_model_len " \
                   f"({MAX_LEN})" in e.value.body["message"]
        finally:
            server.stop()
            frontend.close()


def test_unknown_model_is_404_as_openai(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="hello", max_tokens=4)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model"


def test_completion_top_logprobs_include_the_sampled_token(client):
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    # elements"; vLLM: logprobs=0 gives the sampled token alone
    for k in (0, 1):
        out = client.completions.create(model="tiny", prompt="Paris is", max_tokens=12, temperature=1.5, seed=1,
                                        logprobs=k, extra_body={"ignore_eos": True})
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
        for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top is not None and tok in top and top[tok] == pytest.approx(tlp) and len(top) <= k + 1
    url = client.base_url
    as_bool = {"model": "tiny", "prompt": "Paris is", "max_tokens": 3, "temperature": 0}
    for flag, want in ((True, 1), (False, None)):  # a JSON boolean, as vLLM's pydantic model reads it: true is 1
        r = httpx.post(f"{url}completions", json=as_bool | {"logprobs": flag}).json()
        one = httpx.post(f"{url}completions", json=as_bool | {"logprobs": want}).json()
        assert r["choices"][0]["logprobs"] == one["choices"][0]["logprobs"], r
    assert r["choices"][0]["logprobs"] is None and one["choices"][0]["logprobs"] is None


def test_continuous_usage_stats_puts_usage_on_every_chunk(served):
    body = {"prompt": "Paris is", "max_tokens": 4, "temperature": 0, "stream": True, "extra": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", served[0].url + "/v1/completions", json=body) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    seen = 0
    for c in chunks[:-1]:
        assert c["usage"] is not None and c["usage"]["prompt_tokens"] == prompt_tokens
        assert c["usage"]["completion_tokens"] >= seen
        seen = c["usage"]["completion_tokens"]
        assert c["usage"]["total_tokens"] == prompt_tokens + seen
    assert seen == chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_body_not_sent_as_json_is_refused(served):
    """As vLLM: a POST whose Content-Type is not application/json is a 415, before it is read. A browser sends
    text/plain and forms cross-origin without a CORS preflight, so any page could otherwise start generation."""
    url, body = served[0].url, json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        for media_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            r = httpx.post(url + path, content=body, headers={"content-type": media_type} if media_type else {})
            assert r.status_code == 415, (path, media_type, r.text)
            error = r.json()["error"]
            assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    ok = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_malformed_bodies_and_the_server_keeps_serving(served, client):
    url = served[0].url
    deep = b"[" * 100_000 + b"]" * 100_000  # nested past what msgspec decodes (a RecursionError: it was a 500)
    for body in [b"{not json", b"[1, 2]", b"", json.dumps({"prompt": 5}).encode(),
                 json.dumps({"messages": "hi"}).encode(), deep, b'{"prompt": ' + deep + b"}"]:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            r = httpx.post(url + path, content=body, headers={"content-type": "application/json; charset=utf-8"})
            assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    for message in ({"role": "user"}, {"role": "system", "content": None}):  # OpenAI requires content but for the
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [message]})  # assistant's (tool calls)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == f"messages[0].content is required for role {message['role']!r}"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant"}]})
    assert r.json()["error"]["message"] == "messages[1].content is required unless it has tool_calls"
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": []},
                       {"role": "user", "content": "go on"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", json=ok).status_code == 200
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert client.completions.create(model="tiny", prompt="hello", max_tokens=2).choices[0].finish_reason


def test_chat_errors_are_400s_naming_their_field_and_the_connection_stays_usable(client):
    """A template that refuses the conversation (raise_exception, as Mistral's 'roles must alternate') or does not
    parse is a 400 on messages, as vLLM's; so are top_logprobs out of range and a chat too long. The client's
    pooled connection serves the next request (a 500 from an uncaught error used to close it)."""
    bad = [({"chat_template": "{{ raise_exception('roles must alternate') }}"}, "messages", "roles must alternate"),
           ({"chat_template": "{% if %}"}, "messages", "chat template"),
           ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", "top_logprobs must be in [0, 20]")]
    for extra, param, match in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param and match in e.value.body["message"], e.value.body
        assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}],
                                       max_tokens=2)
    assert e.value.body["param"] == "messages" and "max_model_len" in e.value.body["message"]
    for value in (-5, MAX_LEN + 1):  # named as sent: OpenAI's newer max_completion_tokens, not the engine's name
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=value)
        assert e.value.body["param"] == "max_completion_tokens", e.value.body
        assert "max_completion_tokens" in e.value.body["message"] and "max_tokens" not in e.value.body["message"]


def test_an_unexpected_error_is_an_openai_shaped_500(served, client, monkeypatch):
    serving = served[0].server.config.app.state.serving

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving, "builder", broken)
    r = httpx.post(served[0].url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: a bug"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    monkeypatch.undo()
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def test_stream_options_keys_of_openai_this_server_lacks_are_ignored(client):
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True, "include_obfuscation": False})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices


def test_oversized_text_is_refused_before_tokenization(served):
    """As the ZeroMQ side: text longer than max_model_len x 32 characters gets a 400 with the numbers, untokenized
    (a 20 MB prompt took 33-110 s and 0.7 GB of the server's memory when it was tokenized first)."""
    url, bound = served[0].url, f"at most {MAX_LEN * 32} are tokenized (max_model_len {MAX_LEN} x 32"
    huge = "word " * 4_000_000  # 20 MB
    cases = [("/v1/completions", {"prompt": huge, "max_tokens": 2}, "prompt"),
             ("/v1/completions", {"prompt": ["hi", "a" * (MAX_LEN * 32 + 1)], "max_tokens": 2}, "prompt"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}], "max_tokens": 2}, "messages"),
             ("/tokenize", {"prompt": huge}, "prompt"),
             ("/tokenize", {"messages": [{"role": "user", "content": huge}]}, "messages")]
    for path, body, param in cases:
        t0 = time.monotonic()
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 400 and bound in r.json()["error"]["message"], (path, r.text[:300])
        assert r.json()["error"]["param"] == param
        assert time.monotonic() - t0 < 10, path  # a bound that catches tokenizing 20 MB, not a speed target
    t0 = time.monotonic()  # more prompts x n than the frontend ever admits: a 400, before any prompt is tokenized
    r = httpx.post(url + "/v1/completions", json={"prompt": ["hi " * 2000] * 5000, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "these are 5000 requests (prompts x n), more than this server holds at once (--max-pending 4096)" in \
        r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10
    ok = httpx.post(url + "/v1/completions", json={"prompt": "a" * 300, "max_tokens": 1})
    assert ok.status_code == 400 and "tokens; max_model_len is" in ok.json()["error"]["message"]  # tokenized


def test_tokenizing_runs_off_the_event_loop(served, monkeypatch):
    """A request whose prompt takes long to tokenize leaves /health and other requests answering meanwhile."""
    url, llm = served[0].url, served[2].llm
    validate = llm.validate

    def slow_validate(*args, **kwargs):
        time.sleep(4.0)
        return validate(*args, **kwargs)

    monkeypatch.setattr(llm, "validate", slow_validate)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(
        httpx.post(url + "/v1/completions", json={"prompt": "Paris is", "max_tokens": 2}, timeout=30)))
    slow.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    health_s = time.monotonic() - t0
    assert slow.is_alive()  # still tokenizing when /health answered
    slow.join(30)
    assert answers and answers[0].status_code == 200, answers
    assert health_s < 2.0  # not held for the 4 s the prompt took (half of it: a bound a loaded CI machine keeps)


def test_api_key(served):
    url = served[1].url
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
    assert right.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(url + "/health").status_code == 200  # health and metrics stay open


def test_metrics_move(served, client):
    url = served[0].url
    before = metrics(url)
    client.completions.create(model="tiny", prompt="Paris is", max_tokens=5, temperature=0)
    client.completions.create(model="tiny", prompt="Paris is", max_tokens=5, temperature=0)  # a prefix-cache hit
    after = metrics(url)
    for name in ("rapid:time_to_first_token_seconds_count", "rapid:e2e_request_latency_seconds_count",
                 "rapid:prompt_tokens_total", "rapid:prefix_cache_queries_total"):
        assert after[name].value > before.get(name, after[name]).value - 0 or name not in before
        assert after[name].value >= 2
    assert after["rapid:inter_token_latency_seconds_count"].value >= before[
        "rapid:inter_token_latency_seconds_count"].value + 8
    assert after["rapid:generation_tokens_total"].value >= before["rapid:generation_tokens_total"].value + 10
    assert after["rapid:num_requests_running"].value == after["rapid:num_requests_waiting"].value == 0
    assert after["rapid:engine_info"].labels["mode"] == "hybrid"
    assert after["rapid:engine_info"].labels["placement"] == "static decode"
    by_lane = {(s.name, s.labels["lane"]): s.value for fam in text_string_to_metric_families(
        httpx.get(url + "/metrics").text) for s in fam.samples if "lane" in s.labels}
    # hybrid: every prompt token ran inside the decode executor's steps, the latest batch too
    assert by_lane[("rapid:prefill_placement", "decode")] == 1 and by_lane[("rapid:prefill_placement", "prefill")] == 0
    assert by_lane[("rapid:prefill_placed_tokens_total", "decode")] >= 2 and by_lane[
        ("rapid:prefill_placed_tokens_total", "prefill")] == 0
    assert "rapid:request_success_total{length}" in after


def test_metrics_count_requests_of_a_zeromq_server_sharing_the_engine(served):
    """`rapid serve` runs ZeroMQ beside HTTP over one frontend: /metrics counts both, as vLLM's engine metrics do."""
    from rapid.client import Client
    from rapid.server import RapidServer

    url, frontend = served[0].url, served[2]
    before = metrics(url)
    server = RapidServer(frontend.llm, frontend=frontend).start()
    try:
        with Client(server.address, timeout_s=60) as c:
            out = c.generate("Paris is", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
            stream = c.stream("Once upon", SamplingParams(max_tokens=MAX_LEN - 10, ignore_eos=True))
            next(stream)
            stream.close()  # cancelled mid-way: counted as aborted
    finally:
        server.close()
    assert len(out.token_ids) == 5
    deadline = time.time() + 10
    while frontend.num_pending and time.time() < deadline:
        time.sleep(0.05)
    assert frontend.num_pending == 0
    after = metrics(url)
    assert after["rapid:generation_tokens_total"].value >= before["rapid:generation_tokens_total"].value + 6
    assert after["rapid:e2e_request_latency_seconds_count"].value == before[
        "rapid:e2e_request_latency_seconds_count"].value + 2
    assert after["rapid:request_success_total{length}"].value == before["rapid:request_success_total{length}"].value + 1
    aborted = before.get("rapid:request_success_total{abort}")
    assert after["rapid:request_success_total{abort}"].value == (aborted.value if aborted else 0) + 1
    assert after["rapid:num_requests_running"].value == after["rapid:num_requests_waiting"].value == 0


def test_request_histograms_after_completed_requests(served, client):
    """vLLM's per-request histograms, each observed once per engine request as it ends (n=2: two engine requests,
    one request_params_n); the phases add up: inference = prefill + decode, within the end-to-end latency."""
    url = served[0].url
    before = metrics(url)
    out = client.completions.create(model="tiny", prompt="Paris is", max_tokens=5, temperature=0, n=2,
                                    extra_body={"ignore_eos": True})
    after = metrics(url)

    def grew(name):
        return after[f"rapid:{name}"].value - before[f"rapid:{name}"].value

    phases = [f"request_{p}_time_seconds" for p in ("queue", "prefill", "decode", "inference")]
    for name in phases + ["request_time_per_output_token_seconds", "request_prompt_tokens",
                          "request_generation_tokens", "request_params_max_tokens"]:
        assert grew(f"{name}_count") == 2, name
        assert grew(f"{name}_sum") >= 0, name
    assert grew("request_prompt_tokens_sum") == 2 * out.usage.prompt_tokens > 0
    assert grew("request_generation_tokens_sum") == out.usage.completion_tokens == 10
    assert grew("request_params_max_tokens_sum") == 10
    assert grew("request_params_n_count") == 1 and grew("request_params_n_sum") == 2
    prefill, decode, inference = (grew(f"{p}_sum") for p in phases[1:])
    assert prefill > 0 and decode > 0 and inference == pytest.approx(prefill + decode)
    assert grew("request_time_per_output_token_seconds_sum") == pytest.approx(decode / 4)  # 5 tokens: 4 after the first
    assert grew("e2e_request_latency_seconds_sum") >= grew("request_queue_time_seconds_sum") + inference - 1e-6
    assert after["rapid:num_requests_running"].value == after["rapid:num_requests_waiting"].value == 0


def test_disconnected_stream_is_aborted(served):
    url, frontend = served[0].url, served[2]
    aborted = metrics(url).get("rapid:request_success_total{abort}")
    body = {"prompt": "Once upon", "max_tokens": MAX_LEN - 10, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        next(r.iter_lines())
    deadline = time.time() + 10
    while frontend.num_pending and time.time() < deadline:
        time.sleep(0.05)
    assert frontend.num_pending == 0
    now = metrics(url)["rapid:request_success_total{abort}"].value
    assert now == (aborted.value if aborted else 0) + 1


def test_health_turns_503_when_a_worker_dies(tiny_llama):
    with LLM(tiny_llama, mode="rapid") as llm:
        frontend = EngineFrontend(llm)
        server = HttpServer(build_app(frontend), port=0).start()
        try:
            assert httpx.get(server.url + "/health").status_code == 200
            decode = engine_pids(llm)["decode"]
            assert decode in {p.pid for p in psutil.Process().children(recursive=True)}
            os.kill(decode, signal.SIGKILL)
            deadline = time.time() + 15
            while httpx.get(server.url + "/health").status_code != 503 and time.time() < deadline:
                time.sleep(0.1)
            r = httpx.get(server.url + "/health")
            assert r.status_code == 503 and "decode" in r.json()["error"]["message"]
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        finally:
            server.stop()
            frontend.close()


def rapid_serve(*flags):
    return subprocess.Popen([sys.executable, "-m", "rapid.entrypoints.cli", "serve", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_refuses_a_remote_host_before_building_the_engine(tmp_path):
    t0 = time.time()
    proc = rapid_serve("--model", str(tmp_path / "absent"), "--host", "0.0.0.0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--allow-remote and --api-key" in err and time.time() - t0 < 30
    proc = rapid_serve("--model", str(tmp_path / "absent"), "--address", "tcp://0.0.0.0:5555")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "loopback" in err
    proc = rapid_serve(str(tmp_path / "a"), "--model", str(tmp_path / "b"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "the model is given twice" in err
    (tmp_path / "model").mkdir()  # a model folder after --served-model-name (nargs +): not the default model served
    proc = rapid_serve("--served-model-name", "tiny", str(tmp_path / "model"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"--served-model-name took the model '{tmp_path / 'model'}' as a name" in err
    with socket.socket() as taken:  # a port something listens on: refused before the model loads, as vLLM does
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = rapid_serve("--model", str(tmp_path / "absent"), "--port", str(port))
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and f"--port {port} on 127.0.0.1 is in use" in err
        proc = rapid_serve("--model", str(tmp_path / "absent"), "--port", "0", "--address", f"tcp://127.0.0.1:{port}")
        _, err = proc.communicate(timeout=60)  # the ZeroMQ address too
    assert proc.returncode == 2 and f"--address tcp://127.0.0.1:{port} is in use" in err
    # an ipc:// address too: its folder missing, a program listening on it, a server holding its lock (these were
    # found after the model loaded, with a raw errno message)
    proc = rapid_serve("--model", str(tmp_path / "absent"), "--address", f"ipc://{tmp_path}/no/such/x.sock")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"the folder {tmp_path}/no/such does not exist" in err, err
    sock_path, lock_path = tmp_path / "held.sock", tmp_path / "locked.sock.lock"
    with socket.socket(socket.AF_UNIX) as listening, open(lock_path, "w") as lock:
        listening.bind(str(sock_path))
        listening.listen()
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        for path, cause in ((sock_path, "a program listens on"), (tmp_path / "locked.sock", "(pid 4242) holds")):
            proc = rapid_serve("--model", str(tmp_path / "absent"), "--no-http", "--address", f"ipc://{path}")
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 2 and f"ipc://{path} is in use" in err and cause in err, err


def long_streams(proc, count: int) -> tuple[list[threading.Thread], list[tuple[str, str]]]:
    """`count` long completions streamed from the server `proc` started, 0.5 s under way: their threads, and each
    stream's (finish_reason, last line) once it ends."""
    url = re.search(r"(http://\S+)/v1", proc.stdout.readline()).group(1)
    ends: list[tuple[str, str]] = []

    def stream():
        body = {"prompt": "Once upon", "max_tokens": MAX_LEN - 10, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        ends.append((json.loads(lines[-2][6:])["choices"][0]["finish_reason"], lines[-1]))

    threads = [threading.Thread(target=stream) for _ in range(count)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    return threads, ends


def test_sigterm_under_load_ends_every_request(tiny_llama):
    proc = rapid_serve(str(tiny_llama), "--max-model-len", str(MAX_LEN), "--port", "0",  # the model positional,
                       "--shutdown-grace-s", "0.3", "--served-model-name", "tiny", "tiny2")  # as `vllm serve MODEL`
    try:
        threads, ends = long_streams(proc, 3)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0 and time.time() - t0 < 20  # the grace is 0.3 s
        for t in threads:
            t.join(10)
        assert len(ends) == 3 and all(reason in ("abort", "length") and done == "data: [DONE]" for reason, done in ends)
        assert "RAPID server stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_sigint_ends_the_drain_at_once(tiny_llama):
    """SIGINT twice during a 60-s drain: the requests in flight end at once, each with finish_reason 'abort' and
    [DONE] (they used to be cut off mid-stream after uvicorn's 5 s, with a traceback each), and the exit is 0.
    One request runs at a time, so the queued ones cannot finish before the signals."""
    proc = rapid_serve(str(tiny_llama), "--max-model-len", str(MAX_LEN), "--port", "0", "--max-num-seqs", "1",
                       "--shutdown-grace-s", "60", "--no-zmq")
    try:
        threads, ends = long_streams(proc, 6)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0 and time.time() - t0 < 20  # not the 60-s grace
        for t in threads:
            t.join(10)
        assert len(ends) == 6 and all(done == "data: [DONE]" for _, done in ends), ends
        assert sum(reason == "abort" for reason, _ in ends) >= 4, ends  # the queued ones at least
        err = proc.stderr.read()
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema}})
    assert isinstance(json.loads(out.choices[0].message.content)["a"], int)


def test_response_format_merges_with_structured_outputs_options(client):
    # vLLM's way to compact JSON from a schema; it was a 400 ("give one structured-output constraint")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]}
    for fmt in ({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}, {"type": "json_object"}):
        out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0,
                                             response_format=fmt,
                                             extra_body={"structured_outputs": {"disable_any_whitespace": True}})
        text = out.choices[0].message.content  # xgrammar's fixed separators (", ", ": "), no optional whitespace
        assert isinstance(json.loads(text), dict) and text == json.dumps(json.loads(text)), text
    body = {"model": "tiny", "messages": CHAT, "response_format": {"type": "json_object"},
            "structured_outputs": {"disable_any_whitespace": True}}
    spec = P.structured_output(P.decode(json.dumps(body).encode(), P.ChatCompletionRequest))
    assert spec.json_object and spec.disable_any_whitespace  # the option reaches the engine's spec
    with pytest.raises(P.ApiError, match="structured_outputs.whitespace_pattern is not supported"):  # not dropped
        P.structured_output(P.decode(json.dumps(body | {"structured_outputs": {"whitespace_pattern": " "}}).encode(),
                                     P.ChatCompletionRequest))
    with pytest.raises(openai.BadRequestError, match="one structured-output constraint"):  # two constraints: refused
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, response_format={
            "type": "json_object"}, extra_body={"structured_outputs": {"regex": "a+"}})


def test_health_is_503_while_the_server_drains(served):
    # a load balancer must stop routing to a server that refuses requests (it answered 200 while draining)
    app = build_app(served[2], model_name="tiny")
    server, serving = HttpServer(app, port=0).start(), app.state.serving
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        serving.closing = True  # what `rapid serve` sets on SIGTERM, before its grace period
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503
    finally:
        server.stop()
        serving.close()


@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"choice": ["red", "blue"]}}, lambda t: t in ("red", "blue")),
    ({"guided_regex": "[0-9]{3}"}, lambda t: re.fullmatch("[0-9]{3}", t)),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
     lambda t: isinstance(json.loads(t)["a"], int)),
])
def test_vllm_structured_output_fields_constrain_the_output(client, extra, check):
    # vLLM's structured_outputs and its older guided_* names: honoured, not silently dropped
    out = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=30, temperature=0,
                                    extra_body=extra)
    assert check(out.choices[0].text), out.choices[0].text


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"guided_json": {"type": "object", "properties": 3}}, "guided_json"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "x"}}}},
     "response_format"),
])
def test_a_spec_xgrammar_refuses_is_a_400_naming_the_field_given(client, extra, param):
    # it named response_format whatever field carried the spec
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param and "xgrammar" in e.value.body["message"]


@pytest.mark.parametrize("spec", [{"regex": "a+", "whitespace_pattern": " "}, {"structural_tag": "{}"}])
def test_structured_outputs_keys_not_implemented_are_refused(client, spec):
    # they were dropped silently (the constraint ran without them, or 'got none' when nothing else was given)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"structured_outputs": spec})
    assert e.value.body["param"] == "structured_outputs"
    assert f"structured_outputs.{[k for k in spec if k != 'regex'][0]} is not supported" in e.value.body["message"]


def test_vllm_sampling_and_template_fields_are_honoured_or_refused(served, client):
    # allowed_token_ids: only those tokens; bad_words: a banned first token is avoided
    only = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, temperature=0,
                                     extra_body={"allowed_token_ids": [7, 8], "return_token_ids": True})
    assert set(only.choices[0].token_ids) <= {7, 8}
    tokenizer = served[2].llm.tokenizer
    forced = {"logit_bias": {"5": 100}, "return_token_ids": True}  # token 5 every step, unless it is banned
    assert client.completions.create(model="tiny", prompt="The quick brown", max_tokens=3, temperature=0,
                                     extra_body=forced).choices[0].token_ids == [5, 5, 5]
    banned = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=3, temperature=0,
                                       extra_body=forced | {"bad_words": [tokenizer.decode([5])]})
    assert 5 not in banned.choices[0].token_ids
    # truncate_prompt_tokens keeps the last k prompt tokens, even of a prompt longer than the context
    cut = client.completions.create(model="tiny", prompt="word " * 400, max_tokens=2,
                                    extra_body={"truncate_prompt_tokens": 5})
    assert cut.usage.prompt_tokens == 5
    # continue_final_message: the assistant's turn is continued, not closed
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The quick"}]
    tokens = httpx.post(served[0].url + "/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                                            "continue_final_message": True}).json()
    assert tokenizer.decode(tokens["tokens"]).endswith("The quick")
    with pytest.raises(openai.BadRequestError):  # both at once, as vLLM
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={
            "continue_final_message": True, "add_generation_prompt": True})
    # fields this server does not implement are refused by name, never silently ignored
    for field, value in (("prompt_logprobs", 1), ("use_beam_search", True), ("priority", 5),
                         ("return_tokens_as_token_ids", True)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={field: value})
        assert e.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, tool_choice="required")
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:  # two constraints at once
        client.completions.create(model="tiny", prompt="hi", max_tokens=2,
                                  extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert "one structured-output constraint" in e.value.body["message"]


def test_tokenize_detokenize_version_and_ping(served):
    url, tokenizer = served[0].url, served[2].llm.tokenizer
    tok = httpx.post(url + "/tokenize", json={"prompt": "Paris is"}).json()
    assert tok["tokens"] == list(tokenizer.encode("Paris is")) and tok["count"] == len(tok["tokens"])
    assert tok["token_strs"] is None
    strs = httpx.post(url + "/tokenize", json={"prompt": "Paris is", "return_token_strs": True}).json()["token_strs"]
    assert len(strs) == tok["count"] and tokenizer.convert_tokens_to_string(strs).endswith("Paris is")
    assert tok["max_model_len"] == MAX_LEN
    chat = httpx.post(url + "/v1/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == served[3]["chat"].prompt_token_ids
    assert httpx.post(url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Paris is"
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(url + "/tokenize", json={"prompt": "a", "messages": CHAT})
    assert both.status_code == 400
    assert httpx.get(url + "/version").json()["version"]
    assert httpx.get(url + "/ping").status_code == 200 and httpx.post(url + "/ping").status_code == 200


def test_serve_chat_template_flag(tiny_llama, tmp_path):
    # --chat-template: a file or the template text; the server's chats use it
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[go]")
    from rapid.entrypoints.serve import read_chat_template

    assert read_chat_template(str(template)) == template.read_text()
    assert read_chat_template("{{ messages }}") == "{{ messages }}" and read_chat_template(None) is None
    with pytest.raises(ValueError, match="is no file, and no Jinja"):
        read_chat_template(str(tmp_path / "typo.jinja"))
    with LLM(tiny_llama, max_model_len=MAX_LEN) as llm:
        frontend = EngineFrontend(llm)
        server = HttpServer(build_app(frontend, model_name="tiny", chat_template=template.read_text()), port=0).start()
        try:
            tokens = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()["tokens"]
            assert llm.tokenizer.decode(tokens) == "[user]hi[go]"
        finally:
            server.stop()
            frontend.close()


def test_stop_reason_says_which_stop_ended_a_choice(served, client):
    # vLLM's choices[].stop_reason: the stop string (or token id) that ended the choice; None for length / EOS
    want = served[3]["Paris is"].outputs[0].text
    stop = want[len(want) // 2:][:2]
    assert stop.strip(), want
    out = client.completions.create(model="tiny", prompt="Paris is", max_tokens=6, temperature=0, stop=[stop])
    choice = out.choices[0].model_dump()
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert want.startswith(choice["text"]) and stop not in choice["text"]
    chunks = list(client.completions.create(model="tiny", prompt="Paris is", max_tokens=6, temperature=0,
                                            stop=[stop], stream=True))
    last = [c.choices[0].model_dump() for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last["stop_reason"] == stop
    plain = client.completions.create(model="tiny", prompt="Paris is", max_tokens=2, temperature=0)
    assert plain.choices[0].model_dump()["stop_reason"] is None


def test_several_served_model_names(served):
    # as `vllm serve --served-model-name A B`: /v1/models lists each, requests may use any, responses report the first
    server = HttpServer(build_app(served[2], model_name=["tiny", "alias"]), port=0).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "alias"]
        assert client.models.retrieve("alias").id == "alias"
        out = client.completions.create(model="alias", prompt="Paris is", max_tokens=2)
        assert out.model == "tiny" and out.choices[0].text is not None
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="Paris is", max_tokens=2)
    finally:
        server.stop()


def test_the_bundled_default_model_is_served_by_its_own_names(tiny_llama, tmp_path):
    # `rapid serve` with no model serves the cached conversion <cache>/models/SmolLM2-135M-Instruct-<key>: clients
    # send its name or its Hugging Face name (the folder path still works), and responses report the name
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct-c1-0123456789ab"
    shutil.copytree(tiny_llama, folder)
    with LLM(str(folder), max_model_len=MAX_LEN) as llm:
        frontend = EngineFrontend(llm)
        server = HttpServer(build_app(frontend), port=0).start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            names = [m.id for m in client.models.list().data]
            assert names == ["SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"]
            for name in (*names, str(folder)):
                out = client.completions.create(model=name, prompt="Paris is", max_tokens=2)
                assert out.model == "SmolLM2-135M-Instruct" and len(out.choices[0].text) > 0
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="SmolLM2-360M-Instruct", prompt="Paris is", max_tokens=2)
        finally:
            server.stop()
            frontend.close()


def test_cors_only_when_origins_are_allowed(served):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(served[0].url + "/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers  # the default: no CORS
    server = HttpServer(build_app(served[2], model_name="tiny", api_key="sesame",
                                  allowed_origins=["http://app.example"]), port=0).start()
    try:
        r = httpx.options(server.url + "/v1/completions", headers=preflight)  # answered before the key is asked
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                       headers={"Origin": "http://app.example", "Authorization": "Bearer sesame"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(server.url + "/v1/completions", headers=preflight | {"Origin": "http://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"
    finally:
        server.stop()


def test_a_request_chat_template_is_refused_unless_the_server_trusts_them(served):
    # as vLLM without --trust-request-chat-template: a template is a program the server would run ('ab ' * 2000000
    # held every other request for seconds); the keyed server of the fixture is such a server
    url, headers = served[1].url, {"Authorization": "Bearer sesame"}
    for body in ({"chat_template": "{{ 'ab ' * 2000000 }}"}, {"chat_template_kwargs": {"chat_template": "x"}}):
        for path, extra in (("/v1/chat/completions", {"model": "tiny", "max_tokens": 2}), ("/tokenize", {})):
            r = httpx.post(url + path, json={"messages": CHAT, **extra, **body}, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
            assert "--trust-request-chat-template" in r.json()["error"]["message"]
    plain = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 2},
                       headers=headers)
    assert plain.status_code == 200, plain.text
    trusted = httpx.post(served[0].url + "/tokenize", json={"messages": CHAT, "chat_template": "{{ 'ab' }}"})
    assert trusted.status_code == 200 and served[2].llm.tokenizer.decode(trusted.json()["tokens"]) == "ab"


def test_message_name_and_tool_fields_reach_the_template(served):
    # as vLLM: a message's name, an assistant's tool_calls and a tool message's tool_call_id go to the template
    template = ("{% for m in messages %}{{ m['role'] }}/{{ m.get('name', '') }}/{{ m.get('tool_call_id', '') }}/"
                "{{ (m.get('tool_calls') or []) | length }};{% endfor %}")
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    messages = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    r = httpx.post(served[0].url + "/tokenize", json={"messages": messages, "chat_template": template,
                                                       "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    text = served[2].llm.tokenizer.decode(r.json()["tokens"])
    assert text == "user/ann//0;assistant///1;tool//c1/0;"
