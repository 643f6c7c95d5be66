"""Recipe parsing: TRL's `TrlParser` (`--config` YAML, command-line overrides) with one-line errors and type checks."""

from __future__ import annotations

import difflib
import json
import sys
import types
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from trl import TrlParser

from .errors import ConfigError
from .resources import resolve_recipe, tried

__all__ = ["ConfigError", "RecipeParser"]


def _json_mapping(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg})") from err
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's annotation. Strings are left to argparse, which converts and checks them."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return (
            isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
        )
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is Literal:
        return value in args
    if isinstance(value, str):
        return hint is not list
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return value in {e.value for e in hint}
    if hint is str:
        return False
    return True


class RecipeParser(TrlParser):
    """`TrlParser` whose errors are one line naming the field, and which type-checks values coming from YAML."""

    def __init__(
        self, dataclass_types, prog: str = "rl-safety train", foreign_fields: dict[str, str] | None = None, **kwargs
    ):
        """`foreign_fields` maps fields of sibling configurations (other trainers) to their owner, so a key that
        belongs elsewhere is reported as such rather than as a typo."""
        super().__init__(dataclass_types, prog=prog, allow_abbrev=False, **kwargs)
        self.foreign_fields = dict(foreign_fields or {})
        self._hints: dict[str, Any] = {}
        for dataclass_type in self.dataclass_types:
            hints = get_type_hints(dataclass_type)
            self._hints.update({f: hints[f] for f in dataclass_type.__dataclass_fields__ if f in hints})
        for action in self._actions:
            if action.dest == "rewards":
                action.type = _json_mapping  # rewards on the command line are JSON objects

    @property
    def field_names(self) -> list[str]:
        return sorted(self._hints)

    def error(self, message: str):
        raise ConfigError(message)

    def _unknown(self, keys: list[str], where: str) -> ConfigError:
        key = keys[0].lstrip("-").split("=")[0]
        if key in self.foreign_fields:
            return ConfigError(f"{where} {key!r}: {self.foreign_fields[key]}")
        close = difflib.get_close_matches(key, self.field_names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return ConfigError(f"unknown {where} {key!r}{hint} (see `{self.prog} --help` for all fields)")

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        for key, value in kwargs.items():
            if key in self._hints and not _matches(value, self._hints[key]):
                raise ConfigError(f"recipe key {key!r}: expected {_type_name(self._hints[key])}, got {value!r}")
        remaining = super().set_defaults_with_config(**kwargs)
        if remaining:
            raise self._unknown(remaining, "recipe key")
        return remaining

    def _is_list(self, key: str) -> bool:
        hint = self._hints.get(key)
        return get_origin(hint) is list or any(get_origin(a) is list for a in get_args(hint))

    def _check_repeated_lists(self, argv: list[str]) -> None:
        """argparse keeps only the last of a repeated list flag (`--adapter A --adapter B` → [B]): refuse it rather
        than drop values silently."""
        seen: set[str] = set()
        for key in (token[2:].split("=")[0] for token in argv if token.startswith("--")):
            if key in seen and self._is_list(key):
                raise ConfigError(f"--{key} given twice: list every value after one flag (--{key} A B)")
            seen.add(key)

    def parse(self, argv: list[str] | None = None) -> tuple[Any, ...]:
        """Parse `--config recipe.yaml` and overrides into the dataclasses; every failure is a `ConfigError`."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--config" in argv:
            index = argv.index("--config")
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a recipe path, e.g. --config recipes/tiny/grpo_jpeg.yaml")
            given = argv[index + 1]
            path = argv[index + 1] = resolve_recipe(given)  # as given, or a shipped recipe (rl_safety/resources.py)
            try:
                with open(path, encoding="utf-8") as handle:
                    recipe = yaml.safe_load(handle)
            except OSError as err:
                where = tried(given, recipe=True) if path == given else ""
                raise ConfigError(f"--config {given}: cannot read the recipe ({err.strerror}){where}") from err
            except UnicodeDecodeError as err:
                raise ConfigError(f"--config {given}: not UTF-8 text (byte {err.start}: {err.reason})") from err
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark else ""
                problem = getattr(err, "problem", None) or type(err).__name__
                raise ConfigError(f"--config {given}: not valid YAML ({problem}{where})") from err
            if not isinstance(recipe, dict | None):  # an empty file is an empty recipe
                kind = type(recipe).__name__
                raise ConfigError(f"--config {given}: must be a YAML mapping of field: value, not a {kind}")
        self._check_repeated_lists(argv)
        try:
            *outputs, remaining = self.parse_args_and_config(argv, return_remaining_strings=True)
        except ConfigError:
            raise
        except (ValueError, TypeError, yaml.YAMLError) as err:
            raise ConfigError(str(err).splitlines()[0]) from err
        if remaining:
            raise self._unknown(remaining, "argument")
        return tuple(outputs)
