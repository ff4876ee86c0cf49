"""Ctrl-C during a step: held until the step is whole, or delivered where it can be undone.

A step changes θ and the state in passes whose bookkeeping (which buffer sits at which η) the
rollback relies on. Python delivers SIGINT at the first bytecode after a C call returns: right
after a pass has written and before it is recorded as written, where a rollback would miss it,
and the step retried after the interrupt (a notebook cell run again) would fold its gradient a
second time. So while a step moves θ, SIGINT is held and handed to the program's handler when
the step is whole (the default handler then raises ``KeyboardInterrupt`` from ``step()``, after
a completed step). With the default handler a SIGINT during a trial forward is delivered at
once: the ``KeyboardInterrupt`` is undone like any exception there, and a long forward stays
interruptible. Another handler (one that saves a checkpoint, say) always runs after the step.

The step installs its handler when θ starts moving and puts the program's back at its end
(two calls of the C function under ``signal.signal``, under a µs each: the ``signal`` module's
wrappers convert every handler to and from an enum by raising and catching exceptions, 3 µs a
call, and a GPU step waits for its host): nothing changes outside a step, so code that looks at
the installed handler (``asyncio.run``, a notebook kernel re-installing its own before each
cell) sees the program's. Only the main thread receives signals, and only a Python handler is
held (SIG_IGN / SIG_DFL are left alone).
"""

from __future__ import annotations

import signal
import threading

try:  # the C functions ``signal.signal`` / ``signal.getsignal`` wrap (CPython)
    from _signal import getsignal as _getsignal
    from _signal import signal as _setsignal
except ImportError:  # pragma: no cover - another interpreter: the wrappers themselves
    _getsignal, _setsignal = signal.getsignal, signal.signal

from ..linesearch.trial import in_trial_here


class HeldInterrupts:
    """SIGINT held from :meth:`begin` to :meth:`release` (see the module docstring)."""

    def __init__(self):
        self.handler = None  # the program's handler: it gets the signal, now or later
        self.pending = None

    @classmethod
    def begin(cls) -> HeldInterrupts | None:
        """Start holding SIGINT; None where nothing can be held (not the main thread, no
        Python handler)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        old = _getsignal(signal.SIGINT)
        if not callable(old):  # SIG_IGN, SIG_DFL, or a handler set from C (None): left alone
            return None
        held = cls()
        try:
            _setsignal(signal.SIGINT, held._receive)
        except (ValueError, OSError):  # a subinterpreter, or signals unavailable
            return None
        held.handler = old
        return held

    def _receive(self, signum, frame) -> None:
        # (this thread's trial: another thread's one does not make a pass of ours cuttable)
        if in_trial_here() and self.handler is signal.default_int_handler:
            self.handler(signum, frame)  # KeyboardInterrupt in a trial: undone by the step
        else:
            self.pending = (signum, frame)

    def release(self) -> None:
        """Put the program's handler back and give it a signal that came meanwhile (the
        default one raises ``KeyboardInterrupt`` here, after the step)."""
        _setsignal(signal.SIGINT, self.handler)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.handler(*pending)
