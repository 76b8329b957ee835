"""Tiny random Hugging Face models, saved as real model folders (config.json + safetensors + tokenizer), and
what the engine tests check leaks with: this test's own child processes and one engine's /dev/shm segments."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "héllo wörld, 世界 你好 🎉 emoji and ünïcode text.",
    "def main():\n    return 42\n",
    "Serving engines batch many requests; prefill and decode share one GPU.",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCH_CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "llama3": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0,
    ),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False),
}


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    folder: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    tie: bool = False,
    vocab_size: int = 320,
    max_position_embeddings: int = 512,
    shards: int = 1,
    with_tokenizer: bool = True,
) -> Path:
    """Save a random model of `arch` (a key of ARCH_CONFIGS) as a Hugging Face folder and return it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    extra = dict(ARCH_CONFIGS[arch])
    model_type = extra.pop("model_type")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-5,
        **extra,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Larger-than-default weights make logits spread out, so greedy ties are unlikely.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    shard_size = None if shards == 1 else f"{max(1, model.num_parameters() * 4 // shards // 1000)}KB"
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
    if with_tokenizer:
        build_tokenizer().save_pretrained(folder)
    return folder


def hf_greedy(folder: str | Path, prompt_ids: list[int], max_new_tokens: int,
              kv_dtype: torch.dtype | None = None) -> list[int]:
    """Transformers' greedy continuation of one prompt (the oracle). With kv_dtype (float8 or bf16), every key and value
    attention reads is first rounded to it, saturated, as an engine with kv_cache_dtype fp8 stores them."""
    from transformers import AutoModelForCausalLM

    extra = {}
    if kv_dtype is not None:
        extra["attn_implementation"] = _rounded_kv_attention(kv_dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    model.generation_config.pad_token_id = 1
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, min_new_tokens=max_new_tokens, pad_token_id=1,
    )
    return out[0, len(prompt_ids):].tolist()


def _rounded_kv_attention(kv_dtype: torch.dtype) -> str:
    """A transformers attention function (registered under a name, which is returned) that rounds keys and values
    to kv_dtype (saturating), then runs transformers' eager attention: rounding is idempotent, so rounding the
    whole cache at every step equals storing rounded values once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    limit = torch.finfo(kv_dtype).max

    def rounded(x):
        return x.clamp(-limit, limit).to(kv_dtype).to(x.dtype)

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        return eager_attention_forward(module, query, rounded(key), rounded(value), attention_mask, scaling,
                                       dropout, **kwargs)

    name = f"rapid_kv_{str(kv_dtype).removeprefix('torch.')}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)  # the causal mask eager attention takes (else: none)
    return name


# ---------------------------------------------------------------------- leaks of one engine, not of a neighbour's
def children(exclude=frozenset()) -> list:
    """Live child processes of this test process, other than `exclude` (another engine's)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in exclude and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def engine_pids(llm) -> dict[str, int]:
    """The processes of a multi-process engine (mode 'rapid' or 'disagg'), by role."""
    return {c.name: c.process.pid for c in llm.engine.children}


def shm_of(pids, names=()) -> set[str]:
    """/dev/shm segments still there that these processes created (the CPU arena is named rapid_{owner pid}_...),
    or that are named in `names` (an engine's `shm_names`)."""
    prefixes = tuple(f"rapid_{pid}_" for pid in pids)
    return {n for n in os.listdir("/dev/shm") if n in set(names) or (prefixes and n.startswith(prefixes))}


def wait_until(cond, timeout: float, step: float = 0.02) -> bool:
    """Poll `cond` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()
