"""The engine's CPU thread choice follows measured step times (times injected; torch's count restored)."""

from __future__ import annotations

import pytest
import torch

from engine_core.thread_policy import ThreadTuner


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_steps(tuner: ThreadTuner, tokens: int, seconds_for: dict[int, float], steps: int) -> list[int]:
    chosen = []
    for _ in range(steps):
        threads = tuner.choose(tokens)
        tuner.record(tokens, threads, seconds_for[threads])
        chosen.append(threads)
    return chosen


def test_tries_every_candidate_then_keeps_the_fastest():
    torch.set_num_threads(1)
    tuner = ThreadTuner([1, 2], explore_every=8)
    chosen = run_steps(tuner, 10, {1: 0.045, 2: 0.031}, 16)
    assert sorted(chosen[:2]) == [1, 2]  # both counts measured first
    assert chosen[8:].count(2) >= 7
    assert tuner.choose(10) == 2 and torch.get_num_threads() == 2


def test_a_busy_core_moves_the_choice_to_one_thread():
    tuner = ThreadTuner([1, 2], explore_every=4)
    run_steps(tuner, 10, {1: 0.045, 2: 0.031}, 12)
    # another process takes a core: two threads now wait on each other at every barrier
    chosen = run_steps(tuner, 10, {1: 0.046, 2: 0.160}, 24)
    assert chosen[-8:].count(1) >= 6  # two threads only for an occasional try
    # and the core is free again: the next try notices (tries back off while they lose, so allow time)
    chosen = run_steps(tuner, 10, {1: 0.045, 2: 0.031}, 200)
    assert chosen[-8:].count(2) >= 6


def test_step_sizes_are_tuned_separately():
    tuner = ThreadTuner([1, 2], explore_every=4)
    run_steps(tuner, 1, {1: 0.027, 2: 0.029}, 12)  # one decode token: one thread is as fast
    run_steps(tuner, 256, {1: 0.300, 2: 0.170}, 12)  # a prompt chunk: two threads win
    assert tuner.choose(1) == 1 and tuner.choose(256) == 2
    assert set(tuner.describe()) == {"<=1 tokens", "<=511 tokens"}


def test_timed_records_the_real_step():
    tuner = ThreadTuner([1], explore_every=8)
    with tuner.timed(4) as step:
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert step.threads == 1 and tuner.average[(tuner.bucket(4), 1)] > 0


def test_a_new_step_size_starts_from_what_the_last_comparison_found():
    tuner = ThreadTuner([1, 2], explore_every=8)
    run_steps(tuner, 10, {1: 0.045, 2: 1.6}, 40)  # a busy core: two threads stall
    assert tuner.choose(3) == 1  # no stalled try for the new size right away


def test_a_size_measured_only_idle_tries_the_newly_preferred_count_at_once():
    """Prompt chunks measured at two threads while the machine was idle; then a core gets busy and the
    decode size finds one thread faster: the chunk size must not keep stalling until its own next try."""
    tuner = ThreadTuner([1, 2], explore_every=32)
    run_steps(tuner, 10, {1: 0.045, 2: 0.031}, 4)  # idle: two threads win at decode
    run_steps(tuner, 100, {1: 0.200, 2: 0.090}, 1)  # a prompt chunk, at two threads only
    run_steps(tuner, 10, {1: 0.046, 2: 1.6}, 40)  # a core gets busy: one thread wins at decode
    assert tuner.preferred == 1
    assert run_steps(tuner, 100, {1: 0.210, 2: 1.5}, 3) == [1, 1, 1]


def test_one_stalled_step_moves_every_size_to_the_other_count():
    """The first steps after a core gets busy are usually prompt chunks timed idle at two threads: one such
    step taking many times its average must be the last, not the first of many."""
    tuner = ThreadTuner([1, 2], explore_every=32)
    run_steps(tuner, 10, {1: 0.045, 2: 0.031}, 4)
    run_steps(tuner, 100, {1: 0.200, 2: 0.090}, 4)
    assert tuner.choose(100) == 2
    tuner.record(100, 2, 1.5)  # a core got busy mid-step
    assert tuner.choose(100) == 1 and tuner.choose(10) == 1 and tuner.choose(3) == 1


def test_tries_that_stall_are_made_rarely():
    """A two-thread step stalled by a busy core costs a second: trying it every 32 steps would double
    the average step, so such tries back off (up to 1024 steps apart) while they keep losing."""
    tuner = ThreadTuner([1, 2], explore_every=32)
    chosen = run_steps(tuner, 10, {1: 0.045, 2: 1.6}, 2000)
    tries = chosen[2:].count(2)
    assert 2 <= tries <= 8  # 32, 64, ... 1024 steps apart instead of 62 tries
    assert tuner.interval[tuner.bucket(10)] >= 512
