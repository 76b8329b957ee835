"""The model half: config forms, weight loading and its errors, logits equal to transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rapid.attention.metadata import AttentionMetadata, kv_pool_shape
from rapid.attention.reference import ReferenceAttention
from rapid.model.config import ModelConfig
from rapid.model.loader import build_model
from tiny import make_tiny_model

CASES = [
    ("llama", {}),
    ("llama", {"tie": True, "num_kv_heads": 4}),  # tied embeddings, MHA
    ("llama3", {"num_kv_heads": 1}),  # llama3 rope scaling, MQA
    ("mistral", {"head_dim": 32}),  # head_dim != hidden / heads
    ("qwen2", {"tie": True}),  # qkv bias
    ("qwen3", {}),  # q/k norm
]


def run_chunks(model, ids: torch.Tensor, chunks: list[tuple[int, int]], block_size=16):
    """Run one sequence through the model in the given chunks; return logits for every position."""
    cfg = model.config
    nb = (len(ids) + block_size - 1) // block_size
    table = list(range(3, 3 + nb))  # non-trivial block ids
    pool = torch.zeros(kv_pool_shape(cfg.num_layers, 3 + nb, block_size, cfg.num_kv_heads, cfg.head_dim))
    outs = []
    for s, e in chunks:
        pos = torch.arange(s, e)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(s, e)])
        meta = AttentionMetadata(slots, torch.tensor([0, e - s], dtype=torch.int32), torch.tensor([e], dtype=torch.int32),
                                 torch.tensor([table], dtype=torch.int32), num_decodes=1 if e - s == 1 else 0, max_seq_len=e)
        outs.append(model.compute_logits(model(ids[s:e], pos, pool, meta)))
    return torch.cat(outs)


def load(folder):
    cfg = ModelConfig.from_folder(folder)
    backend = ReferenceAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    return build_model(folder, backend, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(k)}" for a, k in CASES])
def test_logits_match_transformers_with_chunks(tmp_path, arch, kw):
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path, arch, with_tokenizer=False, **kw)
    ours = load(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, 300, (41,), generator=torch.Generator().manual_seed(1))
    ref = hf(ids[None]).logits[0]
    # whole prompt, three uneven chunks, and prefill + single-token decode steps
    for chunks in ([(0, 41)], [(0, 7), (7, 30), (30, 41)], [(0, 38), (38, 39), (39, 40), (40, 41)]):
        got = run_chunks(ours, ids, chunks)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_sharded_checkpoint_and_bf16(tmp_path):
    folder = make_tiny_model(tmp_path, "llama", shards=3, with_tokenizer=False)
    assert (folder / "model.safetensors.index.json").is_file()
    cfg = ModelConfig.from_folder(folder)
    backend = ReferenceAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    model = build_model(folder, backend, torch.bfloat16, torch.device("cpu"))
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ref = load(folder)
    ids = torch.arange(20)
    a = run_chunks(model, ids, [(0, 20)])
    b = run_chunks(ref, ids, [(0, 20)])
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_config_transformers4_and_5_forms():
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    v4 = ModelConfig.from_dict({**base, "rope_theta": 500000.0,
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    v5 = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192}})
    assert v4.rope == v5.rope and v4.rope.rope_type == "llama3" and v4.rope.theta == 500000.0
    assert v4.head_dim == 16  # derived when head_dim is absent


@pytest.mark.parametrize("patch,field", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_rejects_unsupported(patch, field):
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**base, **patch})


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_folder(tmp_path)
    folder = make_tiny_model(tmp_path / "m", "llama", with_tokenizer=False)
    weights = load_file(folder / "model.safetensors")
    # misshapen tensor
    bad = dict(weights)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(bad, folder / "model.safetensors")
    with pytest.raises(ValueError, match="q_proj.weight.*shape"):
        load(folder)
    # missing tensor
    bad = {k: v for k, v in weights.items() if "layers.1.mlp.down_proj" not in k}
    save_file(bad, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*down_proj"):
        load(folder)
    # unexpected tensor
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected.*extra"):
        load(folder)
    # unreadable file
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load(folder)
    # config that does not match the weights
    save_file(weights, folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load(folder)
