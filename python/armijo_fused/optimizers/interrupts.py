"""Ctrl-C during a step: held until the step is whole, or delivered where it can be undone.

A step changes θ and the state in passes whose bookkeeping (which buffer sits at which η) the
rollback relies on. Python delivers SIGINT at the first bytecode after a C call returns: right
after a pass has written and before it is recorded as written, where a rollback would miss it,
and the step retried after the interrupt (a notebook cell run again) would fold its gradient a
second time. So while a step moves θ, SIGINT is held and delivered when the step is whole
(``KeyboardInterrupt`` raised by ``step()`` after a completed step), except inside a trial
forward, where it is delivered at once: an exception there is undone like any other, and a
long forward stays interruptible.

How: the first step on the main thread wraps the SIGINT handler it finds (if it is a Python
callable; SIG_IGN / SIG_DFL are left alone) in :func:`_on_sigint`, once per process. Outside a
step the wrapper hands every signal straight to the wrapped handler, so the program behaves as
before; a step only sets a counter (installing a handler per step cost 2 ``signal.signal``
calls, about 28 µs of a 200 µs step on a CPU). A handler installed later by the program replaces
the wrapper, and steps then simply hold nothing.
"""

from __future__ import annotations

import signal
import threading

from ..linesearch.trial import in_trial

_wrapped = None  # the handler the wrapper hands signals to (None: not installed)
_tried = False  # installing is attempted once per process
_holding = 0  # steps on the main thread that are moving θ now
_pending = None  # (signum, frame) of a SIGINT that came while holding


def _on_sigint(signum, frame) -> None:
    global _pending
    if _holding and not in_trial():
        _pending = (signum, frame)
    else:
        _wrapped(signum, frame)


def _install() -> None:
    global _wrapped, _tried
    _tried = True
    try:
        current = signal.getsignal(signal.SIGINT)
        if callable(current):
            signal.signal(signal.SIGINT, _on_sigint)
            _wrapped = current
    except (ValueError, OSError):  # a subinterpreter, or signals unavailable
        pass


def hold() -> bool:
    """Start holding SIGINT (the step is about to move θ); False where nothing is held: not the
    main thread, or no Python handler to wrap."""
    global _holding
    if threading.current_thread() is not threading.main_thread():
        return False
    if not _tried:
        _install()
    if _wrapped is None:
        return False
    _holding += 1
    return True


def release() -> None:
    """Stop holding; a SIGINT that came meanwhile goes to the wrapped handler now (the default
    one raises ``KeyboardInterrupt`` here, after the step)."""
    global _holding, _pending
    _holding -= 1
    if _holding == 0 and _pending is not None:
        pending, _pending = _pending, None
        _wrapped(*pending)
