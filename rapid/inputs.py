"""Prompt shapes with vLLM's names (vllm.inputs): a TextPrompt or a TokensPrompt dict, or a plain str."""

from __future__ import annotations

from typing import NotRequired, TypedDict

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the engine's tokenizer."""

    prompt: str


class TokensPrompt(TypedDict):
    """A prompt given as token ids; `prompt` (optional) is only echoed back in RequestOutput.prompt."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt
