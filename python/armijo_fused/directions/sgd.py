"""SGD family: plain gradient, heavy-ball momentum, Nesterov momentum (Tuning Playbook forms).

.. math::
    \\text{sgd:}\\quad & u = g \\\\
    \\text{momentum:}\\quad & b \\leftarrow \\mu b + g,\\quad u = b \\\\
    \\text{nesterov:}\\quad & b \\leftarrow \\mu b + g,\\quad u = g + \\mu b

``b`` starts at zero, so the first step equals torch's (which starts at ``b = g``); dampening is not
offered. The fallback direction of all three is the plain gradient.
"""

from __future__ import annotations

from .base import DirectionRule, _pad, check_range, unmix


class SGD(DirectionRule):
    name = "sgd"
    rule_id = 0
    direction_reads_grad = True  # u = g
    precond_is_gradient = True

    def direction(self, g, states, s):
        return g.clone()


class Momentum(DirectionRule):
    name = "momentum"
    rule_id = 1
    state_names = ("momentum_buffer",)
    heavy_ball = True  # (and Nesterov, below)
    precond_is_gradient = True
    hyperparameters = {"momentum": 0.9}

    def validate(self, group):
        check_range(group, "momentum", 0.0, 1.0)

    def scalars(self, group, step):
        return _pad(group["momentum"])

    def update_state(self, g, states, s):
        (buf,) = states
        buf.mul_(s[0]).add_(g)

    def undo_state(self, g, states, s):
        unmix(states[0], g, s[0])

    def direction(self, g, states, s):
        return states[0].clone()


class Nesterov(Momentum):
    name = "nesterov"
    rule_id = 2
    direction_reads_grad = True

    def direction(self, g, states, s):
        return g + s[0] * states[0]
