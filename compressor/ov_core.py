"""One OpenVINO ``Core`` for the whole process, and a guard for the signal stack around code that
makes Cores of its own (NNCF).

Why: OpenVINO's CPU plugin (2025 and later, ``SigAltStackSetup``) gives the calling thread an
alternate signal stack of its own when a Core creates the plugin, and on the plugin's destruction
puts back the stack it found, then unmaps its own. Two Cores destroyed in the order they were made
(first the first) leave the thread's signal stack pointing at unmapped memory; the next signal
Python handles on that thread (a child's SIGCHLD while a DataLoader waits, say) then kills the
process with a segmentation fault and no traceback. The test suite died so, in a test that loaded
two OpenVINO engines. A Core made once and never destroyed creates the plugin once; Cores made by
libraries (NNCF compiles through ``ov.Core()`` of its own) are fenced by :func:`kept_signal_stack`.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from contextlib import contextmanager
from typing import Any, Iterator


@functools.lru_cache(maxsize=None)
def core() -> Any:
    """The process's OpenVINO Core (created on first use, never destroyed)."""
    import openvino as ov

    return ov.Core()


class _Stack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.lru_cache(maxsize=None)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to ask
        return None


def signal_stack() -> tuple[int, int, int] | None:
    """The calling thread's alternate signal stack as (address, flags, size); None off Linux."""
    libc = _libc()
    if libc is None:
        return None
    now = _Stack()
    if libc.sigaltstack(None, ctypes.byref(now)) != 0:
        return None
    return int(now.ss_sp or 0), int(now.ss_flags), int(now.ss_size)


def _set_signal_stack(stack: tuple[int, int, int]) -> None:
    libc = _libc()
    if libc is None:
        return
    addr, flags, size = stack
    want = _Stack(ctypes.c_void_p(addr), flags & 2, size)  # SS_DISABLE (2) is the only flag one may set
    libc.sigaltstack(ctypes.byref(want), None)


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Runs the block, then gives the thread back the signal stack it had before, so that Cores the
    block made and dropped (in any order) cannot leave it on a stack they unmapped."""
    core()  # the process's plugin first: later plugins restore to its (lasting) stack
    before = signal_stack()
    try:
        yield
    finally:
        import gc

        gc.collect()  # the block's Cores and compiled models go now, while we still fence
        if before is not None and signal_stack() != before:
            _set_signal_stack(before)
