import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import the `tiny` helpers

from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template, shared by the session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=3)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", seed=4, num_kv_heads=1)


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    """The default model (SmolLM2-135M-Instruct GGUF) converted once, into a session-wide temporary cache."""
    from rapid.model.default_model import default_model_path

    return default_model_path(cache_dir=tmp_path_factory.mktemp("rapid-cache"))
