"""Benchmarks as a user runs them, as short CPU smokes: bench offline, bench serve (two modes), bench frontier."""

import json

import pytest

from rapid.entrypoints.cli import main

pytestmark = pytest.mark.slow


def test_bench_offline_smoke(tiny_llama, tmp_path):
    out = tmp_path / "offline.json"
    assert main(["bench", "offline", "--model", str(tiny_llama), "--num-seqs", "4", "--min-input-len", "8",
                 "--max-input-len", "32", "--min-output-len", "4", "--max-output-len", "8",
                 "--prefill-attention", "cudnn", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "--prefill-attention=cudnn" in result["command"]  # accepted (the CPU's reference backend ignores it)
    assert result["num_seqs"] == 4 and result["output_tokens"] >= 16 and result["output_throughput_tok_s"] > 0


def test_bench_serve_two_modes_smoke(tiny_llama, tmp_path):
    assert main(["bench", "serve", "--model", str(tiny_llama), "--modes", "hybrid,rapid", "--num-prompts", "6",
                 "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "6",
                 "--request-rates", "20,inf", "--ignore-eos", "--goodput", "ttft:5000", "tpot:1000",
                 "--max-model-len", "256", "--result-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "serve.json").read_text())
    for mode in ("hybrid", "rapid"):
        rates = summary["modes"][mode]["per_rate"]
        assert [r["completed"] for r in rates] == [6, 6]
        assert all(r["total_output_tokens"] == 36 and r["median_tpot_ms"] > 0 for r in rates)
        assert summary["modes"][mode]["goodput_rps"] == 20.0  # every request met the loose SLOs
    assert (tmp_path / "attainment.png").stat().st_size > 0


def test_bench_frontier_smoke(tmp_path):
    from tiny import make_tiny_model

    # long max_model_len: the decode requests must outlive the measurement window
    model = make_tiny_model(tmp_path / "m", "llama", max_position_embeddings=8192, with_tokenizer=False)
    out = tmp_path / "frontier.json"
    assert main(["bench", "frontier", "--model", str(model), "--mode", "hybrid", "--chunks", "32",
                 "--batches", "2", "--ctx", "16", "--prefill-len", "64", "--window-s", "0.3",
                 "--max-model-len", "8192", "--output-json", str(out)]) == 0
    (point,) = json.loads(out.read_text())
    assert point["prefill_tok_s"] > 0 and point["decode_steps"] > 0 and point["tpot_mean_ms"] > 0
