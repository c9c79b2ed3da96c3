"""Fault injection for tests: die, be interrupted, or find the disk full at a chosen point.

JAXCLEAN_KILL_AT="<loop>:<count>"   at that point of a loop, send this process a signal:
JAXCLEAN_KILL_SIGNAL=KILL|INT|TERM  SIGKILL (default, as `kill -9`: no cleanup, background
                                    writes caught half done), SIGINT (Ctrl-C) or SIGTERM
JAXCLEAN_DISK_FULL="<text>"         the first write to a path containing <text> fails with
                                    ENOSPC, as a full disk would
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "JAXCLEAN_KILL_AT"
SIGNAL_ENV = "JAXCLEAN_KILL_SIGNAL"
DISK_FULL_ENV = "JAXCLEAN_DISK_FULL"


def kill_point(loop: str, count: int) -> None:
    """Signals this process when JAXCLEAN_KILL_AT == "<loop>:<count>"."""
    if os.environ.get(ENV) == f"{loop}:{count}":
        name = os.environ.get(SIGNAL_ENV, "KILL")
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def disk_full_point(path: str) -> None:
    """Raises ENOSPC for `path` when it contains JAXCLEAN_DISK_FULL (once per process)."""
    text = os.environ.get(DISK_FULL_ENV)
    if text and text in path:
        del os.environ[DISK_FULL_ENV]  # Once: what was written before stays written.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
