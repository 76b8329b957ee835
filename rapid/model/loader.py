"""Load Hugging Face safetensors checkpoints straight into LlamaModel parameters."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from rapid.model.config import ModelConfig
from rapid.model.llama import LlamaModel, RotaryEmbedding

logger = logging.getLogger(__name__)

# checkpoint projection -> (fused parameter, shard index); shards are stacked along dim 0.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: the index's shards, or every *.safetensors in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: malformed index ({e!r}); expected a 'weight_map' object") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights in the model folder")
    return files


def _shard_slices(cfg: ModelConfig, fused: str) -> list[tuple[int, int]]:
    if fused == "qkv_proj":
        q, kv = cfg.q_size, cfg.kv_size
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
    i = cfg.intermediate_size
    return [(0, i), (i, 2 * i)]


def _target(name: str, cfg: ModelConfig) -> tuple[str, tuple[int, int] | None]:
    """Checkpoint name -> (our parameter name, row slice inside a fused parameter or None)."""
    if name.startswith("model."):
        name = name[len("model.") :]
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _FUSED:
            fused, shard = _FUSED[part]
            parts[i] = fused
            return ".".join(parts), _shard_slices(cfg, fused)[shard]
    return ".".join(parts), None


def load_weights(model: LlamaModel, folder: str | Path) -> None:
    """Copy every tensor of the checkpoint into the model (casting to its dtype); names are checked."""
    folder = Path(folder)
    cfg = model.config
    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}  # rows written per parameter
    unexpected: list[str] = []
    for file in safetensors_files(folder):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{file}: cannot read safetensors file ({e})") from e
        with handle as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                target, rows = _target(name, cfg)
                if target == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                param = params.get(target)
                if param is None:
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                dest = param.data if rows is None else param.data[rows[0] : rows[1]]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects "
                        f"{tuple(dest.shape)} (check config.json against the weights)"
                    )
                dest.copy_(tensor)
                filled[target] += dest.shape[0]
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensors for {cfg.architecture}: {unexpected[:10]}")
    missing = [name for name, rows in filled.items() if rows != params[name].shape[0]]
    if missing:
        raise ValueError(f"{folder}: tensors missing from the checkpoint: {missing[:10]}")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU and bfloat16 on the GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "half": torch.float16}
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: 'auto', {sorted(names)}")
    return names[dtype]


def parameter_specs(cfg: ModelConfig, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every parameter, in a fixed order: the layout of a shared weight arena."""
    with torch.device("meta"):
        model = LlamaModel(cfg, backend=None)
    return [(name, tuple(p.shape), dtype) for name, p in model.named_parameters()]


def init_dummy_weights(model: LlamaModel, seed: int = 0) -> None:
    """Random weights at the real shapes (vLLM's load_format='dummy'): for benchmarks, no checkpoint needed."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def build_model(folder: str | Path, backend, dtype: torch.dtype, device: torch.device,
                max_positions: int | None = None, param_views: dict[str, torch.Tensor] | None = None,
                load: bool = True, load_format: str = "safetensors") -> LlamaModel:
    """Model from a Hugging Face folder, on `device` in `dtype`.

    param_views: tensors (e.g. views of a shared arena) that become the parameters instead of fresh
    allocations; with load=False they are used as they are (an importer mapping the owner's weights).
    """
    cfg = ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = LlamaModel(cfg, backend, max_positions)
    if param_views is None:
        model = model.to_empty(device=device).to(dtype)
    else:
        for name, _ in list(model.named_parameters()):
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._parameters[attr] = torch.nn.Parameter(param_views[name], requires_grad=False)
    # The rope table was built on meta: build it for real, in float32.
    model.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions or cfg.max_position_embeddings).to(device)
    if load and load_format == "dummy":
        init_dummy_weights(model)
        logger.info("random (dummy) weights for %s: %.1fM parameters, %s", cfg.architecture, cfg.num_params() / 1e6, dtype)
    elif load:
        load_weights(model, folder)
        logger.info("loaded %s (%.1fM parameters, %s) from %s", cfg.architecture, cfg.num_params() / 1e6, dtype, folder)
    model.eval().requires_grad_(False)
    return model
