"""EngineArgs on the command line: one --kebab-case flag per field, with its help text and default.

Plain argparse over the dataclass's fields (no torch, and nothing of rapid imported: rapid.config calls this). A
dict field takes a JSON object, as vLLM's do: --override-generation-config '{"temperature": 0.5}'.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import Field, fields
from typing import Any

GIVE_OBJECT = "give a JSON object such as '{\"key\": 1}'"


def add_engine_flags(args_cls: type, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """One --kebab-case flag per field of the dataclass `args_cls` (bools as --flag/--no-flag), with its help and
    default (`defaults` overrides a field's), in a group "engine arguments"; fields in `exclude` get none."""
    group = parser.add_argument_group("engine arguments")
    hints = typing.get_type_hints(args_cls)
    for f in fields(args_cls):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        flag, kind = "--" + f.name.replace("_", "-"), _scalar_type(hints[f.name])
        flags = (flag, f.metadata["alias"]) if "alias" in f.metadata else (flag,)  # vLLM's short forms: -tp, -pp
        if typing.get_origin(kind) is dict:  # given as a JSON object
            kind = json_object
        elif kind is int and f.metadata.get("human"):  # vLLM's 1k, 1K, 25.6k for token counts
            kind = human_int
        if kind is bool:
            action = group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default)
        else:
            name = {json_object: "JSON", human_int: "N"}.get(kind) or kind.__name__.upper()
            metavar = f.metadata.get("metavar", None if "choices" in f.metadata else name)
            action = group.add_argument(*flags, type=kind, default=default, choices=f.metadata.get("choices"),
                                        metavar=metavar)
        action.help = _cli_help(f, default)
    return parser


_MULTIPLIERS = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def human_int(text: str) -> int:
    """An int as vLLM's flags take it: 4096, 1k (1,000), 1K (1,024), 25.6k (25,600); binary multipliers (K, M, G)
    take whole numbers only."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _MULTIPLIERS else (text, "")
    try:
        value = float(number) * _MULTIPLIERS[unit] if unit else int(number)
    except ValueError:
        value = None
    if value is None or (unit.isupper() and not number.isdigit()) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens (4096, 1k = 1000, 1K = 1024, "
                                         "25.6k)")
    return int(value)


def json_object(text: str) -> dict[str, Any]:
    """The argparse type of a dict field: the JSON object `text` holds; an error saying what is wrong otherwise."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e}); {GIVE_OBJECT}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise argparse.ArgumentTypeError(f"{text!r} is {kind}, not a JSON object; {GIVE_OBJECT}")
    return value


def _scalar_type(hint: Any) -> type:
    """int for `int | None`, and so on."""
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return options[0]


def _cli_help(f: Field, default: Any) -> str:
    text = f.metadata["help"].replace("%", "%%")
    if f.metadata.get("gpu_only"):
        text += " (GPU only)"
    if default is not None:
        text += " (default: %(default)s)"
    elif "none" in f.metadata:
        text += f" (default: {f.metadata['none']})".replace("%", "%%")
    return text
