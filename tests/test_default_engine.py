"""The bundled default model through our engine: it knows Paris, and its greedy tokens equal transformers'."""

import pytest
import torch

from rapid import LLM, SamplingParams

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_answers_paris_and_matches_transformers(converted, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr("rapid.model.default_model.default_model_path", lambda cache_dir=None: converted)
    params = SamplingParams(temperature=0, max_tokens=24)
    with LLM(max_model_len=1024) as llm:  # no model given: the bundled default
        assert llm.config.model == str(converted)
        out = llm.chat(QUESTION, params, use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ref = hf.generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=24, do_sample=False)[0, len(out.prompt_token_ids):]
    assert out.outputs[0].token_ids == ref.tolist()
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>, as transformers did
