"""What ``step()`` is handed and by whom: the loss a closure returns (a tensor, a number, a dict
or an HF ``ModelOutput``), a ``GradScaler`` calling ``step(opt, closure)``, a
``ZeroRedundancyOptimizer`` constructing the optimizer, and the user's frame for warnings."""

from __future__ import annotations

import functools
import numbers
import os
import sys
from collections.abc import Mapping

import torch
from torch import Tensor


def outside_stacklevel(also: tuple = ()) -> int:
    """The ``stacklevel`` of a warning raised inside the optimizer (a step, its construction,
    ``add_param_group``) that points at the user's line:
    the first frame outside this package and torch (the optimizer hooks and the compiler's
    ``disable`` wrapper sit between the two, in numbers that vary with torch's version).
    ``also``: the names of frameworks whose frames are passed over too (an integration's
    warning, raised from inside ``Trainer.train()``, points at that call)."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
              os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
              *(os.path.dirname(os.path.abspath(sys.modules[name].__file__)) + os.sep
                for name in also if getattr(sys.modules.get(name), "__file__", None)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def calling_grad_scaler(opt):
    """The enabled ``torch.amp.GradScaler`` whose ``step(opt, ...)`` called this step, if one
    did. GradScaler unscales the gradients that exist before it calls ``step``; a closure
    passed positionally (GradScaler refuses only the keyword; accelerate's optimizer wrapper
    passes it so) then recomputes them scaled, and the step must unscale those itself."""
    frame = sys._getframe(2)
    for _ in range(12):  # GradScaler.step -> _maybe_opt_step -> torch's hooks -> step
        if frame is None:
            return None
        # f_locals only of GradScaler's own frames: on Python <= 3.12 reading it leaves a
        # snapshot on the frame that would keep a training loop's deleted tensors alive
        if frame.f_code.co_name in ("step", "_maybe_opt_step") and \
                frame.f_code.co_filename.endswith("grad_scaler.py"):
            scaler = frame.f_locals.get("self")
            caller = frame.f_locals.get("optimizer")
            # (or a wrapper that shares our groups: Lookahead-style optimizers)
            if isinstance(scaler, torch.amp.GradScaler) and (
                    caller is opt or getattr(caller, "param_groups", None) is opt.param_groups):
                return scaler if scaler.is_enabled() else None
        frame = frame.f_back
    return None


def called_from_compiled_code(depth: int) -> bool:
    """Was ``step()`` called from a ``torch.compile``'d function (a compiled training step)?
    ``step`` is wrapped in ``torch.compiler.disable``, whose wrapper switches dynamo off for the
    call and keeps the callback it found in its local ``prior``: dynamo's own when the caller
    runs compiled code, None from eager code (torch 2.4 to 2.13). Every such wrapper in the
    ``depth`` frames above the caller is looked at: a helper of the user's, itself disabled, may
    stand between the compiled function and the step (a subclass's own disabled ``step`` too)."""
    if getattr(getattr(getattr(torch, "_dynamo", None), "config", None), "disable", False):
        return False  # (TORCH_COMPILE_DISABLE: torch.compile compiles nothing)
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        # (f_locals of the wrappers' frames alone: they hold the calls' arguments, alive anyway)
        if frame.f_code.co_name == "_fn" and frame.f_code.co_filename.endswith(
                os.path.join("_dynamo", "eval_frame.py")) and \
                frame.f_locals.get("prior") is not None:
            return True
        frame = frame.f_back
    return False


def lightning_training_closure(closure) -> bool:
    """Is ``closure`` Lightning's automatic-optimization closure (``training_step`` and
    backward of the last micro-batch), as its precision plugin hands it to ``step``: a
    ``partial(_wrap_closure, model, optimizer, closure)`` around the loop's ``Closure``?
    Manual optimization wraps the user's own closure the same way, which is not one."""
    if not isinstance(closure, functools.partial) or not closure.args:
        return False
    if getattr(closure.func, "__name__", None) != "_wrap_closure":
        return False
    inner = type(closure.args[-1])
    return inner.__name__ == "Closure" and inner.__module__.startswith(
        ("lightning.", "pytorch_lightning."))


def _structured_loss(value):
    """The loss inside what a closure returned, when that is a structure: a dict or an HF
    ``ModelOutput`` with ``loss``, an object with a tensor ``.loss``, or a tuple whose first
    entry is the loss (HF's ``return_dict=False``) and the only scalar; else None. A 0-dim
    loss competes only with 0-dim tensors: the predictions of a batch of one, shape (1, 1),
    are no second loss (a run stopped at an epoch's last batch of one)."""
    if isinstance(value, Mapping):
        return value.get("loss")
    if isinstance(value, tuple):
        if not value:
            return None
        first = value[0]
        loss_like = ((lambda v: v.dim() == 0) if isinstance(first, Tensor) and first.dim() == 0
                     else (lambda v: v.numel() == 1))
        scalars = [v for v in value if isinstance(v, Tensor) and loss_like(v)]
        if len(scalars) > 1:  # (loss_a, loss_b): which one the gradient belongs to is a guess
            raise TypeError(
                f"the closure returned a tuple of {len(scalars)} scalar tensors; return the "
                "loss the gradient belongs to (or a dict with 'loss')")
        return first
    loss = getattr(value, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def loss_in(value):
    """The loss a closure returned: the value itself, or the loss inside its structure."""
    if not isinstance(value, (Tensor, numbers.Real)):
        inner = _structured_loss(value)
        if inner is not None:
            return inner
    return value


def as_loss(value, what: str, verb: str = "returned") -> Tensor:
    """``value`` as a detached 0-dim loss tensor; a clear error naming ``what`` ('the closure',
    'loss=', with ``verb`` 'returned' / 'is' / 'got') for anything else."""
    value = loss_in(value)
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{what} {verb} a {value.dtype} tensor; expected a real scalar "
                            "loss (a floating-point tensor or a float)")
        if value.numel() != 1:
            raise ValueError(
                f"{what} {verb} a tensor of shape {tuple(value.shape)}; expected a scalar loss "
                "(reduce it, e.g. with .mean())"
            )
        value = value.detach()
        return value if value.dim() == 0 else value.reshape(())  # (a view op is a dispatch)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"{what} {verb} {type(value).__name__}; expected a scalar loss (a tensor or "
                    "a float, or a dict / ModelOutput with 'loss', or a tuple starting with it)")


def refuse_zero_redundancy(name: str) -> None:
    """``ZeroRedundancyOptimizer(params, optimizer_class=ArmijoAdam)`` builds one optimizer per
    rank over that rank's shard of the parameters: its trials would move only that shard, so the
    Armijo test would judge a point that is never applied (and ranks holding different numbers
    of blocks would send collectives of different sizes). It constructs the optimizer from its
    own ``__init__`` / ``add_param_group``: look for it a few frames up."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:
        return
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), zero.ZeroRedundancyOptimizer):
            raise TypeError(
                f"{name} cannot run inside torch.distributed.optim.ZeroRedundancyOptimizer: "
                "each rank would search along its own shard of the parameters only. Use DDP "
                "(the optimizer over all parameters on every rank) or FSDP2 (fully_shard, "
                "which shards the optimizer state and which the line search supports)"
            )
        frame = frame.f_back
