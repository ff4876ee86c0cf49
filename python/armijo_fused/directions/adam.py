"""Adaptive family: RMSProp, Adam, NAdam (Tuning Playbook forms, step ``k`` counted from 1).

.. math::
    \\text{rmsprop:}\\quad & v \\leftarrow \\alpha v + (1-\\alpha) g^2,\\quad
        u = g / (\\sqrt{v} + \\epsilon) \\\\
    \\text{adam:}\\quad & m \\leftarrow \\beta_1 m + (1-\\beta_1) g,\\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2,\\quad
        u = \\frac{m / (1-\\beta_1^k)}{\\sqrt{v / (1-\\beta_2^k)} + \\epsilon} \\\\
    \\text{nadam:}\\quad & m, v \\text{ as Adam},\\quad
        u = \\frac{(\\beta_1 m + (1-\\beta_1) g) / (1-\\beta_1^k)}{\\sqrt{v / (1-\\beta_2^k)} + \\epsilon}

The fallback direction drops the momentum: ``g / (sqrt(v_hat) + eps)``.
Host scalars: rmsprop ``(alpha, eps)``; adam and nadam ``(beta1, beta2, 1/bc1, 1/bc2, eps)``.
"""

from __future__ import annotations

import torch

from .base import DirectionRule, _pad, check_number, check_range, in_float32, unmix


def check_eps(group) -> None:
    """eps > 0 as the passes see it, in float32: 1e-50 passed a float64 check, became 0 in every
    backend, and an element whose g and v were 0 got 0/0, NaN, in the model (no skip: the
    guard watches the gradient and the loss, not the direction)."""
    check_range(group, "eps", 0.0, float("inf"), lo_open=True)
    as_fp32 = in_float32(float(group["eps"]))
    if not 0.0 < as_fp32 < float("inf"):
        raise ValueError(f"invalid eps: {group['eps']!r} (it is {as_fp32:g} in float32, where the "
                         "passes compute; expected a value between 1.4e-45 and 3.4e38)")


class RMSProp(DirectionRule):
    name = "rmsprop"
    rule_id = 3
    state_names = ("square_avg",)
    squared_states = ("square_avg",)
    direction_reads_grad = True
    hyperparameters = {"alpha": 0.99, "eps": 1e-8}

    def validate(self, group):
        check_range(group, "alpha", 0.0, 1.0)
        check_eps(group)

    def scalars(self, group, step):
        return _pad(group["alpha"], group["eps"])

    def update_state(self, g, states, s):
        (v,) = states
        v.mul_(s[0]).addcmul_(g, g, value=1.0 - s[0])

    def undo_state(self, g, states, s):
        unmix(states[0], (1.0 - s[0]) * g * g, s[0])

    def direction(self, g, states, s):
        return g / (states[0].sqrt() + s[1])

    def precond_grad(self, g, states, s):
        return self.direction(g, states, s)


class Adam(DirectionRule):
    name = "adam"
    rule_id = 4
    state_names = ("exp_avg", "exp_avg_sq")
    squared_states = ("exp_avg_sq",)
    bias_corrected = True
    warn_unannealed = True  # (NAdam inherits it)
    hyperparameters = {"betas": (0.9, 0.999), "eps": 1e-8}

    def validate(self, group):
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"invalid betas: {betas!r} (expected a pair (beta1, beta2): a tuple "
                             "or list of two numbers)")
        for i, b in enumerate(betas):
            check_number(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)
        check_eps(group)

    def scalars(self, group, step):
        b1, b2 = group["betas"]
        return _pad(b1, b2, 1.0 / (1.0 - b1**step), 1.0 / (1.0 - b2**step), group["eps"])

    def update_state(self, g, states, s):
        m, v = states
        m.mul_(s[0]).add_(g, alpha=1.0 - s[0])
        v.mul_(s[1]).addcmul_(g, g, value=1.0 - s[1])

    def undo_state(self, g, states, s):
        m, v = states
        unmix(m, (1.0 - s[0]) * g, s[0])
        unmix(v, (1.0 - s[1]) * g * g, s[1])

    def _denominator(self, v, s):
        return torch.sqrt(v * s[3]) + s[4]

    def direction(self, g, states, s):
        m, v = states
        return (m * s[2]) / self._denominator(v, s)

    def precond_grad(self, g, states, s):
        return g / self._denominator(states[1], s)


class NAdam(Adam):
    name = "nadam"
    rule_id = 5
    direction_reads_grad = True

    def direction(self, g, states, s):
        m, v = states
        return ((s[0] * m + (1.0 - s[0]) * g) * s[2]) / self._denominator(v, s)
