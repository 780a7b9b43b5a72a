"""Background work below the model step's priority, so that it takes what the step leaves.

A CPU step runs one OpenMP thread per core, and those threads meet at a barrier after every parallel
region: when another runnable task holds a core, the step's other thread waits for it, and on a 2-core
machine a 20-30 ms step stalled for 0.1-1.7 s beside a busy process (measured: a Python loop at nice 0,
a 2.8 s schema check; the thread policy, engine_core/thread_policy.py, then moves to one thread). Work
the engine or frontend starts itself runs at a lower priority: the grammar compiles at nice +10 (the
compile's timeout is wall-clock, so it must still get a share of a busy CPU), a frontend's schema checks
at SCHED_IDLE (they wait for an idle core; measured beside a stream: largest token gap 0.11 s, against
0.3-1.2 s at nice +10).

Tried and not kept: libgomp spinning longer between regions (GOMP_SPINCOUNT=1M): a low-priority process
beside a synthetic step stopped stalling it, but served streams still stalled, and the short workload was
3-5% slower (the spinning took the frontend's share of the cores).
"""

from __future__ import annotations

import os
import threading

BACKGROUND_NICENESS = 10  # added to a background thread's nice value


def lower_this_thread(niceness: int = BACKGROUND_NICENESS) -> None:
    """Lower the calling thread's priority (Linux threads have their own nice value; a pool's
    `initializer`). Where a thread cannot be reniced (not Linux, no permission) nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def idle_cores_only() -> None:
    """Run the calling thread only on a core that would otherwise idle (Linux SCHED_IDLE): for work that
    may take seconds of CPU and can wait, such as checking a client's large schema. Even at nice +10, a
    frontend's schema check process beside a 2-core step left 0.3-1.2 s token gaps; at SCHED_IDLE, 0.11 s
    at most. Elsewhere the lowest nice value instead."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    except (AttributeError, OSError):
        lower_this_thread(19)
