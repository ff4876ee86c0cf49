"""The keywords of torch.optim's constructors, taken so that swapping the class is the only change.

nanoGPT builds ``torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)``, torchtitan passes
``fused`` and ``foreach`` from its config, and SGD code says ``SGD(params, lr, momentum=0.9,
nesterov=True)``. The optimizers take the same positional order as torch's and these keywords:
``foreach``/``fused`` are accepted and change nothing (every pass is fused; ``backend`` picks the
kernels); options that would change the math and are not implemented are refused by name rather
than ignored.
"""

from __future__ import annotations

import numbers

TORCH_ARGS = r"""        foreach, fused (bool, optional): accepted so that code written for torch.optim runs
            unchanged, and ignored: every pass is already one fused kernel; ``backend`` picks
            which (default: None)
        maximize (bool, optional): only False; the search minimises the loss (default: False)
        capturable, differentiable (bool, optional): only False: a search reads each trial's
            loss on the host, which neither CUDA graphs nor autograd through ``step`` can hold
            (default: False)"""


def check_torch_keywords(owner: str, *, foreach=None, fused=None, maximize=False,
                         capturable=False, differentiable=False) -> None:
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be None or a bool, got {value!r}")
    if maximize:
        raise ValueError(f"{owner} does not support maximize=True: the line search minimises "
                         "the loss; return its negative from the closure instead")
    for name, value in (("capturable", capturable), ("differentiable", differentiable)):
        if value:
            raise ValueError(f"{owner} does not support {name}=True: a search reads each "
                             "trial's loss on the host")


def sgd_direction(direction, momentum, dampening, nesterov) -> tuple[str, float | None]:
    """ArmijoSGD's rule and μ from either spelling: torch's ``momentum``/``nesterov`` or
    ``direction``. Returns (direction, momentum), momentum None for plain SGD."""
    if momentum is not None and (not isinstance(momentum, numbers.Real)
                                 or isinstance(momentum, bool)):
        raise TypeError(f"invalid momentum: {momentum!r} (expected a number in [0.0, 1.0))")
    if dampening != 0:
        raise ValueError(f"ArmijoSGD does not support dampening (got {dampening!r}); the momentum "
                         "buffer is b = μ b + g, as torch.optim.SGD's with dampening=0")
    if direction is None:
        if nesterov:
            if not momentum:
                raise ValueError("nesterov=True needs momentum > 0 (as in torch.optim.SGD)")
            return "nesterov", float(momentum)
        return ("momentum", float(momentum)) if momentum else ("sgd", None)
    if direction not in ("sgd", "momentum", "nesterov"):
        raise ValueError(
            f"invalid direction for ArmijoSGD: {direction!r} (choose sgd, momentum or "
            "nesterov; adam, nadam and rmsprop are ArmijoAdam's)"
        )
    if nesterov and direction != "nesterov":
        raise ValueError(f"nesterov=True contradicts direction={direction!r}")
    if direction == "sgd":
        if momentum:
            raise ValueError(f"direction='sgd' takes no momentum (got {momentum!r}); use "
                             "direction='momentum', or leave direction out")
        return "sgd", None
    return direction, 0.9 if momentum is None else float(momentum)
