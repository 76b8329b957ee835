"""Tests for rapid.sampling: SamplingParams validation/serialisation and the batched sampler."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from rapid.params import MAX_LOGPROBS, SamplingParams
from rapid.worker.sampler import SamplingBatch, mix_seed, process_logits, sample

CPU = torch.device("cpu")


def build(params, outputs=None, prompts=None, steps=None, vocab_size=None, eos=None):
    """SamplingBatch for `params` with empty histories unless given."""
    B = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(B)]
    prompts = prompts if prompts is not None else [[] for _ in range(B)]
    return SamplingBatch.build(params, outputs, prompts, steps, vocab_size, CPU, eos_token_ids=eos)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(CPU).manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# SamplingParams
# ------------------------------------------------------------------------------------------------


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, (), ())
    assert (p.ignore_eos, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (
        False, 0.0, 0.0, 1.0,
    )
    assert (p.logprobs, p.include_stop_str_in_output, p.skip_special_tokens) == (None, False, True)
    assert not p.greedy


@pytest.mark.parametrize(
    "kwargs, exc, field",
    [
        ({"n": 0}, ValueError, "n"),
        ({"n": 1.5}, TypeError, "n"),
        ({"n": True}, TypeError, "n"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.01}, ValueError, "top_p"),
        ({"top_p": float("nan")}, ValueError, "top_p"),
        ({"top_k": -2}, ValueError, "top_k"),
        ({"top_k": 2.0}, TypeError, "top_k"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"min_p": -0.1}, ValueError, "min_p"),
        ({"min_p": 1.5}, ValueError, "min_p"),
        ({"max_tokens": 0}, ValueError, "max_tokens"),
        ({"max_tokens": "16"}, TypeError, "max_tokens"),
        ({"min_tokens": -1}, ValueError, "min_tokens"),
        ({"min_tokens": 17}, ValueError, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, ValueError, "min_tokens"),
        ({"presence_penalty": 2.5}, ValueError, "presence_penalty"),
        ({"presence_penalty": -2.01}, ValueError, "presence_penalty"),
        ({"frequency_penalty": 3}, ValueError, "frequency_penalty"),
        ({"frequency_penalty": -3.0}, ValueError, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, ValueError, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, ValueError, "repetition_penalty"),
        ({"logprobs": -1}, ValueError, "logprobs"),
        ({"logprobs": MAX_LOGPROBS + 1}, ValueError, "logprobs"),
        ({"logprobs": 2.0}, TypeError, "logprobs"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": "42"}, TypeError, "seed"),
        ({"stop": ""}, ValueError, "stop"),
        ({"stop": ["ok", ""]}, ValueError, "stop"),
        ({"stop": 3}, TypeError, "stop"),
        ({"stop": ["ok", 3]}, TypeError, "stop"),
        ({"stop_token_ids": [-1]}, ValueError, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, TypeError, "stop_token_ids"),
        ({"stop_token_ids": 5}, TypeError, "stop_token_ids"),
        ({"ignore_eos": 1}, TypeError, "ignore_eos"),
    ],
)
def test_validation(kwargs, exc, field):
    with pytest.raises(exc) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert field in message
    bad = list(kwargs.values())[0]
    if not isinstance(bad, (list, tuple)):
        assert repr(bad) in message or str(bad) in message  # the bad value is quoted


def test_valid_edges_and_normalisation():
    p = SamplingParams(
        temperature=0, top_p=1, top_k=-1, min_p=1, presence_penalty=-2, frequency_penalty=2,
        repetition_penalty=3, logprobs=0, seed=-7, max_tokens=4, min_tokens=4,
        stop="###", stop_token_ids=[3, 4],
    )
    assert isinstance(p.temperature, float) and p.temperature == 0.0
    assert p.top_k == 0  # -1 and 0 both mean off
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS


def test_seed_minus_one_means_unseeded_as_vllm():
    # vLLM reads seed=-1 as None; taken as a fixed seed, every call returned the same "random" tokens
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams.from_dict(SamplingParams(seed=-1).to_dict()).seed is None
    assert SamplingParams(seed=-2).seed == -2
    # over HTTP, n choices take seed + index: with -1 the second choice was seeded (0)
    from rapid.entrypoints.openai.protocol import CompletionRequest, sampling_params

    req = CompletionRequest(model="m", prompt="x", seed=-1, n=2)
    assert [sampling_params(req, max_tokens=4, logprobs=None, default_max_tokens=16, index=i).seed
            for i in range(2)] == [None, None]
    req = CompletionRequest(model="m", prompt="x", seed=7, n=2)
    assert [sampling_params(req, max_tokens=4, logprobs=None, default_max_tokens=16, index=i).seed
            for i in range(2)] == [7, 8]


def test_clone_as_vllm():
    # vLLM scripts call params.clone(); it was an AttributeError
    p = SamplingParams(temperature=0.3, logit_bias={5: 1.0}, stop=["x"])
    q = p.clone()
    assert q == p and q is not p and q.logit_bias is not p.logit_bias


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5, top_k=2).greedy


def test_frozen_and_serialisable():
    p = SamplingParams(temperature=0.3, stop=["x", "yz"], stop_token_ids=[7], seed=5, logprobs=2)
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    assert msgspec.json.decode(msgspec.json.encode(p), type=SamplingParams) == p
    assert SamplingParams.from_dict(p.to_dict()) == p
    # Decoding validates too.
    bad = msgspec.msgpack.encode({"temperature": -1.0})
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        msgspec.msgpack.decode(bad, type=SamplingParams)


# ------------------------------------------------------------------------------------------------
# Sampler: greedy
# ------------------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_lowest_index_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    logits[2, 10] = logits[2, 40] = 50.0  # tie -> lowest index
    batch = build([SamplingParams(temperature=0)] * 6, vocab_size=100)
    out = sample(logits, batch, gen())
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[2] == 10
    assert out.logprobs == [None] * 6


def test_top_k_1_equals_greedy_in_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(8, 64)
    params = [
        SamplingParams(top_k=1, temperature=1.3, seed=i) if i % 2 else SamplingParams(temperature=0.9)
        for i in range(8)
    ]
    out = sample(logits, build(params, vocab_size=64), gen())
    argmax = logits.argmax(-1).tolist()
    for i in range(1, 8, 2):
        assert out.token_ids[i] == argmax[i]


def test_logits_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(3, 32)
    before = logits.clone()
    params = [
        SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5, min_tokens=2),
        SamplingParams(top_p=0.5, top_k=4, min_p=0.1, temperature=0.7),
        SamplingParams(temperature=0, logprobs=3),
    ]
    batch = build(params, outputs=[[1, 1, 2], [], [5]], prompts=[[3], [4], [5]], vocab_size=32, eos=[0])
    sample(logits, batch, gen())
    assert torch.equal(logits, before)


def test_shape_mismatch_raises():
    batch = build([SamplingParams()], vocab_size=10)
    with pytest.raises(ValueError, match="shape"):
        sample(torch.zeros(2, 10), batch, gen())


# ------------------------------------------------------------------------------------------------
# Sampler: seeds
# ------------------------------------------------------------------------------------------------


def seeded_tokens(seed: int, position: int, batch_size: int, logits_row: torch.Tensor, steps: int,
                  noise_seed: int) -> list[int]:
    """Generate `steps` tokens for one seeded row placed at `position` in a batch of random rows."""
    V = logits_row.shape[0]
    g = gen(noise_seed)
    other = torch.Generator().manual_seed(1000 + noise_seed)
    tokens: list[int] = []
    for step in range(steps):
        logits = torch.randn(batch_size, V, generator=other)
        logits[position] = logits_row
        params = [SamplingParams(temperature=1.0) for _ in range(batch_size)]
        params[position] = SamplingParams(temperature=1.0, seed=seed)
        steps_idx = [0] * batch_size
        steps_idx[position] = step
        batch = build(params, steps=steps_idx, vocab_size=V)
        tokens.append(sample(logits, batch, g).token_ids[position])
    return tokens


def test_seeded_rows_are_reproducible_independent_of_batch():
    V = 500
    row = torch.zeros(V)  # uniform: every token is equally likely, so the noise decides
    ref = seeded_tokens(1234, position=0, batch_size=1, logits_row=row, steps=12, noise_seed=0)
    assert len(set(ref)) > 6  # not stuck on one token
    for position, batch_size, noise_seed in [(3, 5, 1), (7, 8, 2), (0, 16, 3)]:
        assert seeded_tokens(1234, position, batch_size, row, 12, noise_seed) == ref


def test_different_seeds_give_different_tokens():
    V = 1000
    row = torch.zeros(V)
    sequences = {tuple(seeded_tokens(s, 0, 1, row, 8, 0)) for s in range(10)}
    assert len(sequences) == 10
    # Same seed at different steps gives different draws, and the mixing is a fixed function.
    assert mix_seed(5, 0) != mix_seed(5, 1) != mix_seed(6, 0)
    from rapid.worker.sampler_ops import _splitmix64

    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's published first output for state 0
    assert mix_seed(5, 3) == _splitmix64(_splitmix64(5) ^ 3) >> 1
    assert 0 <= mix_seed(-1, 2**70) < 2**63


def test_seeded_rows_in_one_batch_match_single_rows():
    """Several rows with seeds in one batch equal each row sampled alone."""
    torch.manual_seed(3)
    V = 300
    logits = torch.randn(6, V)
    params = [SamplingParams(seed=100 + i, temperature=0.8, top_p=0.9) for i in range(6)]
    steps = [0, 4, 9, 1, 2, 3]
    together = sample(logits, build(params, steps=steps, vocab_size=V), gen(0)).token_ids
    alone = [
        sample(logits[i : i + 1], build([params[i]], steps=[steps[i]], vocab_size=V), gen(99)).token_ids[0]
        for i in range(6)
    ]
    assert together == alone


# ------------------------------------------------------------------------------------------------
# Sampler: filtering and distribution
# ------------------------------------------------------------------------------------------------


def many_draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """Sample n times from one row (as an n-row batch) -> [n] token ids."""
    V = logits_row.shape[0]
    logits = logits_row.expand(n, V).contiguous()
    out = sample(logits, build([params] * n, vocab_size=V), gen(seed))
    return torch.tensor(out.token_ids)


# probs over 10 tokens, distinct values, shuffled order so the index is not the rank
PROBS = torch.tensor([0.02, 0.30, 0.05, 0.20, 0.01, 0.15, 0.03, 0.12, 0.08, 0.04])
LOGITS = PROBS.log()
ORDER = PROBS.argsort(descending=True).tolist()  # [1, 3, 5, 7, 8, 2, 9, 6, 0, 4]


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=3), set(ORDER[:3])),
        # top_p=0.6: 0.30 + 0.20 = 0.50 < 0.6, + 0.15 = 0.65 >= 0.6 -> 3 tokens
        (SamplingParams(top_p=0.6), set(ORDER[:3])),
        (SamplingParams(top_p=0.01), {ORDER[0]}),
        # min_p=0.3: keep p >= 0.09 -> 0.30, 0.20, 0.15, 0.12
        (SamplingParams(min_p=0.3), set(ORDER[:4])),
        # top_k=5 then top_p=0.7 of the renormalised top 5 (0.85 mass): 0.30/0.85 + 0.20/0.85 = 0.588,
        # + 0.15/0.85 = 0.765 >= 0.7 -> 3 tokens
        (SamplingParams(top_k=5, top_p=0.7), set(ORDER[:3])),
        # min_p=0.6: keep p >= 0.18 -> 0.30, 0.20
        (SamplingParams(top_k=6, min_p=0.6), set(ORDER[:2])),
    ],
)
def test_filtered_tokens_never_sampled(params, allowed):
    draws = many_draws(LOGITS, params, 4000)
    assert set(draws.tolist()) == allowed  # nothing outside, and every allowed token appears


def test_filters_in_mixed_batch():
    """Rows with different filters (and one with none) in one batch each respect their own."""
    params = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_p=0.6), SamplingParams(min_p=0.3)]
    allowed = [set(ORDER[:2]), set(range(10)), set(ORDER[:3]), set(ORDER[:4])]
    n = 1500
    logits = LOGITS.expand(4 * n, 10).contiguous()
    batch = build(params * n, vocab_size=10)
    tokens = torch.tensor(sample(logits, batch, gen(5)).token_ids).view(n, 4)
    for j in range(4):
        assert set(tokens[:, j].tolist()) <= allowed[j]
        assert len(set(tokens[:, j].tolist())) >= len(allowed[j]) - (2 if j == 1 else 0)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.8])
def test_temperature_distribution_matches_softmax(temperature):
    n = 20000
    draws = many_draws(LOGITS, SamplingParams(temperature=temperature), n, seed=11)
    counts = torch.bincount(draws, minlength=10).float()
    probs = torch.softmax(LOGITS / temperature, -1)
    # df = 9: P(chi2 > 27.9) = 0.001; fixed seed, so this is deterministic.
    assert chi_square(counts, probs) < 27.9


def test_top_k_top_p_distribution_is_renormalised():
    n = 20000
    draws = many_draws(LOGITS, SamplingParams(top_k=5, top_p=0.7), n, seed=12)
    counts = torch.bincount(draws, minlength=10).float()[ORDER[:3]]
    probs = PROBS[ORDER[:3]] / PROBS[ORDER[:3]].sum()
    assert chi_square(counts, probs) < 13.8  # df = 2, p = 0.001


# ------------------------------------------------------------------------------------------------
# Penalties and min_tokens
# ------------------------------------------------------------------------------------------------


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompt = [[0, 1]]
    output = [[2, 2, 4]]
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    batch = build([p], outputs=output, prompts=prompt, vocab_size=6)
    # repetition (tokens 0, 1 from the prompt, 2, 4 from the output): positive / 2, negative * 2
    expected = [2.0 / 2, -1.0 * 2, 0.5 / 2, 3.0, -2.0 * 2, 1.0]
    # frequency over output counts (2 -> 2, 4 -> 1) and presence over output tokens (2, 4)
    expected[2] -= 0.5 * 2 + 0.25
    expected[4] -= 0.5 * 1 + 0.25
    torch.testing.assert_close(process_logits(logits, batch), torch.tensor([expected]))


def test_penalties_only_on_their_rows_and_change_greedy_choice():
    logits = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.9, 0.0]])
    params = [SamplingParams(temperature=0, presence_penalty=0.5), SamplingParams(temperature=0)]
    batch = build(params, outputs=[[0], [0]], vocab_size=3)
    processed = process_logits(logits, batch)
    torch.testing.assert_close(processed[1], logits[1])  # row without penalties untouched
    assert sample(logits, batch, gen()).token_ids == [1, 0]


def test_repetition_penalty_uses_prompt_only_for_its_row():
    logits = torch.tensor([[2.0, 1.0], [2.0, 1.0]])
    params = [SamplingParams(repetition_penalty=4.0), SamplingParams()]
    batch = build(params, prompts=[[0], [0]], vocab_size=2)
    torch.testing.assert_close(process_logits(logits, batch), torch.tensor([[0.5, 1.0], [2.0, 1.0]]))


def test_min_tokens_masks_eos_and_stop_token_ids():
    V, eos = 8, 7
    logits = torch.zeros(4, V)
    logits[:, eos] = 10.0
    logits[:, 3] = 9.0  # a stop token id
    logits[:, 5] = 8.0
    params = [
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[3]),  # step 0 < 3: masked
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[3]),  # step 3: free
        SamplingParams(temperature=0, min_tokens=3),  # masks eos only -> stop id 3 wins
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True),  # eos is no stop: not masked
    ]
    batch = build(params, steps=[0, 3, 1, 1], vocab_size=V, eos=[eos])
    assert sample(logits, batch, gen()).token_ids == [5, eos, 3, eos]
    # per-row eos ids
    batch = build(params[:2], steps=[0, 0], vocab_size=V, eos=[[eos], [5]])
    assert sample(logits[:2], batch, gen()).token_ids == [5, eos]


def test_min_tokens_random_rows_never_sample_eos():
    V, eos, n = 6, 2, 2000
    logits = torch.zeros(V)
    logits[eos] = 3.0
    rows = logits.expand(n, V).contiguous()
    masked = build([SamplingParams(min_tokens=1)] * n, vocab_size=V, eos=[eos])  # step 0 < 1
    tokens = sample(rows, masked, gen()).token_ids
    assert eos not in tokens and len(set(tokens)) == V - 1
    free = build([SamplingParams(min_tokens=1)] * n, steps=[1] * n, vocab_size=V, eos=[eos])
    assert eos in sample(rows, free, gen()).token_ids


# ------------------------------------------------------------------------------------------------
# Logprobs
# ------------------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_and_include_sampled():
    torch.manual_seed(4)
    V = 50
    logits = torch.randn(4, V) * 3
    params = [
        SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=2.0, logprobs=0, seed=1),
        SamplingParams(temperature=5.0, top_k=0, logprobs=2, seed=3),
        SamplingParams(temperature=1.0),
    ]
    batch = build(params, outputs=[[1, 2], [], [], []], prompts=[[3], [], [], []], vocab_size=V)
    out = sample(logits, batch, gen())
    ref = torch.log_softmax(logits, -1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.sampled_logprob)):
        assert math.isclose(lp, ref[i, tok].item(), abs_tol=1e-5)
    assert out.logprobs[3] is None
    top5 = ref[0].topk(5)
    assert set(out.logprobs[0]) == set(top5.indices.tolist()) | {out.token_ids[0]}
    assert out.logprobs[1] == {out.token_ids[1]: pytest.approx(ref[1, out.token_ids[1]].item(), abs=1e-5)}
    for i in range(3):
        for tok, lp in out.logprobs[i].items():
            assert math.isclose(lp, ref[i, tok].item(), abs_tol=1e-5)
        assert out.token_ids[i] in out.logprobs[i]


def test_logprobs_dict_has_n_plus_one_entries_when_sampled_not_in_top():
    V, n = 40, 64
    logits = torch.zeros(V)
    logits[:2] = 1.0  # tokens 0 and 1 are the top-2 by a small margin
    # At temperature 100 sampling is ~uniform, so most draws fall outside the top-2.
    batch = build([SamplingParams(temperature=100.0, logprobs=2)] * n, vocab_size=V)
    out = sample(logits.expand(n, V).contiguous(), batch, gen())
    assert {len(d) for d in out.logprobs} == {2, 3}
    for tok, d in zip(out.token_ids, out.logprobs):
        assert {0, 1} <= set(d) and tok in d


def test_empty_batch_and_small_vocab():
    out = sample(torch.zeros(0, 5), build([], vocab_size=5), gen())
    assert out.token_ids == [] and out.logprobs == []
    # logprobs larger than the vocabulary: every token is listed
    out = sample(torch.zeros(1, 3), build([SamplingParams(logprobs=10)], vocab_size=3), gen())
    assert len(out.logprobs[0]) == 3


# ------------------------------------------------------------------------------------------------
# logit_bias, allowed_token_ids, bad_words, grammar bitmask, ranks (vLLM parity)
# ------------------------------------------------------------------------------------------------


def test_logit_bias_allowed_ids_and_grammar_bitmask_in_mixed_batch():
    V = 40
    logits = torch.randn(4, V, generator=gen(1))
    bitmask = torch.full((4, 2), -1, dtype=torch.int32)
    bitmask[3] = 0
    bitmask[3, 1] = 1 << 1  # row 3: only token 33
    params = [SamplingParams(temperature=0, logit_bias={7: 100.0}),
              SamplingParams(temperature=0, allowed_token_ids=[3, 5]),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0.8, seed=1, allowed_token_ids=[33, 34])]
    batch = SamplingBatch.build(params, [[]] * 4, None, None, V, CPU, grammar_bitmask=bitmask)
    out = sample(logits, batch, gen())
    assert out.token_ids[0] == 7
    assert out.token_ids[1] == (3 if logits[1, 3] > logits[1, 5] else 5)
    assert out.token_ids[2] == int(logits[2].argmax())
    assert out.token_ids[3] == 33
    x = process_logits(logits, batch)
    assert x[0, 7] == pytest.approx(logits[0, 7] + 100.0)
    assert torch.isinf(x[1]).sum() == V - 2 and torch.isinf(x[3]).sum() == V - 1


def test_bad_words_ban_the_last_token_after_the_prefix():
    V = 10
    logits = torch.zeros(2, V)
    logits[:, 4] = 5.0  # the favourite
    p = SamplingParams(temperature=0, bad_words_token_ids=((2, 4), (9,)))
    batch = build([p, p], outputs=[[1, 2], [2, 1]], vocab_size=V)
    x = process_logits(logits, batch)
    assert torch.isinf(x[0, 4]) and not torch.isinf(x[1, 4])  # (2, 4) banned only right after 2
    assert torch.isinf(x[:, 9]).all()  # a one-token bad word is always banned
    assert sample(logits, batch, gen()).token_ids[1] == 4


def test_sampled_token_rank_counts_tokens_at_least_as_likely():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    lp = torch.log_softmax(logits, -1)
    out = sample(logits, build([SamplingParams(temperature=0, logprobs=1)], vocab_size=4), gen())
    assert out.token_ids == [1] and out.ranks == [1] and list(out.logprobs[0]) == [1]
    # a row forced onto its third-best token reports rank 3 (logprobs of the raw logits)
    out = sample(logits, build([SamplingParams(temperature=0, logprobs=2, allowed_token_ids=[3])], vocab_size=4), gen())
    assert out.token_ids == [3] and out.ranks == [3]
    assert list(out.logprobs[0]) == [1, 2, 3] and out.logprobs[0][3] == pytest.approx(lp[0, 3].item())


@pytest.mark.parametrize("kwargs,exc,field", [
    (dict(logit_bias={-1: 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={"x": 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={1: float("nan")}), ValueError, "logit_bias"),
    (dict(allowed_token_ids=[1, -2]), ValueError, "allowed_token_ids"),
    (dict(prompt_logprobs=-1), ValueError, "prompt_logprobs"),
    (dict(truncate_prompt_tokens=-1), ValueError, "truncate_prompt_tokens"),
    (dict(max_tokens=None, min_tokens=-1), ValueError, "min_tokens"),
])
def test_new_fields_validation(kwargs, exc, field):
    with pytest.raises(exc, match=field):
        SamplingParams(**kwargs)


def test_new_fields_normalised_and_serialisable():
    p = SamplingParams(max_tokens=None, logit_bias={"5": 300}, allowed_token_ids=[1, 2], bad_words="foo",
                       prompt_logprobs=0)
    assert p.logit_bias == {5: 100.0} and p.allowed_token_ids == (1, 2) and p.bad_words == ("foo",)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
