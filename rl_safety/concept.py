"""`{target_concept}` placeholders: one recipe erases any concept by changing a single field."""

from __future__ import annotations

from pathlib import Path
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


def concepts_with_files(template: str) -> list[str]:
    """The concepts for which `template` (a path with one `{target_concept}` segment) names an existing file, here or
    among the files shipped with the package: what a user may pass as `--target_concept`."""
    from .resources import candidates

    parts = template.replace("\\", "/").split("/")
    if parts.count(PLACEHOLDER) != 1:
        return []
    index = parts.index(PLACEHOLDER)
    found = set()
    for candidate in candidates(template.replace(PLACEHOLDER, "_")):
        root = candidate.parents[len(parts) - index - 1]
        rest = "/".join(parts[index + 1 :])
        found.update(p.name for p in root.glob("*") if p.is_dir() and (p / rest).is_file())
    return sorted(found)


def check_concept_files(templates: list[str], concept: str | None, field: str) -> None:
    """Raise ValueError naming the valid concepts when `concept` fills a `{target_concept}` template with a file that
    exists for other concepts but not for this one (e.g. `--target_concept magenta`)."""
    from .resources import resolve_path

    for template in templates:
        if not isinstance(template, str) or PLACEHOLDER not in template or not concept:
            continue
        filled = template.replace(PLACEHOLDER, concept)
        known = concepts_with_files(template)
        if known and concept not in known and not Path(resolve_path(filled)).exists():
            raise ValueError(
                f"target_concept={concept!r}: {field} has no {filled!r}; concepts with prompt sets: {', '.join(known)}"
            )
