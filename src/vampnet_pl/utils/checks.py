"""Range checks of config values, named by their config key: the schemas (config.py) and the dataclass configs of the
model, the optimiser and the evaluation protocol run them when a config is composed."""

from __future__ import annotations


def check_at_least(node, prefix: str, **least: int) -> None:
    """Each named setting of ``node`` is at least its given value, or None (its default elsewhere); ``prefix``: the
    config key's group ("" at the top level)."""
    for name, lowest in least.items():
        value = getattr(node, name)
        if value is not None and value < lowest:
            raise ValueError(f"{prefix + '.' if prefix else ''}{name} must be at least {lowest}, got {value}")


def check_fraction(value: float, key: str) -> None:
    """A share (of tokens, of skipped samples, of a split) lies in [0, 1]."""
    if not 0 <= value <= 1:
        raise ValueError(f"{key} must be in [0, 1], got {value}")
