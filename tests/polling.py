"""Waiting for a condition in end-to-end tests: generous deadlines, never a fixed sleep."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` every 0.2 s until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
