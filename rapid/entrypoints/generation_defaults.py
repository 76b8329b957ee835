"""The model's default sampling parameters from generation_config.json, as vLLM's `--generation-config` reads them.

EngineConfig.generation_config says where they come from: "auto" (the default) the model folder's
generation_config.json, "vllm" nowhere (SamplingParams' own defaults), any other value that folder's
generation_config.json. Of the file, temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as
max_tokens) are taken, each one that is given and not null, whatever its value (vLLM with transformers 5, whose
GenerationConfig has no defaults of its own to leave out); do_sample and everything else are not read.
LLM.get_default_sampling_params() builds a SamplingParams from them, LLM.generate / chat use it when given no
params, and the HTTP server fills each sampling field a request leaves out with them (a field it sets wins).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rapid.params import SamplingParams

logger = logging.getLogger(__name__)

FILE = "generation_config.json"
# the file's key -> the SamplingParams field it gives the default of (vLLM's list)
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """The folder's generation_config.json as a dict ({} when there is none); ValueError naming the file when it
    is not a JSON object."""
    path = Path(folder).expanduser() / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def generation_config_folder(generation_config: str, model: str) -> Path | None:
    """The folder whose generation_config.json gives the defaults (None for "vllm"); FileNotFoundError for a
    folder given by name that is missing or holds no generation_config.json."""
    if generation_config == "vllm":
        return None
    if generation_config == "auto":
        return Path(model)
    folder = Path(generation_config).expanduser()
    if not (folder / FILE).is_file():
        what = "is not a folder" if not folder.is_dir() else f"holds no {FILE}"
        raise FileNotFoundError(f"generation_config {generation_config!r} {what}; give a folder holding {FILE}, "
                                "'auto' (the model folder's) or 'vllm' (none)")
    return folder


def read_sampling_defaults(generation_config: str, model: str) -> dict[str, Any]:
    """{SamplingParams field: default} from the file `generation_config` names ({} for "vllm" or a file that
    gives none), logged once (a warning) when there are any; ValueError naming the file and the key for a value
    SamplingParams refuses."""
    folder = generation_config_folder(generation_config, model)
    if folder is None:
        return {}
    config, defaults = read_generation_config(folder), {}
    for key, field in FIELDS.items():
        if config.get(key) is None:
            continue
        try:  # the value as SamplingParams holds it (a float temperature, top_k -1 as 0)
            defaults[field] = getattr(SamplingParams(**{field: config[key]}), field)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{folder / FILE}: {key} {config[key]!r} is not a valid default: {e}") from None
    if defaults:  # a warning, as vLLM's: sampling changes for callers who pass no params
        logger.warning("default sampling parameters overridden by the model's %s: %s (a request's own values win; "
                       "--generation-config vllm leaves them out)", folder / FILE,
                       ", ".join(f"{k}={v!r}" for k, v in defaults.items()))
    return defaults


def max_tokens_cap(generation_config: str, defaults: dict[str, Any]) -> int | None:
    """vLLM's override_max_tokens: a generation config given as a folder caps every server request's max_tokens at
    its max_new_tokens; None (no cap) for "auto", "vllm" or a file without max_new_tokens."""
    return None if generation_config in ("auto", "vllm") else defaults.get("max_tokens")
