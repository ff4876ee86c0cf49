"""Trial forwards that are comparable with the training forward and leave no trace.

A trial evaluates the loss at a trial point on the same mini-batch. To compare it with f(θ0) it
must see the same randomness (dropout masks), and to leave training unchanged it must not advance
the global RNG, update BatchNorm running statistics, build an autograd graph, run a backward pass
or zero the gradient the search still needs. :class:`TrialEnv` arranges all of that:

* RNG: every trial starts from ``rng_before`` (the state the training forward started from, when
  the optimizer called the closure itself or the caller recorded it with ``capture_rng``); after
  the step the RNG is set to ``rng_after``, the state it had when the step began its trials, so
  the steps that follow draw the same numbers whether or not trials ran.
* Buffers: the persistent buffers of the registered modules (BatchNorm statistics, counters) are
  copied before the trials and restored after them. Non-persistent buffers are treated as caches;
  if a trial modifies one anyway, a warning names it.
* Autograd: trials run under ``torch.no_grad()``; ``Tensor.backward``, ``torch.autograd.backward``
  and ``zero_grad`` of modules and optimizers are no-ops inside a trial, so a closure that does
  ``zero_grad(); loss.backward()`` (LBFGS / Lightning style) costs a forward only.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn


def capture_rng():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_rng(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


_depth = 0


def in_trial() -> bool:
    """True inside a trial forward (our own ``zero_grad`` checks it: it overrides the patch)."""
    return _depth > 0


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def backward_suppressed():
    global _depth
    saved = (
        torch.Tensor.backward,
        torch.autograd.backward,
        nn.Module.zero_grad,
        torch.optim.Optimizer.zero_grad,
    )
    torch.Tensor.backward = _noop
    torch.autograd.backward = _noop
    nn.Module.zero_grad = _noop
    torch.optim.Optimizer.zero_grad = _noop
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        (
            torch.Tensor.backward,
            torch.autograd.backward,
            nn.Module.zero_grad,
            torch.optim.Optimizer.zero_grad,
        ) = saved


class TrialEnv:
    def __init__(self, modules=(), rng_before=None):
        self.rng_before = rng_before if rng_before is not None else capture_rng()
        self.rng_after = capture_rng()
        self._saved = []
        self._caches = []
        for module in modules:
            for m in module.modules():
                for name, buf in m._buffers.items():
                    if buf is None:
                        continue
                    if name in m._non_persistent_buffers_set:
                        self._caches.append((m, name, buf, buf._version))
                    else:
                        self._saved.append((buf, buf.detach().clone()))
        self.used = False

    @contextlib.contextmanager
    def trial(self):
        self.used = True
        restore_rng(self.rng_before)
        with torch.no_grad(), backward_suppressed():
            yield

    def close(self) -> None:
        """Restore buffers and RNG; call once, after the last trial (also on failure)."""
        if not self.used:
            return
        with torch.no_grad():
            for buf, copy in self._saved:
                buf.copy_(copy)
        for m, name, buf, version in self._caches:
            if buf._version != version:
                warnings.warn(
                    f"a trial forward modified the non-persistent buffer {name!r} of "
                    f"{type(m).__name__}; armijo_fused does not restore non-persistent buffers",
                    stacklevel=3,
                )
        restore_rng(self.rng_after)
