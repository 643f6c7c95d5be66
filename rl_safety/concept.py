"""`{target_concept}` placeholders: one recipe erases any concept by changing a single field."""

from __future__ import annotations

from typing import Any

PLACEHOLDER = "{target_concept}"


def fill_target_concept(value: Any, concept: str | None, where: str) -> Any:
    """`value` with every `{target_concept}` in its strings (nested in lists and dicts) replaced by `concept`.

    Raises ValueError naming `where` when a placeholder is used but no concept is set.
    """
    if isinstance(value, str):
        if PLACEHOLDER not in value:
            return value
        if not concept:
            raise ValueError(f"{where}={value!r} uses {PLACEHOLDER}, but target_concept is not set (e.g. red)")
        return value.replace(PLACEHOLDER, concept)
    if isinstance(value, list | tuple):
        return type(value)(fill_target_concept(v, concept, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: fill_target_concept(v, concept, f"{where}.{k}") for k, v in value.items()}
    return value
