"""What zps asks of the operating system for its processes: to die with their parent, a name for ps and top, and
an end for a whole process group. Standard library only and no other zps import, so anything may use it: the
launcher, the remote guard on every host, the zygote and the lab's tools that start jobs."""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["die_with_parent", "kill_group", "set_process_name"]

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def die_with_parent(sig: int) -> None:
    """Ask the kernel for ``sig`` when this process's parent exits (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except OSError:
            pass


def set_process_name(name: str) -> None:
    """Name this process for ps and top (``/proc/PID/comm``; Linux keeps 15 bytes; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
        except OSError:
            pass


def kill_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pgid``; a group that is gone, or not ours, is left alone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
