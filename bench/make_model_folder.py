"""Write a Hugging Face model folder (config.json only) at real shapes, for `--load-format dummy` runs.

    python bench/make_model_folder.py llama-3.1-8b /tmp/llama8b
"""

import json
import sys
from pathlib import Path

SHAPES = {
    # Llama-3.1-8B's config.json (transformers 4 form), as published by Meta.
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16",
    ),
    # A few-MB shape for CPU dry runs of bench/gpu_session.sh's stages (SHAPE=tiny).
    "tiny": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    ),
}

if __name__ == "__main__":
    name, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    print(out)
