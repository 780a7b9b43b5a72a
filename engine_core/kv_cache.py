"""The KV cache: one slot per running sequence, each a full context window, allocated once."""

from __future__ import annotations

import math
import mmap

import torch


class KVCache:
    """K and V for `slots` sequences × `context` positions per layer, allocated once.

    On CPU the pool is one anonymous mmap: the kernel hands out zeroed 4 KiB pages on first
    write, so the plan's whole budget is reserved but RAM is committed only as sequences fill
    their slots (numpy/torch zeros would touch it all, or take 2 MiB huge pages per write).
    Zeroed matters: masked positions are multiplied by 0, and stale NaN garbage would leak in.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, context: int, head_dim: int, dtype, device):
        shape = (2, layers, slots, kv_heads, context, head_dim)
        if torch.device(device).type == "cpu":
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._buffer = mmap.mmap(-1, math.prod(shape) * itemsize)
            pool = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
        else:
            pool = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(pool[0]), list(pool[1])
