"""Programmatic dependent launch (PDL) for the engine's Triton kernels.

A kernel launched as a programmatic dependent may start while the kernel before it on the stream is still running:
its launch and set-up overlap that kernel's last programs, and its `gdc_wait()` (its first statement, under the
kernel's GDC constexpr) holds it until that kernel has finished and its writes are visible. Hopper (compute
capability 9.0) and later; CUDA graphs keep the dependency. The attention backend decides per device
(TritonAttention.pdl); off, the kernels launch and run exactly as without it.
"""

from __future__ import annotations

import torch


def pdl_supported(device: torch.device) -> bool:
    """PDL needs a CUDA device of compute capability 9.0 or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch(pdl: bool) -> dict:
    """Triton launch keywords: launch_pdl only when on (the CPU interpreter takes no such keyword)."""
    return {"launch_pdl": True} if pdl else {}
