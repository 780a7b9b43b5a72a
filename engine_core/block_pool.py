"""The KV block pool: fixed-size blocks shared by every sequence, reference-counted, with a prefix index.

A sequence holds a list of block ids (its block table) and takes blocks as it grows. A *full* block
is keyed by a hash chain over the token ids up to its end (and the request's cache salt), so two
requests whose prompts start with the same tokens map those blocks to the same key: the second takes
the first's blocks by reference instead of computing them again (automatic prefix caching, as in
vLLM v1 and SGLang). A block whose last holder finishes keeps its key and contents and goes to the
tail of the free queue; allocation takes from the head, so cached blocks are evicted least recently
used, and only when the pool needs them. Blocks that hold nothing reusable go to the head, so they are
reused first (their pages are already committed: a fresh block of the CPU mmap costs RSS).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], salt: str | None = None) -> BlockHash:
    """The key of a full block: its tokens chained to the key of the block before it (so equal keys mean
    equal prefixes, not just equal blocks). The first block of a salted request starts its chain from the
    salt, so blocks are shared only among requests with the same salt. SHA-256, not Python's hash: a
    client must not be able to craft a collision that reads another request's K/V."""
    h = hashlib.sha256(parent if parent is not None else b"kiln" + (salt or "").encode("utf-8", "surrogatepass"))
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """`num_blocks` blocks: which are free (and in which eviction order), how many holders each has,
    and which full blocks are cached under which prefix key."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs blocks: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.refs = [0] * num_blocks
        self.keys: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = next to reuse
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks with no holder (cached or not): what allocation can take."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def lookup(self, keys: Sequence[BlockHash]) -> list[int]:
        """Blocks of the longest cached prefix of `keys` (nothing is taken yet)."""
        if not self.caching:
            return []
        hits = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def free_among(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` (cache hits) have no holder: taking them shrinks the free count."""
        return sum(1 for b in blocks if self.refs[b] == 0)

    def take(self, blocks: Sequence[int]) -> None:
        """Hold cached blocks (a prefix hit): copy-free reuse, one more reference each."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks for one holder, evicting the least recently used cached ones; None (and nothing
        taken) when fewer are free."""
        if count > len(self.free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            key = self.keys[block]
            if key is not None:  # evicted: its prefix is no longer cached
                del self.cached[key]
                self.keys[block] = None
                self.evictions += 1
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block of a sequence. Last blocks first, so among one sequence's
        cached blocks its tail is evicted before its head (the head is the prefix others share)."""
        for block in reversed(blocks):
            refs = self.refs[block] - 1
            if refs < 0:
                raise AssertionError(f"block {block} released more often than taken")
            self.refs[block] = refs
            if refs == 0:
                self.free[block] = None
                if self.keys[block] is None:
                    self.free.move_to_end(block, last=False)

    def register(self, block: int, key: BlockHash) -> None:
        """Key a block its holder has just filled, so later requests can find it. A key cached already
        (another request computed the same prefix at the same time) keeps its block; this one stays
        uncached and returns to the pool when its holder is done."""
        if self.caching and key not in self.cached and self.keys[block] is None:
            self.cached[key] = block
            self.keys[block] = key

    def clear_cache(self) -> None:
        """Forget every cached prefix (after warm-up, whose dummy prompts are nobody's prefix)."""
        for block in self.cached.values():
            self.keys[block] = None
            if self.refs[block] == 0:
                self.free.move_to_end(block, last=False)
        self.cached.clear()

    def check(self) -> None:
        """Invariants (tests): refcounts never negative, free exactly the blocks nobody holds, keys and
        the index agree."""
        assert all(r >= 0 for r in self.refs), "negative refcount"
        assert set(self.free) == {b for b, r in enumerate(self.refs) if r == 0}, "free list disagrees with refs"
        assert all(self.keys[b] == k for k, b in self.cached.items()), "index points at a block with another key"
        assert sum(k is not None for k in self.keys) == len(self.cached), "a keyed block is not in the index"
