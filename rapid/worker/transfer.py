"""Host lists to device tensors without waiting for the device.

A copy from pageable host memory waits for the work already queued on the stream, which would make the
decode executor's next step wait for the one in flight; staging through pinned memory keeps the copy
asynchronous (torch's pinned-memory cache keeps the buffer alive until the copy is done).
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device` (values: a list, or a host tensor of that dtype), copied without a
    host-device synchronisation."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
