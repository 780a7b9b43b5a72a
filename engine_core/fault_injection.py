"""Faults on demand, for the reliability tests: `KILN_FAULT_INJECTION=step` makes every model step
of an engine raise after its warm-up, as a broken device or a corrupted model would. Unset (the
normal case) it changes nothing. It lives apart from the engine so the engine has no test hooks.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("kiln.engine")

ENV = "KILN_FAULT_INJECTION"


class InjectedFault(RuntimeError):
    pass


def inject_faults(engine) -> None:
    fault = os.environ.get(ENV, "")
    if not fault:
        return
    if fault != "step":
        raise ValueError(f"{ENV}={fault!r}: the only fault is 'step'")
    log.warning("%s=step: every model step of this engine will fail", ENV)

    def failing_forward(*args, **kwargs):
        raise InjectedFault("injected step failure")

    engine.runner.forward = failing_forward
