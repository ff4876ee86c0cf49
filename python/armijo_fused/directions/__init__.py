"""Direction rules, by name. Adding one: a file here and an entry in ``RULES`` run it on the torch
backend (``backend="auto"`` picks torch for a rule the fused backends lack); its Triton and C++
twins make it fused. The whole list: docs/kernels.md, "Adding a direction rule"."""

from .adam import Adam, NAdam, RMSProp
from .base import NUM_SCALARS, DirectionRule
from .sgd import SGD, Momentum, Nesterov

RULES: dict[str, DirectionRule] = {
    r.name: r for r in (SGD(), Momentum(), Nesterov(), RMSProp(), Adam(), NAdam())
}
assert sorted(r.rule_id for r in RULES.values()) == list(range(len(RULES)))


def get_rule(name: str) -> DirectionRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown direction {name!r}; choose one of {', '.join(RULES)}"
        ) from None


__all__ = ["RULES", "NUM_SCALARS", "DirectionRule", "get_rule"]
