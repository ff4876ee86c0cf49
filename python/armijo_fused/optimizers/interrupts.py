"""Ctrl-C during a step: held until the step is whole, or delivered where it can be undone.

A step changes θ and the state in passes whose bookkeeping (which buffer sits at which η) the
rollback relies on. Python delivers SIGINT at the first bytecode after a C call returns: right
after a pass has written and before it is recorded as written, where a rollback would miss it,
and the step retried after the interrupt (a notebook cell run again) would fold its gradient a
second time. So while a step moves θ, SIGINT is held and delivered when the step is whole
(``KeyboardInterrupt`` raised by ``step()`` after a completed step), except inside a trial
forward, where it is delivered at once: an exception there is undone like any other, and a
long forward stays interruptible.

Only the main thread receives signals, and only a Python handler can be held (SIG_IGN / SIG_DFL
are left alone). Cost: two ``signal.signal`` calls per step (a few µs).
"""

from __future__ import annotations

import signal
import threading

from ..linesearch.trial import in_trial


class HeldInterrupts:
    """SIGINT held from :meth:`begin` to :meth:`release` (see the module docstring)."""

    def __init__(self, handler):
        self.handler = handler  # the handler that was installed: it gets the signal later
        self.pending = None

    @classmethod
    def begin(cls) -> HeldInterrupts | None:
        """Start holding SIGINT; None where nothing can be held (not the main thread, no
        Python handler)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        held = cls(None)
        try:
            old = signal.signal(signal.SIGINT, held._receive)
        except (ValueError, OSError):  # a subinterpreter, or signals unavailable
            return None
        if not callable(old):
            signal.signal(signal.SIGINT, old)
            return None
        held.handler = old
        return held

    def _receive(self, signum, frame) -> None:
        if in_trial():
            self.handler(signum, frame)  # default: KeyboardInterrupt, undone by the step
        else:
            self.pending = (signum, frame)

    def release(self) -> None:
        """Put the handler back and give it a signal that arrived meanwhile (the default one
        raises KeyboardInterrupt here, after the step)."""
        signal.signal(signal.SIGINT, self.handler)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.handler(*pending)
