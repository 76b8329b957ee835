"""The tokenizer files of a converted GGUF model: tokenizer.json, its config and chat template.

:func:`save_tokenizer` reads the tokenizer out of a GGUF file with transformers' GGUF support
and saves it as ``tokenizer.json``, ``tokenizer_config.json`` (holding the chat template) and
``special_tokens_map.json``; :func:`write_json` is the JSON writer every converted file uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["save_tokenizer", "write_json"]


def save_tokenizer(gguf_path: Path, out_dir: Path, config: dict[str, Any]) -> None:
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
    write_json(config_path, tok_config)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if v is not None}
    write_json(out_dir / "special_tokens_map.json", specials)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
