"""The KV cache storage: one pool of fixed-size blocks per layer, shared by all sequences.

Layout per layer: [blocks, block_size, kv_heads, head_dim], token-major inside a block, so a token's
K (all heads) is one contiguous row of the flat view [blocks × block_size, kv_heads, head_dim] that
new tokens are written into, and a sequence's keys are its blocks gathered in table order: a copy of
whole blocks (a memcpy each), viewed as [kv_heads, positions, head_dim] for attention without another
copy. Which sequence holds which block is the scheduler's business (engine_core/block_pool.py).
"""

from __future__ import annotations

import math
import mmap

import torch


class KVCache:
    """K and V for `num_blocks` blocks of `block_size` positions per layer, allocated once.

    On CPU the pool is one anonymous mmap: the kernel hands out zeroed 4 KiB pages on first
    write, so the plan's whole budget is reserved but RAM is committed only as blocks are first
    filled (numpy/torch zeros would touch it all). Zeroed matters: masked positions are multiplied by
    0 in attention, and NaN garbage would leak in (a reused block holds another sequence's finite K/V).
    """

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (2, layers, num_blocks, block_size, kv_heads, head_dim)
        if torch.device(device).type == "cpu":
            itemsize = torch.empty((), dtype=dtype).element_size()
            private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(
                mmap, "MAP_ANONYMOUS", 0
            )  # (Python's default is shared)
            size = math.prod(shape) * itemsize
            self._buffer = mmap.mmap(-1, size, flags=private) if private else mmap.mmap(-1, size)
            pool = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
        else:
            pool = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(pool[0]), list(pool[1])

    def drop_contents(self) -> None:
        """Hand the CPU pool's pages back to the OS (they read as zeros again): after warm-up, whose dummy
        sequences touched blocks nobody will read, so an idle engine holds no KV memory. No-op on a GPU."""
        buffer = getattr(self, "_buffer", None)
        if buffer is not None and hasattr(mmap, "MADV_DONTNEED"):
            buffer.madvise(mmap.MADV_DONTNEED)
