"""RAPID: an LLM serving engine that runs prefill and decode concurrently on one GPU."""

from rapid.outputs import CompletionOutput, RequestMetrics, RequestOutput
from rapid.params import SamplingParams


def __getattr__(name):
    # LLM pulls in torch and transformers: import it lazily so `import rapid` stays cheap.
    if name == "LLM":
        from rapid.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics"]
