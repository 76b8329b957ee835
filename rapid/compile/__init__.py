"""CUDA graphs for decode steps and torch.compile for the non-attention work (see cuda_graphs.py)."""

from rapid.compile.cuda_graphs import DecodeGraphRunner, bucket_sizes, compile_prefill, uncompile

__all__ = ["DecodeGraphRunner", "bucket_sizes", "compile_prefill", "uncompile"]
