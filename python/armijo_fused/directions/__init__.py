"""Direction rules, by name. Adding one: a file here, an entry in ``RULES``, and its kernel twins."""

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
