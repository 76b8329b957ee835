"""RAPID: an LLM serving engine that runs prefill and decode concurrently on one GPU."""

from rapid.inputs import TextPrompt, TokensPrompt
from rapid.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from rapid.params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams


def __getattr__(name):
    # LLM pulls in torch and transformers: import it lazily so `import rapid` stays cheap.
    if name == "LLM":
        from rapid.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams", "RequestOutput",
           "CompletionOutput", "RequestMetrics", "Logprob", "TextPrompt", "TokensPrompt"]
