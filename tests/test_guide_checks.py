"""The frontend's structured-output checks run in a process of their own, on idle cores only
(frontend/guide_checks.py): a check that costs seconds shares no GIL with the event loop, its ApiError
comes back whole, and a check process that dies is replaced."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from frontend.api import ApiError
from frontend.guide_checks import GuideChecks
from frontend.structured import response_format_guide

pytestmark = pytest.mark.timeout(120)


def _scheduling_policy() -> int:
    return os.sched_getscheduler(0)


def _die() -> None:
    os._exit(3)


async def _twice(checks: GuideChecks, check, *args):
    return await checks.run(check, *args), await checks.run(check, *args)


@pytest.fixture
def checks():
    checks = GuideChecks()
    yield checks
    checks.close()


@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_IDLE is Linux's")
def test_checks_run_in_another_process_on_idle_cores_only(checks):
    assert asyncio.run(checks.run(_scheduling_policy)) == os.SCHED_IDLE
    assert _scheduling_policy() != os.SCHED_IDLE  # the caller's own is left alone
    assert asyncio.run(checks.run(os.getpid)) != os.getpid()
    assert asyncio.run(checks.run(os.getpid, off_loop=False)) == os.getpid()  # no guide: inline


def test_a_refusal_comes_back_whole(checks):
    with pytest.raises(ApiError) as refused:
        asyncio.run(checks.run(response_format_guide, {"type": "json_schema", "json_schema": {"schema": 7}}))
    assert (refused.value.status, refused.value.field) == (400, "response_format.json_schema.schema")
    guide = asyncio.run(checks.run(response_format_guide, {"type": "json_object"}))
    assert guide == response_format_guide({"type": "json_object"})


def test_a_check_process_that_dies_is_replaced(checks):
    with pytest.raises(ApiError) as failed:
        asyncio.run(checks.run(_die))  # dies, is retried on a new process, dies again
    assert failed.value.status == 500 and "died" in failed.value.message
    first, second = asyncio.run(_twice(checks, os.getpid))
    assert first == second != os.getpid()  # a working process again, kept between checks
