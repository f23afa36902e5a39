"""Activation rules: one module per rule, each a :class:`~saelib.sae.rules.base.Rule` that owns
its selection, its knob (config field, label, colour, line style), its encoder-bias default, its
training-time state and losses, its threshold update and its SAELens mapping.

``get_rule(name)`` returns the rule; ``SAE.rule`` is the SAE's own. A new rule is one module
with a ``RULE`` object plus one ``register`` line below."""
from __future__ import annotations

from typing import Any

from saelib.sae.rules import batchtopk, jumprelu, relu, topafa, topk
from saelib.sae.rules.base import Rule

__all__ = ["RULES", "Rule", "get_rule", "register", "knob_text", "rule_attr", "rule_in"]

RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    if not rule.name or rule.name in RULES:
        raise ValueError(f"cannot register rule {rule.name!r}: the name is empty or taken ({sorted(RULES)})")
    RULES[rule.name] = rule
    return rule


def get_rule(name: str | Rule) -> Rule:
    """The rule called ``name`` (a Rule passes through)."""
    if isinstance(name, Rule):
        return name
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown activation {name!r}; choose one of {tuple(RULES)}") from None


def rule_attr(name: Any, attr: str, default: Any = None) -> Any:
    """``get_rule(name).<attr>``, or ``default`` when ``name`` is no rule (e.g. an SAELens architecture)."""
    r = RULES.get(name) if isinstance(name, str) else None
    return default if r is None else getattr(r, attr)


def knob_text(row: Any) -> str:
    """The knob of a sweep-table row or config mapping as a label, e.g. ``k=32``, ``λ=1/16``."""
    rule = get_rule(row["activation"])
    return rule.knob_label(row[rule.knob])


def rule_in(text: str) -> str | None:
    """The rule whose name occurs in ``text`` (longest name first: "batchtopk" before "topk")."""
    return next((n for n in sorted(RULES, key=len, reverse=True) if n in str(text)), None)


register(topk.RULE)
register(batchtopk.RULE)
register(topafa.RULE)
register(relu.RULE)
register(jumprelu.RULE)
