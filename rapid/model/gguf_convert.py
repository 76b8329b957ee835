"""GGUF -> Hugging Face folder conversion of a Llama model: config and float32 weights.

:func:`convert_gguf_to_hf` reads a Llama GGUF file with ``gguf.GGUFReader`` and writes a Hugging
Face model folder:

* every tensor is dequantised to float32 (``gguf.quants.dequantize``) and renamed to the
  Hugging Face Llama names; the q/k projections are un-permuted (see :func:`_unpermute_rope`);
* ``config.json`` and ``generation_config.json`` are built from the GGUF metadata;
* the tokenizer files (with the chat template) come from :mod:`rapid.model.gguf_tokenizer`.

Caching the result (and the default model's GGUF) is :mod:`rapid.model.default_model`'s job.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from rapid.model.gguf_tokenizer import save_tokenizer, write_json

__all__ = ["convert_gguf_to_hf"]

#: GGUF tensor names -> Hugging Face Llama names ({} is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert a Llama GGUF file to a Hugging Face model folder with float32 weights.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer
    files (``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
    ``special_tokens_map.json``) into ``out_dir`` (created if missing). Writes are not atomic:
    :func:`rapid.model.default_model.default_model_path` calls this on a temporary folder.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: the file is not a readable GGUF, or not a Llama model (naming the file).
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = _open_gguf(gguf_path)
    metadata = _read_metadata(reader, gguf_path)
    config = _hf_config(metadata, _token_count(reader), gguf_path)
    tensors = _hf_state_dict(reader, config, gguf_path)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    out_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(tensors, out_dir)
    del tensors
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", _generation_config(config))
    save_tokenizer(gguf_path, out_dir, config)


def _open_gguf(gguf_path: Path):
    """Open ``gguf_path`` with ``gguf.GGUFReader``, turning any parse error into ValueError."""
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises ValueError, struct/numpy/index errors, ...
        raise ValueError(
            f"{gguf_path}: not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from exc


def _read_metadata(reader, gguf_path: Path) -> dict[str, Any]:
    """The GGUF key/values as Python values, leaving out the large token/merge lists."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores"}
    metadata: dict[str, Any] = {}
    try:
        for key, field in reader.fields.items():
            if key not in skip:
                metadata[key] = field.contents()
    except Exception as exc:
        raise ValueError(f"{gguf_path}: unreadable GGUF metadata ({exc})") from exc
    return metadata


def _token_count(reader) -> int | None:
    """The number of entries in the GGUF's token list (None without one)."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return len(tokens.data) if tokens is not None else None


def _hf_config(
    metadata: dict[str, Any], token_count: int | None, gguf_path: Path
) -> dict[str, Any]:
    """Build the ``config.json`` dict of a ``LlamaForCausalLM`` from the GGUF metadata.

    The vocabulary size is the length of the token list (``token_count``), which is what the
    embedding matrix has rows for; ``llama.vocab_size`` is only a fallback.
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{gguf_path}: architecture is {arch!r}; only 'llama' GGUF files can be converted"
        )

    def need(key: str) -> Any:
        if key not in metadata:
            raise ValueError(f"{gguf_path}: GGUF metadata lacks {key!r}")
        return metadata[key]

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    kv_heads = int(metadata.get("llama.attention.head_count_kv", heads))
    vocab = token_count or metadata.get("llama.vocab_size")
    if not vocab:
        raise ValueError(f"{gguf_path}: GGUF has neither a token list nor llama.vocab_size")
    head_dim = int(metadata.get("llama.attention.key_length", hidden // heads))
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"{gguf_path}: inconsistent head counts {heads}/{kv_heads} for {hidden}")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float32",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(need("llama.context_length")),
        "rms_norm_eps": _float32_shortest(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_shortest(metadata.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": True,  # set from the tensors by convert_gguf_to_hf
    }
    for name in ("bos", "eos", "padding", "unknown"):
        value = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            key = {"padding": "pad", "unknown": "unk"}.get(name, name)
            config[f"{key}_token_id"] = int(value)
    return config


def _float32_shortest(value: float) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _hf_state_dict(reader, config: dict[str, Any], gguf_path: Path) -> dict[str, np.ndarray]:
    """Dequantise every tensor to float32 and return them under their Hugging Face names."""
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, gguf_path)
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise ValueError(f"{gguf_path}: cannot dequantise {tensor.name} ({exc})") from exc
        # GGUF lists dims fastest-first (ne[0] = columns); torch lists them slowest-first.
        expected = tuple(int(d) for d in reversed(tensor.shape))
        if weights.shape != expected:
            raise ValueError(
                f"{gguf_path}: {tensor.name} dequantised to shape {weights.shape}, "
                f"expected {expected} (GGUF dims {list(tensor.shape)} reversed)"
            )
        if name.endswith("q_proj.weight"):
            weights = _unpermute_rope(weights, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weights = _unpermute_rope(weights, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weights, dtype=np.float32)
    _check_tensors(tensors, config, gguf_path)
    return tensors


def _hf_name(gguf_name: str, gguf_path: Path) -> str:
    """The Hugging Face Llama name of a GGUF tensor name (``blk.3.attn_q.weight`` -> ...)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"{gguf_path}: unexpected tensor {gguf_name!r} for a Llama model")


def _unpermute_rope(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection (rows = heads * head_dim).

    Hugging Face Llama rotates the two halves of each head (``rotate_half``: dims ``i`` and
    ``i + head_dim/2`` form a pair); llama.cpp rotates adjacent dims (``2i``, ``2i+1``), so its
    converter reorders each head's rows from ``[half 0 | half 1]`` to interleaved pairs
    (``reshape(n_heads, 2, head_dim/2, cols).swapaxes(1, 2)``). This is the inverse.
    """
    rows = weights.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads")
    half = rows // n_heads // 2
    return weights.reshape(n_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _check_tensors(tensors: dict[str, np.ndarray], config: dict[str, Any], gguf_path: Path) -> None:
    """Check that every tensor a LlamaForCausalLM needs is present with the shape it needs."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    expected = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        expected.update({
            prefix + "self_attn.q_proj.weight": (q_rows, hidden),
            prefix + "self_attn.k_proj.weight": (kv_rows, hidden),
            prefix + "self_attn.v_proj.weight": (kv_rows, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_rows),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    if "lm_head.weight" in tensors:
        expected["lm_head.weight"] = (config["vocab_size"], hidden)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tensors[k].shape} != {v}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v]
    if missing or extra or wrong:
        raise ValueError(
            f"{gguf_path}: tensors do not match the metadata: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}"
        )


def _save_weights(tensors: dict[str, np.ndarray], out_dir: Path) -> None:
    """Write ``model.safetensors`` (readable by ``safetensors.torch`` and transformers)."""
    from safetensors.numpy import save_file

    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: the special token ids (sampling settings stay defaults)."""
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
