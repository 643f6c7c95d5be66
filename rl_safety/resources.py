"""Where the files named in recipes and on the command line are found: the one rule every command uses.

A path is used as given when it exists relative to the working directory (or is absolute). Otherwise, a path that
names something shipped with the package falls back to the package's copy, so the shipped recipes run from any
folder after a plain `pip install`:

  recipes/...                    -> the package's recipes (rl_safety/shipped/recipes/...)
  prompts/...                    -> the package's prompt sets (rl_safety/shipped/prompts/...)
  rl_safety/toyworld/assets/...  -> the package's toy-world models (rl_safety/toyworld/assets/...)

and a recipe (`--config`, `eval_config`) may also be named inside the shipped recipes, with or without `.yaml`:
`--config toyworld/grpo_erase_red`. Anything else (a Hub id, a path that does not exist anywhere) is returned
unchanged, and the command's own check reports it, naming the field and what was tried (`tried`).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# Where the shipped top-level folders are: inside an installed package, or at the root of a source checkout.
_ROOTS = {
    "recipes": (PACKAGE / "shipped" / "recipes", PACKAGE.parent / "recipes"),
    "prompts": (PACKAGE / "shipped" / "prompts", PACKAGE.parent / "prompts"),
}
RECIPE_SUFFIXES = (".yaml",)


def shipped_root(name: str) -> Path:
    """The package's copy of the top-level folder `name` ('recipes' or 'prompts')."""
    for root in _ROOTS[name]:
        if root.is_dir():
            return root
    return _ROOTS[name][0]


def _parts(value: str) -> list[str]:
    return [p for p in Path(value).as_posix().split("/") if p not in ("", ".")]


def candidates(value: str | os.PathLike, recipe: bool = False) -> list[Path]:
    """The places `value` is looked for, in order: as given (relative to the working directory), then the shipped
    copies. `recipe`: also inside the shipped recipes folder, with `.yaml` added when it has no suffix."""
    value = os.fspath(value)
    given = Path(value).expanduser()
    found = [given]
    if given.is_absolute() or not value:
        return found
    parts = _parts(value)
    if len(parts) > 1 and parts[0] in _ROOTS:
        found.append(shipped_root(parts[0]).joinpath(*parts[1:]))
    elif len(parts) > 1 and parts[0] == PACKAGE.name:
        found.append(PACKAGE.joinpath(*parts[1:]))
    if recipe:
        inner = parts[1:] if parts and parts[0] == "recipes" else parts
        if inner:
            found.append(shipped_root("recipes").joinpath(*inner))
        if Path(value).suffix not in (*RECIPE_SUFFIXES, ".yml"):
            found += [p.with_name(p.name + suffix) for p in list(found) for suffix in RECIPE_SUFFIXES]
    return list(dict.fromkeys(found))


def _exists(path: Path, kind: str) -> bool:
    return {"file": path.is_file, "dir": path.is_dir}.get(kind, path.exists)()


def resolve_path(value: str | os.PathLike | None, kind: str = "any", recipe: bool = False):
    """`value` where it exists (see the module docstring), as a string; unchanged when it is nowhere.

    The value is kept as written when it exists relative to the working directory, so what the user wrote is what
    the logs and saved configs show; a fallback is returned as an absolute path. `kind`: 'file', 'dir' or 'any'.
    """
    if value is None:
        return None
    for path in candidates(value, recipe=recipe):
        if _exists(path, kind):
            return os.fspath(value) if path == Path(os.fspath(value)).expanduser() else str(path)
    return os.fspath(value)


REWARD_PATH_ARGS = ("classifier", "checkpoint")  # reward arguments that name a model file or folder


def resolve_reward_paths(rewards: list) -> list:
    """Reward specs with their model-path arguments (`REWARD_PATH_ARGS`) resolved; other values untouched."""
    resolved = []
    for spec in rewards:
        args = spec.get("args") if isinstance(spec, dict) else None
        if isinstance(args, dict) and any(isinstance(args.get(k), str) for k in REWARD_PATH_ARGS):
            args = {k: resolve_path(v) if k in REWARD_PATH_ARGS and isinstance(v, str) else v for k, v in args.items()}
            spec = {**spec, "args": args}
        resolved.append(spec)
    return resolved


def resolve_recipe(value: str) -> str:
    """A recipe path (`--config`, `eval_config`): as given, or a shipped recipe such as 'toyworld/grpo_erase_red'."""
    return resolve_path(value, kind="file", recipe=True)


def tried(value: str | os.PathLike, recipe: bool = False) -> str:
    """Where `value` was looked for, for a one-line error message: ' (tried a, b)', or '' for an absolute path."""
    places = candidates(value, recipe=recipe)
    if len(places) == 1:
        return "" if places[0].is_absolute() else f" (relative to {Path.cwd()})"
    return " (tried " + ", ".join(str(p) for p in places) + ")"
