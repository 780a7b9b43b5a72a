"""The block pool and the prefix index in-process: sharing, copy-free reuse, eviction order, refcounts;
and the scheduler's use of them (hits, salts, waiting for a prefix in flight, preemption)."""

from __future__ import annotations

import pytest

from engine_core.block_pool import BlockPool, hash_block
from engine_core.scheduler import Scheduler
from ipc.messages import Request, SamplingParams

BS = 4
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


def chain(tokens: list[int], salt: str | None = None) -> list[bytes]:
    keys, parent = [], None
    for i in range(0, len(tokens) - len(tokens) % BS, BS):
        parent = hash_block(parent, tokens[i : i + BS], salt)
        keys.append(parent)
    return keys


def test_keys_chain_the_whole_prefix_and_the_salt():
    a, b = chain([1, 2, 3, 4, 5, 6, 7, 8]), chain([9, 2, 3, 4, 5, 6, 7, 8])
    assert a[1] != b[1]  # same second block, different first: different keys
    assert chain([1, 2, 3, 4], "alice") != chain([1, 2, 3, 4], "bob") != chain([1, 2, 3, 4])


def test_shared_blocks_are_counted_and_freed_blocks_stay_cached_until_evicted():
    pool = BlockPool(4, BS)
    keys = chain(list(range(8)))
    first = pool.allocate(2)
    for block, key in zip(first, keys):
        pool.register(block, key)
    assert pool.lookup(keys) == first
    pool.take(first)  # a second holder: copy-free reuse of the same blocks
    assert [pool.refs[b] for b in first] == [2, 2] and pool.num_free == 2
    pool.release(first)
    pool.release(first)
    pool.check()
    assert pool.num_free == 4 and pool.lookup(keys) == first  # free, still cached
    fresh = pool.allocate(2)  # the never-used blocks go first
    assert set(fresh).isdisjoint(first) and pool.lookup(keys) == first
    pool.release(fresh)  # uncached blocks go back to the head: reused before any cached block
    assert pool.allocate(2) == fresh
    pool.check()


def test_eviction_is_least_recently_used_and_a_sequence_tail_goes_first():
    pool = BlockPool(4, BS)
    old, new = pool.allocate(2), pool.allocate(2)
    for blocks, tokens in ((old, range(8)), (new, range(100, 108))):
        for block, key in zip(blocks, chain(list(tokens))):
            pool.register(block, key)
    pool.release(old)
    pool.release(new)
    evicted = pool.allocate(1)
    assert evicted == [old[1]]  # the older sequence's tail block
    assert pool.lookup(chain(list(range(8)))) == [old[0]]  # its head is still a hit
    assert pool.lookup(chain(list(range(100, 108)))) == new
    assert pool.evictions == 1
    assert pool.allocate(4) is None  # only 3 are free: nothing taken
    pool.check()


def test_a_released_block_more_often_than_taken_is_an_error():
    pool = BlockPool(2, BS)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(AssertionError):
        pool.release(blocks)


def test_a_key_computed_twice_keeps_the_first_block():
    pool = BlockPool(4, BS)
    (key,) = chain([1, 2, 3, 4])
    a, b = pool.allocate(1), pool.allocate(1)
    pool.register(a[0], key)
    pool.register(b[0], key)  # the same prefix computed at the same time by another request
    assert pool.lookup([key]) == a and pool.num_cached == 1
    pool.check()


def run(sched: Scheduler, token: int = 7) -> None:
    while len(sched):
        chunks = sched.schedule()
        sched.update(chunks, [token] * sum(c.sample for c in chunks))
        sched.pool.check()


def scheduler(blocks: int = 64, caching: bool = True, max_batch: int = 8, chunk: int = 64) -> Scheduler:
    return Scheduler(max_batch, chunk, blocks * BS, set(), BlockPool(blocks, BS, caching))


def test_a_repeated_prompt_computes_only_its_last_partial_block():
    sched = scheduler()
    prompt = list(range(1, 31))  # 7 full blocks + 2 tokens
    sched.add(Request("a", prompt, GREEDY))
    run(sched)
    sched.add(Request("b", prompt, GREEDY))
    (chunk,) = sched.schedule()
    assert (chunk.start, chunk.length) == (28, 2)  # 7 blocks reused, copy-free
    assert sched.counters.hits == 28 and sched.counters.queries == 60
    run(sched)
    assert sched.pool.num_used == 0


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = scheduler()
    prompt = list(range(1, 33))  # exactly 8 blocks
    sched.add(Request("a", prompt, GREEDY))
    run(sched)
    sched.add(Request("b", prompt, GREEDY))
    (chunk,) = sched.schedule()
    assert chunk.start == 28 and chunk.length == 4 and chunk.sample  # its logits are the next token's


def test_different_salts_never_share_a_block():
    sched = scheduler()
    prompt = list(range(1, 40))
    sched.add(Request("a", prompt, GREEDY, cache_salt="alice"))
    run(sched)
    sched.add(Request("b", prompt, GREEDY, cache_salt="bob"))
    sched.add(Request("c", prompt, GREEDY))
    chunks = sched.schedule()
    assert [c.start for c in chunks] == [0, 0] and sched.counters.hits == 0
    run(sched)
    sched.add(Request("d", prompt, GREEDY, cache_salt="alice"))
    (chunk,) = sched.schedule()
    assert chunk.start == 36


def test_prompt_logprobs_requests_compute_every_position():
    sched = scheduler()
    prompt = list(range(1, 30))
    sched.add(Request("a", prompt, GREEDY))
    run(sched)
    sched.add(Request("b", prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=0)))
    (chunk,) = sched.schedule()
    assert chunk.start == 0 and chunk.scores_prompt


def test_no_prefix_caching_means_no_hits_and_no_cached_blocks():
    sched = scheduler(caching=False)
    prompt = list(range(1, 30))
    for name in "ab":
        sched.add(Request(name, prompt, GREEDY))
        run(sched)
    assert sched.counters.hits == 0 and sched.pool.num_cached == 0


def test_requests_wait_for_a_prefix_being_computed_instead_of_computing_it_again():
    sched = scheduler(chunk=8)
    prefix = list(range(1, 25))  # 6 blocks, 3 steps of 8 tokens
    for i in range(3):
        sched.add(Request(f"r{i}", prefix + [100 + i, 200 + i], GREEDY))
    first = sched.schedule()
    assert [c.seq.request_id for c in first] == ["r0"]  # the others' next block is in flight
    run(sched)
    assert sched.counters.hits == 2 * 24  # r1 and r2 took the whole prefix from r0


def test_preemption_frees_the_newest_and_it_resumes_without_losing_tokens():
    sched = scheduler(blocks=8, chunk=64)  # 32 tokens for everyone
    for i in range(3):
        sched.add(Request(f"r{i}", list(range(10 * i + 1, 10 * i + 9)), SamplingParams(max_new_tokens=12)))
    outputs = {}
    while len(sched):
        chunks = sched.schedule()
        finished = sched.update(chunks, [5] * sum(c.sample for c in chunks))
        sched.pool.check()
        assert sched.pool.num_used <= 8
        for seq in finished:
            outputs[seq.request_id] = list(seq.output_ids)
    assert sched.counters.preemptions > 0
    assert outputs == {f"r{i}": [5] * 12 for i in range(3)}
    assert sched.pool.num_used == 0


def test_the_cpu_pool_hands_its_pages_back_after_warm_up():
    import torch

    from engine_core.kv_cache import KVCache

    cache = KVCache(layers=2, num_blocks=64, block_size=BS, kv_heads=2, head_dim=512, dtype=torch.float32, device="cpu")
    cache.k[1][5].fill_(3.0)
    cache.drop_contents()
    assert cache.k[1][5].abs().sum() == 0  # the pages read as zeros again (no stale or NaN values)
    cache.v[0][7].fill_(1.0)  # and the pool stays writable
    assert cache.v[0][7].sum() == BS * 2 * 512
