"""Ctrl-C and SIGTERM that always stop a command in order, wherever they land.

Python's default Ctrl-C raises ``KeyboardInterrupt`` at whatever line is running. Some
lines cannot take it: raised inside a garbage-collector callback (JAX registers one) or a
``__del__`` it is printed as "Exception ignored" and lost, so the run goes on and exits 0;
raised inside ``__set_name__`` (Python <= 3.11) it becomes a ``RuntimeError`` with a long
traceback. Library imports and model building are long stretches of such code.

:func:`guard` (installed by the CLI around each command) replaces the handler. A signal
that lands where raising is safe raises :class:`Interrupted` at once. One that lands in a
gc callback, ``__del__``, ``__set_name__``, a library import or a :func:`deferred`
section (model building) is only recorded; :func:`checkpoint` raises it at the next safe
point (the end of the section, every :class:`~pipeline.progress.Progress` update, the end
of the command); outside a deferred section it is also delivered again every
``REDELIVER_AFTER`` seconds until it lands where it can be raised. A second Ctrl-C inside
a deferred section or an import stops at once.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = [
    "Interrupted",
    "Terminated",
    "checkpoint",
    "deferred",
    "guard",
    "install_sigterm",
    "restore_sigterm",
]

# Seconds after which a signal recorded outside a deferred section is delivered again.
REDELIVER_AFTER = 0.05


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the command stops in order; exit status 130.

    A ``KeyboardInterrupt``, so ``except Exception`` blocks let it through. The message,
    when given, is the one line the CLI prints (what was kept, how to resume).
    """

    exit_code = 130
    signal_name = "Ctrl-C"

    def __init__(self, message: str = "", exit_code: int | None = None) -> None:
        super().__init__(*([message] if message else []))
        if exit_code is not None:
            self.exit_code = exit_code


class Terminated(Interrupted):
    """SIGTERM, turned into the same orderly stop as Ctrl-C; exit status 143."""

    exit_code = 143
    signal_name = "SIGTERM"


@dataclass
class _State:
    pending: type[Interrupted] | None = None  # a signal recorded, to raise at a checkpoint
    depth: int = 0  # nesting of deferred() sections
    guards: int = 0  # nesting of guard()
    closing: bool = False  # guard() is putting the previous handler back
    redelivering: bool = False  # the next handler call is our own re-delivery
    noticed: bool = False  # the "stopping at the next safe point" line was written
    timer: threading.Timer | None = None


_state = _State()
_lock = threading.Lock()  # between the re-delivery timer and guard()'s exit
# Frames where an exception is swallowed or rewrapped: never raise inside them.
_UNSAFE_NAMES = frozenset({"__del__", "__set_name__"})
_FINALIZE_CODE = weakref.finalize.__call__.__code__


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _where(frame: FrameType | None) -> str | None:
    """``"unsafe"`` (an exception would be lost), ``"import"``, or None (safe to raise)."""
    unsafe = {getattr(cb, "__code__", None) for cb in gc.callbacks} | {_FINALIZE_CODE}
    importing = False
    while frame is not None:
        code = frame.f_code
        if code in unsafe or code.co_name in _UNSAFE_NAMES:
            return "unsafe"
        if code.co_filename.startswith("<frozen importlib"):
            importing = True
        frame = frame.f_back
    return "import" if importing else None


def _notice(kind: type[Interrupted]) -> None:
    """Say once that the signal was heard (os.write: safe inside a handler)."""
    if _state.noticed:
        return
    _state.noticed = True
    text = f"{kind.signal_name}: stopping at the next safe point (Ctrl-C again to stop now)\n"
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _redeliver(signum: int) -> None:
    with _lock:
        if _state.pending is None or _state.closing or signal.getsignal(signum) is not _on_signal:
            return
        _state.redelivering = True
        # A real signal, to the main thread: it also wakes a blocking wait there.
        signal.pthread_kill(threading.main_thread().ident, signum)


def _schedule_redelivery(signum: int) -> None:
    if _state.timer is not None:
        _state.timer.cancel()
    _state.timer = threading.Timer(REDELIVER_AFTER, _redeliver, (signum,))
    _state.timer.daemon = True
    _state.timer.start()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The SIGINT / SIGTERM handler: raise where safe, else record for a checkpoint."""
    kind = Terminated if signum == signal.SIGTERM else Interrupted
    redelivered, _state.redelivering = _state.redelivering, False
    if _state.closing:
        if not redelivered:
            _state.pending = _state.pending or kind
        return
    where = _where(frame)
    waiting = where == "import" or _state.depth
    if where == "unsafe" or (waiting and (redelivered or _state.pending is None)):
        if where != "unsafe":
            _notice(kind)
        _state.pending = _state.pending or kind
        if not _state.depth:  # no section end will raise it: try again in a moment
            _schedule_redelivery(signum)
        return
    _state.pending = None
    raise kind()


def checkpoint() -> None:
    """Raise the signal recorded where it could not be raised, if any.

    Called at safe points: between batches, after building a model. Does nothing inside
    a :func:`deferred` section or outside the main thread.

    Raises:
        Interrupted: Ctrl-C (or :class:`Terminated`: SIGTERM) was recorded.
    """
    if _state.pending is None or _state.depth or not _in_main_thread():
        return
    kind, _state.pending = _state.pending, None
    raise kind()


@contextmanager
def deferred() -> Iterator[None]:
    """A section that Ctrl-C does not cut in two (model building); it stops at its end.

    Raises:
        Interrupted: on leaving the section, when Ctrl-C or SIGTERM came during it.
    """
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    checkpoint()


@contextmanager
def guard() -> Iterator[None]:
    """Handle Ctrl-C as described in the module docstring for the body (main thread only).

    A SIGINT that is ignored (a background job of a shell) stays ignored. Nested guards
    share the outermost one. The previous handler is put back on leaving.

    Raises:
        Interrupted: Ctrl-C during the body, at once or at the next checkpoint.
    """
    previous = signal.getsignal(signal.SIGINT)
    if _state.guards or not _in_main_thread() or previous in (signal.SIG_IGN, None):
        _state.guards += 1
        try:
            yield
        finally:
            _state.guards -= 1
        return
    _reset()
    _state.guards = 1
    signal.signal(signal.SIGINT, _on_signal)
    try:
        yield
        checkpoint()
    finally:
        with _lock:
            _state.closing = True
            if _state.timer is not None:
                _state.timer.cancel()
        # signal.signal runs a handler call already due first; while closing it only records.
        signal.signal(signal.SIGINT, previous)
        late = _state.pending
        _state.guards = 0
        _reset()
    if late is not None:  # Ctrl-C while finishing
        raise late()


def _reset() -> None:
    """Forget signals and the timer (``depth`` belongs to the open deferred sections)."""
    if _state.timer is not None:
        _state.timer.cancel()
    fresh = _State(depth=_state.depth, guards=_state.guards)
    for name in vars(fresh):
        setattr(_state, name, getattr(fresh, name))


def install_sigterm() -> Any:
    """Make SIGTERM stop like Ctrl-C (main thread only: signal handlers live there).

    Returns:
        The previous handler, for :func:`restore_sigterm` (None outside the main thread).
    """
    if not _in_main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_signal)


def restore_sigterm(previous: Any) -> None:
    """Put back the SIGTERM handler :func:`install_sigterm` replaced."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
