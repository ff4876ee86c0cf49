from __future__ import annotations

from ..directions.base import check_number
from .base import ArmijoOptimizer
from .common_doc import LINESEARCH_ARGS
from .torch_compat import TORCH_ARGS, check_torch_keywords


class ArmijoAdam(ArmijoOptimizer):
    __doc__ = r"""Adam-family directions with a stochastic Armijo line search on the step size.

    .. math::
        \begin{aligned}
        &g_k = \nabla f_k(\theta_{k-1}) \text{ on the mini-batch; } f_0 = f_k(\theta_{k-1}) \\
        &m_k = \beta_1 m_{k-1} + (1-\beta_1) g_k,\quad v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2 \\
        &u_k = \begin{cases}
            \hat m_k / (\sqrt{\hat v_k} + \epsilon) & \text{adam} \\
            (\beta_1 \hat m_k + (1-\beta_1) g_k / (1-\beta_1^k)) / (\sqrt{\hat v_k} + \epsilon)
                & \text{nadam} \\
            g_k / (\sqrt{v_k} + \epsilon),\ v_k = \alpha v_{k-1} + (1-\alpha) g_k^2 & \text{rmsprop}
          \end{cases} \\
        &d_k = u_k + \lambda \theta_{k-1} \quad\text{(decoupled weight decay, AdamW style)} \\
        &\eta \leftarrow \min(\eta_{k-1} \cdot \text{growth}, \text{max\_step}) \\
        &\textbf{while } f_k(\theta_{k-1} - \eta d_k) > f_0 - c\,\eta \langle g_k, d_k \rangle
            \textbf{ and trials} < \text{max\_trials}: \ \eta \leftarrow \text{backtrack}\cdot\eta \\
        &\theta_k = \theta_{k-1} - \eta \, \min(1, \text{lr}_t / \text{lr}_0) \, d_k
        \end{aligned}

    with :math:`\hat m_k = m_k / (1-\beta_1^k)`, :math:`\hat v_k = v_k / (1-\beta_2^k)`. If
    :math:`\langle g_k, d_k \rangle \le 0` (momentum can point uphill) the step uses the fallback
    direction :math:`g_k / (\sqrt{\hat v_k} + \epsilon)` instead (rmsprop: its own
    :math:`g_k / (\sqrt{v_k} + \epsilon)`, which has no momentum and always descends), without
    the decay term λθ (which is what can turn d uphill), so such a step applies no weight decay;
    the trial that showed it does not count against ``max_trials``. The search runs on the steps the
    cadence picks; the others apply the smoothed step size η̄ (see ``smoothing``), which one
    search lowers by at most ``max_drop``. Every η,
    searched or not, is capped at 0.5/λ with weight decay λ, so that 1 − ηλ stays ≥ 1/2.

    Args:
        params (iterable): parameters or param groups (dicts), as for any torch optimizer
        lr (float or Tensor, optional): reference value of the learning rate; only the ratio of
            the scheduled lr to it matters (see below) (default: 1.0)
        betas (Tuple[float, float], optional): adam/nadam moment coefficients (default: (0.9, 0.999))
        eps (float, optional): added to the denominator (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay λ (default: 0)
        amsgrad (bool, optional): only False (default: False)
        decoupled_weight_decay (bool, optional): torch.optim.Adam / NAdam's keyword; the decay
            here is always decoupled, so False is refused where some group has weight decay
            (swapping ``torch.optim.Adam(..., weight_decay=λ)`` for this class turns its L2
            term into decoupled decay: AdamW's form) (default: True)
        direction ("adam" | "nadam" | "rmsprop", optional): the update direction (default: "adam")
        alpha (float, optional): rmsprop's second-moment coefficient (default: 0.99)
        init_step_size (float, optional): η before the first search; Adam directions have entries
            of order 1, so this is the usual Adam learning rate. A warm start, but not without
            effect: η grows by at most √growth per search while searches accept their first
            trial, so from far below the Armijo limit it climbs over hundreds of steps (a
            warmup). Measured (bench/results/convergence_cpu-init-sensitivity.md): 3e-4 … 3e-3
            end within 0.94–1.03× the best AdamW of an lr sweep, 1e-4 at 1.10×, larger starts
            erratically (0.94–1.19×) (default: 1e-3)
{TORCH_ARGS}{LINESEARCH_ARGS}
    The positional order is torch.optim.AdamW's (params, lr, betas, eps, weight_decay), so
    ``torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)`` becomes
    ``ArmijoAdam(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)``.

    Example:
        >>> opt = ArmijoAdam(model.parameters(), model=model)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> opt.step(closure)
    """

    def __init__(
        self,
        params,
        lr=1.0,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        direction: str = "adam",
        alpha: float = 0.99,
        init_step_size: float = 1e-3,
        c: float = 0.2,
        backtrack: float = 0.5,
        growth: float = 1.2,
        smoothing: float = 0.5,
        max_trials: int = 20,
        max_step: float | None = None,
        collapse_ratio: float = 1e-2,
        max_drop: float | None = 2.0,
        trend_guard: bool | None = None,
        cadence="adaptive",
        max_interval: int = 10,
        max_grad_norm: float | None = None,
        check_finite: bool = True,
        backend: str = "auto",
        layerwise: bool = False,
        block_search: str = "round_robin",
        merge_below: float | None = None,
        exact_revert: bool = False,
        process_group=None,
        candidates: int | None = None,
        flat: bool = True,
        model=None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        decoupled_weight_decay: bool = True,
    ):
        check_torch_keywords("ArmijoAdam", foreach=foreach, fused=fused, maximize=maximize,
                             capturable=capturable, differentiable=differentiable)
        if amsgrad:
            raise ValueError("ArmijoAdam does not support amsgrad=True (the Adam, NAdam and "
                             "RMSProp directions keep no running maximum)")
        if direction not in ("adam", "nadam", "rmsprop"):
            raise ValueError(
                f"invalid direction for ArmijoAdam: {direction!r} (choose adam, nadam or rmsprop; "
                "sgd, momentum and nesterov are ArmijoSGD's)"
            )
        # a list becomes a tuple, as torch keeps it; anything else reaches the rule's check,
        # which names it (tuple(0.9) raised "'float' object is not iterable")
        rule_defaults = {"betas": tuple(betas) if isinstance(betas, list) else betas, "eps": eps}
        if direction == "rmsprop":  # (its rule checks alpha, per group too)
            rule_defaults = {"alpha": alpha, "eps": eps}
        else:  # unused here, but a typo in the option not taken is still a typo
            check_number("alpha", alpha, 0.0, 1.0, hi_open=True)
        if not decoupled_weight_decay:
            # kept in the groups, as torch does: a group added or a decay scheduled later that
            # asks for L2 is refused as well (check_group_options)
            rule_defaults["decoupled_weight_decay"] = False
        super().__init__(
            params, lr=lr, direction=direction, weight_decay=weight_decay,
            init_step_size=init_step_size, c=c, backtrack=backtrack, growth=growth, smoothing=smoothing,
            max_trials=max_trials, max_step=max_step, collapse_ratio=collapse_ratio, max_drop=max_drop,
            trend_guard=not layerwise if trend_guard is None else trend_guard,
            cadence=cadence, max_interval=max_interval, max_grad_norm=max_grad_norm,
            check_finite=check_finite, backend=backend, layerwise=layerwise, model=model,
            rule_defaults=rule_defaults, block_search=block_search, merge_below=merge_below,
            exact_revert=exact_revert, process_group=process_group, candidates=candidates,
            flat=flat,
        )
        # (last, as the base class's warnings: a refusal first) the coefficients not read: an
        # rmsprop run given betas (its one moment's coefficient is alpha) ran as if without
        if direction == "rmsprop":
            unread, value, default, read = "betas", betas, (0.9, 0.999), "alpha"
            reads = "one moment's coefficient is alpha"
        else:
            unread, value, default, read = "alpha", alpha, 0.99, "betas"
            reads = "moments' coefficients are betas"
        if not _same(value, default):
            self._warn_once("unused coefficient", (
                f"{unread}={value!r} is not read by direction={direction!r}, whose {reads} "
                f"({self.param_groups[0][read]!r} here): it does nothing"))


def _same(value, default) -> bool:
    try:
        return bool(tuple(value) == default if isinstance(default, tuple) else value == default)
    except Exception:  # (not comparable: not the default)
        return False


ArmijoAdam.__doc__ = ArmijoAdam.__doc__.replace("{LINESEARCH_ARGS}", LINESEARCH_ARGS).replace(
    "{TORCH_ARGS}", TORCH_ARGS)
