"""The device copy bandwidth the bench's rooflines divide by, in a module that imports nothing but torch (the
GPU scripts that time kernels alone use it without the engine's imports)."""
from __future__ import annotations

import torch


def measure_copy_bandwidth_bytes_s(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written over the median time."""
    a = torch.empty(1 << 29, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); b.copy_(a); e.record(); e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (1 << 30) / sorted(times[2:])[len(times[2:]) // 2]
