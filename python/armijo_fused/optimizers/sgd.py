from __future__ import annotations

from .base import ArmijoOptimizer
from .common_doc import LINESEARCH_ARGS
from .torch_compat import TORCH_ARGS, check_torch_keywords, sgd_direction


class ArmijoSGD(ArmijoOptimizer):
    __doc__ = r"""SGD-family directions with a stochastic Armijo line search (SLS, Vaswani et al. 2019).

    .. math::
        \begin{aligned}
        &g_k = \nabla f_k(\theta_{k-1}) \text{ on the mini-batch; } f_0 = f_k(\theta_{k-1}) \\
        &u_k = \begin{cases}
            g_k & \text{sgd} \\
            b_k,\ b_k = \mu b_{k-1} + g_k & \text{momentum} \\
            g_k + \mu b_k & \text{nesterov}
          \end{cases} \qquad d_k = u_k + \lambda \theta_{k-1} \\
        &\eta \leftarrow \min(\eta_{k-1} \cdot \text{growth}, \text{max\_step}) \\
        &\textbf{while } f_k(\theta_{k-1} - \eta s_k) > f_0 - c\,\eta \langle g_k, s_k \rangle
            \textbf{ and trials} < \text{max\_trials}: \ \eta \leftarrow \text{backtrack}\cdot\eta \\
        &\alpha = (1 - \mu_s)\,\eta; \quad \textbf{while }
            f_k(\theta_{k-1} - \alpha d_k) > f_0 - c\,\alpha \langle g_k, d_k \rangle:
            \ \alpha \leftarrow \text{backtrack}\cdot\alpha \ \text{(once)} \qquad (\mu_s > 0 \text{ only}) \\
        &\theta_k = \theta_{k-1} - \alpha \, \min(1, \text{lr}_t / \text{lr}_0) \, d_k
        \end{aligned}

    The search direction is :math:`s_k = g_k` with :math:`\mu_s = \mu` for the momentum rules
    (``momentum_search="gradient"``, the default), and :math:`s_k = d_k`, :math:`\mu_s = 0`
    (so α = η, no second test) for plain SGD or with ``momentum_search="direction"``.
    Why: heavy-ball momentum moves θ by :math:`\alpha g/(1-\mu)` in total for each gradient, over
    the steps that follow, while an Armijo test sees one step. Searched along :math:`d_k`, the
    test shrank η by only :math:`\|b\|^2/\langle g,b\rangle \approx 4\text{–}6` at μ = 0.9 on
    noisy mini-batches (not 1/(1-μ) = 10), so each gradient moved about twice as far as a test
    along g accepts; runs stalled at chance or blew up (``bench/sgd_momentum.py``). Searching η
    along g and applying :math:`(1-\mu)\eta` along the momentum direction is SGD with EMA
    momentum :math:`m \leftarrow \mu m + (1-\mu) g` at the step size plain ArmijoSGD searches,
    and the second test (one more forward per search when it passes at once) makes θ end at a
    point that passed the Armijo test along the direction applied. If neither α nor
    backtrack·α passes (the momentum points uphill, or badly at this η), the step is the tested
    one along g (g alone: such a step applies no weight decay); where
    :math:`\alpha\langle g_k, d_k \rangle` (known from the first pass) predicts no decrease the
    loss can resolve, without the forward of that test. The groups keep η
    (along g); ``stats['step_size']`` is α, the step along :math:`d_k`. Weight decay is
    applied at the same α, decoupled: :math:`\lambda\theta` joins the direction outside the
    momentum buffer (torch's SGD adds it to the gradient, inside the buffer; without momentum
    the two are the same step).

    With ``momentum_search="direction"``, if :math:`\langle g_k, d_k \rangle \le 0` (momentum
    can point uphill) the step falls back to :math:`d_k = g_k` (without λθ). The search runs on the steps
    the cadence picks; the others apply the smoothed step size η̄ (the last accepted η with the
    default ``smoothing=0``; see ``smoothing``), times 1 - μ with ``momentum_search="gradient"``,
    moving about twice as far as that along the direction the last search tested at most (see
    ``cadence``). Every η, searched or not, is capped at 0.5/λ with weight decay λ.

    Args:
        params (iterable): parameters or param groups (dicts), as for any torch optimizer
        lr (float or Tensor, optional): reference value of the learning rate; only the ratio of
            the scheduled lr to it matters (see below) (default: 1.0)
        momentum (float, optional): μ. As in torch.optim.SGD, a non-zero value gives the
            momentum direction, with ``nesterov=True`` the Nesterov one (default: None: plain
            SGD, or 0.9 when ``direction`` names a momentum rule)
        dampening (float, optional): only 0, torch.optim.SGD's default (default: 0)
        weight_decay (float, optional): decoupled weight decay λ (default: 0)
        nesterov (bool, optional): the Nesterov direction (needs momentum) (default: False)
        direction ("sgd" | "momentum" | "nesterov", optional): the update direction by name,
            instead of ``momentum``/``nesterov`` (default: None: from those)
        init_step_size (float, optional): η before the first search; SLS starts at 1 and lets the
            first search backtrack (default: 1.0)
        momentum_search ("gradient" | "direction", optional): with momentum, search η along the
            gradient and apply (1 - μ)·η along the momentum direction, tested ("gradient"), or
            search along the momentum direction and apply η ("direction", the earlier rule,
            which stalled or diverged on noisy tasks); no effect on plain SGD. ``candidates``
            and ``block_search="exact"`` search along the direction only (default: None:
            "gradient", or "direction" with those two)
{TORCH_ARGS}{LINESEARCH_ARGS}
    Example:
        >>> opt = ArmijoSGD(model.parameters(), momentum=0.9, nesterov=True, model=model)
    """

    def __init__(
        self,
        params,
        lr=1.0,
        momentum: float | None = None,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        direction: str | None = None,
        init_step_size: float = 1.0,
        c: float = 0.2,
        backtrack: float = 0.5,
        growth: float = 1.2,
        smoothing: float = 0.0,
        max_trials: int = 20,
        max_step: float | None = None,
        collapse_ratio: float = 1e-2,
        max_drop: float | None = None,
        trend_guard: bool | None = False,
        cadence="adaptive",
        max_interval: int = 10,
        momentum_search: str | None = None,
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
    ):
        check_torch_keywords("ArmijoSGD", foreach=foreach, fused=fused, maximize=maximize,
                             capturable=capturable, differentiable=differentiable)
        direction, momentum = sgd_direction(direction, momentum, dampening, nesterov)
        # plain SGD too has momentum 0 in its groups, as torch's: schedulers that cycle momentum
        # (OneCycleLR, CyclicLR) look for the key; a value they write then is refused by name
        rule_defaults = {"momentum": 0.0 if direction == "sgd" else momentum}
        super().__init__(
            params, lr=lr, direction=direction, weight_decay=weight_decay,
            init_step_size=init_step_size, c=c, backtrack=backtrack, growth=growth, smoothing=smoothing,
            max_trials=max_trials, max_step=max_step, collapse_ratio=collapse_ratio, max_drop=max_drop,
            trend_guard=False if trend_guard is None else trend_guard,
            cadence=cadence, max_interval=max_interval, max_grad_norm=max_grad_norm,
            check_finite=check_finite, backend=backend, layerwise=layerwise, model=model,
            rule_defaults=rule_defaults, block_search=block_search, merge_below=merge_below,
            exact_revert=exact_revert, process_group=process_group, candidates=candidates,
            flat=flat, momentum_search=momentum_search,
        )


ArmijoSGD.__doc__ = ArmijoSGD.__doc__.replace("{LINESEARCH_ARGS}", LINESEARCH_ARGS).replace(
    "{TORCH_ARGS}", TORCH_ARGS)
