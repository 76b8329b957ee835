"""Where a model comes from: a local Hugging Face folder, or the bundled default. No torch here."""

from __future__ import annotations

from pathlib import Path


def resolve_model_path(model: str | Path | None) -> str:
    """A model folder; None means the bundled default (SmolLM2-135M-Instruct, converted once)."""
    if model is None:
        from rapid.model.default_model import default_model_path

        return str(default_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(model)!r} is not a local folder; give a Hugging Face model folder (config.json + "
            "*.safetensors + tokenizer files) or no model for the bundled default"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    return str(path)
