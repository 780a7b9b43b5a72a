"""Background work runs below the model step's priority (hardware/cpu_sharing.py): the grammar worker and the
frontend's schema checks (tests/test_guide_checks.py). At the same priority, a check that took a core
stalled a 2-core machine's step."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from engine_core.guided import GuideCompiler
from hardware.cpu_sharing import BACKGROUND_NICENESS, lower_this_thread

LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")


def _this_thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _lowered(before: int) -> int:
    return min(before + BACKGROUND_NICENESS, 19)


@LINUX_ONLY
def test_lowering_a_thread_leaves_the_others():
    seen = []
    worker = threading.Thread(target=lambda: (lower_this_thread(), seen.append(_this_thread_nice())))
    before = _this_thread_nice()
    worker.start()
    worker.join(timeout=10)
    assert seen == [_lowered(before)]
    assert _this_thread_nice() == before


@LINUX_ONLY
def test_the_grammar_worker_runs_below_the_engine_loop():
    compiler = GuideCompiler(load_tokenizer=_this_thread_nice)  # the worker's first job, at the first ask
    try:
        assert compiler.tokenizer().result(timeout=10) == _lowered(_this_thread_nice())
    finally:
        compiler.close()
