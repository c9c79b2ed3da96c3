"""Crash injection for tests: die exactly as `kill -9` would, at a chosen point of a loop."""

from __future__ import annotations

import os
import signal

ENV = "JAXCLEAN_KILL_AT"


def kill_point(loop: str, count: int) -> None:
    """SIGKILLs this process when JAXCLEAN_KILL_AT == "<loop>:<count>".

    No cleanup runs and background writes (Orbax's asynchronous saves) may be caught half
    done, so a test that reruns afterwards sees what a real crash leaves behind.
    """
    if os.environ.get(ENV) == f"{loop}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
