"""The paged KV cache: a pool of fixed-size blocks with reference counts (the CPU bookkeeping, no torch), and
the device tensors that hold the blocks' keys and values.

Samples of one prompt (n > 1) share the prompt's blocks by reference count; the first write into a shared,
partly filled last block copies it first (copy-on-write), so a sample never sees another's tokens."""
from __future__ import annotations

import torch


class OutOfBlocks(Exception):
    """Raised by BlockPool.allocate when the pool is empty; the scheduler checks first, so this is a bug."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))   # a stack: low ids first, for readable tests
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free KV blocks")
        b = self._free.pop()
        self.ref_counts[b] = 1
        return b

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is not allocated"
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)


KV_CACHE_DTYPES = ("auto", "fp8")


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type: the model's ("auto"), or float8 e4m3 ("fp8": half the bytes of float16, so
    twice the tokens in the same memory and half the bytes a decode step reads; values are stored unscaled,
    e4m3 holds +-448 with 3 mantissa bits)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}")


def as_storage(t: torch.Tensor) -> torch.Tensor:
    """A view that index_copy_/index_select accept for every cache dtype (float8 as its raw bytes)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_from_memory(device: torch.device, bytes_per_block: int, memory_fraction: float,
                           reserve_bytes: int) -> int:
    """Blocks that fit in what is left on the GPU after the weights (already loaded) and a reserve for
    activations, logits and CUDA graphs, keeping total use under memory_fraction of the card."""
    torch.cuda.empty_cache()                      # cached but unused blocks count as free
    free, total = torch.cuda.mem_get_info(device)
    budget = free - (1.0 - memory_fraction) * total - reserve_bytes
    return max(int(budget // bytes_per_block), 0)


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v): [num_blocks + 1, block_size, kv_heads, head_dim]. The extra last block is scratch:
    padded rows of a CUDA-graph batch write there, so no real block is touched."""
    shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: block dst becomes a copy of block src in every layer."""
    if not copies:
        return
    dev = kv_caches[0][0].device
    src = torch.tensor([s for s, _ in copies], device=dev)
    dst = torch.tensor([d for _, d in copies], device=dev)
    for k, v in kv_caches:
        for t in (as_storage(k), as_storage(v)):
            t.index_copy_(0, dst, t.index_select(0, src))
