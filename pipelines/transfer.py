"""Host -> device copies that never block the host: pinned staging and ``non_blocking`` on CUDA.

A copy from pageable host memory to a GPU is synchronous for the host (the driver stages it through its own
pinned buffer and waits), so one per batch stalls the Python thread that should already be queueing the next
kernels. From pinned memory with ``non_blocking=True`` the copy is queued on the current stream like a kernel.
``pin_memory()`` takes its buffer from torch's caching host allocator, which hands a block out again only after
the copies that read it have completed, so the source may be dropped right after the call.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a CUDA device goes through pinned memory, non-blocking.

    On the CPU (or when ``t`` is already on a device) this is ``t.to(device)``: no pinning, no behaviour change.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)
