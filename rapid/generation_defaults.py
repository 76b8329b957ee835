"""The model's default sampling parameters from generation_config.json, as vLLM's `--generation-config` reads them,
and vLLM's `--override-generation-config` on top of them.

EngineConfig.generation_config says where they come from: "auto" (the default) the model folder's
generation_config.json, "vllm" nowhere (SamplingParams' own defaults), any other value that folder's
generation_config.json. Of the file, temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as
max_tokens) are taken, each one that is given and not null, whatever its value (vLLM with transformers 5, whose
GenerationConfig has no defaults of its own to leave out); do_sample and everything else are not read.
EngineConfig.override_generation_config (a dict; a JSON object on the command line) is applied on top, as vLLM's
get_diff_sampling_param does: its keys, the file's names, replace the file's values ("auto" or a folder) or are the
only ones ("vllm"); a null removes the file's value. A key other than those six is not read (vLLM ignores it
silently): a warning names it and it is dropped. A value SamplingParams refuses is a ValueError naming the key when
the config is built, before any engine process starts. check_override keeps the dict as a tuple of (key, value)
pairs, so that the frozen EngineConfig stays hashable and crosses to engine processes as msgpack.
LLM.get_default_sampling_params() builds a SamplingParams from them, LLM.generate / chat use it when given no
params, and the HTTP server fills each sampling field a request leaves out with them (a field it sets wins) and
caps max_tokens as vLLM's override_max_tokens does (max_tokens_cap).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from rapid.params import SamplingParams

logger = logging.getLogger(__name__)

FILE = "generation_config.json"
# the file's key -> the SamplingParams field it gives the default of (vLLM's list)
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
OVERRIDE = "override_generation_config"
# EngineArgs' help text of the two fields (here, beside the rules they describe)
GENERATION_CONFIG_HELP = (
    "default sampling parameters, as vLLM's: auto: those of the model folder's generation_config.json (temperature, "
    "top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens); vllm: none (SamplingParams' own); or a "
    "folder: its generation_config.json. A request's own values win")
OVERRIDE_HELP = (
    "default sampling parameters set on top of --generation-config, as vLLM's: a JSON object of generation_config.json "
    "keys (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), e.g. '{\"temperature\": 0.5}'; with "
    "auto or a folder its values replace the file's (null removes one), with vllm they are the only ones. Its "
    "max_new_tokens also caps every HTTP request's max_tokens, as in vLLM. Other keys are ignored, with a warning")


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


def read_eos_ids(folder: str | Path) -> list[int]:
    """The eos_token_id of the folder's generation_config.json as a list ([] when it gives none); ValueError naming
    the file for anything but a token id (an int >= 0) or a list of them."""
    eos = read_generation_config(folder).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{Path(folder).expanduser() / FILE}: eos_token_id must be a token id (an int >= 0) or a "
                         f"list of them, got {eos!r}")
    return ids


def _default(key: str, value: Any, where: Any) -> Any:
    """`value` of generation_config.json's `key` as SamplingParams holds it (a float temperature, top_k -1 as 0);
    ValueError naming `where`, the key and the value when SamplingParams refuses it."""
    field = FIELDS[key]
    try:
        return getattr(SamplingParams(**{field: value}), field)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {key} {value!r} is not a valid default: {e}") from None


def check_override(override: Any) -> tuple[tuple[str, Any], ...]:
    """EngineConfig.override_generation_config as the frozen config keeps it: ((key, value), ...) in FIELDS' order,
    each value as SamplingParams holds it or None (it removes the file's); () for None. It takes a dict, or such a
    tuple (a config rebuilt by dataclasses.replace or decoded from msgpack). Keys not in FIELDS are dropped with a
    warning (vLLM ignores them); ValueError quoting the value for anything else that is wrong."""
    if override is None:
        return ()
    try:
        given = dict(override) if isinstance(override, (Mapping, tuple)) else None
    except (TypeError, ValueError):
        given = None
    if given is None or not all(isinstance(k, str) for k in given):
        raise ValueError(f"{OVERRIDE} must be a dict of generation_config.json keys to values, such as "
                         f"{{'temperature': 0.5}}, got {override!r}")
    unknown = [k for k in given if k not in FIELDS]
    if unknown:
        named = [repr(k) + "".join(f" (did you mean {m!r}?)" for m in get_close_matches(k, FIELDS, n=1))
                 for k in unknown]
        logger.warning("%s: ignoring %s: only %s are read, as in vLLM", OVERRIDE, ", ".join(named), ", ".join(FIELDS))
    return tuple((k, None if given[k] is None else _default(k, given[k], OVERRIDE)) for k in FIELDS if k in given)


def read_sampling_defaults(generation_config: str, model: str,
                           override: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
    """{SamplingParams field: default} from the file `generation_config` names ({} for "vllm" or a file that
    gives none) with `override` (EngineConfig.override_generation_config) on top, logged once (a warning) when
    there are any; ValueError naming the file and the key for a value SamplingParams refuses."""
    folder, override = generation_config_folder(generation_config, model), dict(override)
    config = {} if folder is None else read_generation_config(folder)
    config.update(override)
    keys = [k for k in FIELDS if config.get(k) is not None]
    defaults = {FIELDS[k]: _default(k, config[k], OVERRIDE if k in override else folder / FILE) for k in keys}
    if defaults:  # a warning, as vLLM's: sampling changes for callers who pass no params
        by = [f"the model's {folder / FILE}"] if any(k not in override for k in keys) else []
        by += [OVERRIDE] if any(k in override for k in keys) else []
        left_out = "" if by == [OVERRIDE] else "the file's" if len(by) == 2 else "them"  # the override stays
        hint = f"; --generation-config vllm leaves {left_out} out" if left_out else ""
        cap = max_tokens_cap(generation_config, defaults, tuple(override.items()))
        wins = "a request's own values win" + (f", but the HTTP server caps its max_tokens at {cap}" if cap else "")
        logger.warning("default sampling parameters overridden by %s: %s (%s%s)", " and ".join(by),
                       ", ".join(f"{k}={v!r}" for k, v in defaults.items()), wins, hint)
    return defaults


def max_tokens_cap(generation_config: str, defaults: dict[str, Any],
                   override: tuple[tuple[str, Any], ...] = ()) -> int | None:
    """vLLM's override_max_tokens, the cap on every server request's max_tokens: with a generation config given as a
    folder, the defaults' max_tokens (its max_new_tokens, or the override's in its place); with "auto" or "vllm",
    the override's max_new_tokens alone (the model folder's file gives a default, not a cap). None: no cap."""
    if generation_config in ("auto", "vllm"):
        return dict(override).get("max_new_tokens")
    return defaults.get("max_tokens")
