"""Host-to-device copies that never make the host wait for the GPU."""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A list (or CPU tensor) on `device`. On CUDA the values are staged in pinned memory from the caching host
    allocator (which keeps the block until the copy has read it) and copied non_blocking: a plain `.to(device)`
    from pageable memory synchronises the stream, stalling the one-step-ahead loop at every prefill."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
