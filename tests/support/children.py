"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A `preexec_fn`: the child gets SIGTERM when its parent dies, even by SIGKILL (a
    test's timeout), so nothing it started is left running to load the machine.

    Linux ties this to the thread that started the child: use it only for children
    started from a thread that lives as long as they should (the main thread)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
