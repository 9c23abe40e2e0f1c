"""The paged KV cache: a pool of fixed-size blocks with reference counts (the CPU bookkeeping, no torch), and
the device tensors that hold the blocks' keys and values.

Samples of one prompt (n > 1) share the prompt's blocks by reference count; the first write into a shared,
partly filled last block copies it first (copy-on-write), so a sample never sees another's tokens. With
prefix caching, requests share every full block of a common prompt prefix the same way (see BlockPool)."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional

import torch

from ziya_batch.engine.types import KV_CACHE_DTYPES   # written once, in types.py; exported from here as before


class OutOfBlocks(Exception):
    """Raised by BlockPool.allocate when the pool is empty; the scheduler checks first, so this is a bug."""


def hash_block(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: its tokens and (through the parent's key) every token before it, so the same
    tokens after a different prefix get another key. 128-bit blake2b, not hash(): a collision would silently
    hand one prompt another's keys and values."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Blocks with reference counts and, for automatic prefix caching, a key (hash_block) per full block.

    Free blocks wait in one queue, taken from the front: blocks without a key first (most recently freed
    first, as a stack), then keyed ones in least-recently-freed order. A keyed free block keeps its contents
    and stays findable by its key (cached) until allocate() takes it for new use (evicts it); a block in use
    (ref count > 0) is never evicted. Without caching no block gets a key, and the pool is a plain stack."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))   # low ids first
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[Optional[bytes]] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}          # key -> the block holding it (in use or free)
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        """Blocks allocate() can hand out: unused ones and cached ones no sequence holds."""
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free KV blocks")
        b, _ = self._free.popitem(last=False)
        key = self.block_keys[b]
        if key is not None:                          # evict: its contents are about to be overwritten
            del self.cached[key]
            self.block_keys[b] = None
            self.num_evicted += 1
        self.ref_counts[b] = 1
        return b

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:              # a cached free block found by its key: in use again
            assert self.block_keys[block] is not None, f"block {block} is not allocated"
            del self._free[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None
            if self.block_keys[block] is None:
                self._free.move_to_end(block, last=False)    # nothing worth keeping: reused first

    def cache(self, block: int, key: bytes) -> None:
        """Makes the computed full block findable by key. If another block already holds that key (both were
        computed side by side), that one stays the cached copy and this one stays private."""
        if self.block_keys[block] is None and key not in self.cached:
            self.cached[key] = block
            self.block_keys[block] = key

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of keys (chained keys: a miss ends the prefix)."""
        hits = []
        for key in keys:
            b = self.cached.get(key)
            if b is None:
                break
            hits.append(b)
        return hits


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
