"""`ziya-batch bench` on a card made to look smaller: a ballast allocation first, so the engine's KV cache is the
size it would be on a card of --card-gib GiB (e.g. 79.1 for an H100 80GB) with the same gpu_memory_fraction.
Bandwidth and compute stay this card's; the run shows the batch sizes and the share of the roofline that the
smaller card's cache allows. Any other argument goes to the bench as it is.

Usage (GPU): PYTHONPATH=. python3 scripts/gpu/card_like.py --card-gib 79.1 --only engine,roofline [...]"""
from __future__ import annotations

import sys

import torch

from ziya_batch.tools import bench
from ziya_batch.tools.bench import BENCH_ENGINE


def ballast(card_gib: float) -> torch.Tensor:
    """An allocation that leaves the bench's engine the KV cache of a card with `card_gib` GiB in all; keep it
    alive while the engine is built."""
    target = card_gib * 2**30
    free, total = torch.cuda.mem_get_info()
    frac = BENCH_ENGINE.gpu_memory_fraction
    # budget = free - (1 - frac) * total - reserve: a ballast of frac * (total - target) leaves the budget of a
    # card with `target` bytes in all
    ballast_b = int(frac * (total - target))
    print(f"card of {total / 2**30:.1f} GiB made to look like {target / 2**30:.1f} GiB: "
          f"ballast {ballast_b / 2**30:.1f} GiB", flush=True)
    return torch.empty(ballast_b, dtype=torch.uint8, device="cuda")


def main() -> None:
    args = sys.argv[1:]
    i = args.index("--card-gib")
    weight = ballast(float(args[i + 1]))
    del args[i:i + 2]
    bench.main(args)
    del weight


if __name__ == "__main__":
    main()
