"""Loading the tokenizer of a model folder (Hugging Face tokenizers; no torch)."""

from __future__ import annotations


def load_tokenizer(path: str | None):
    """The folder's tokenizer, or None for token ids in and out."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
