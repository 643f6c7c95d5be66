"""The reward contract, the name lookup and the weighted stack.

A reward maps a batch of images (float tensor in [0, 1], shape (B, 3, H, W), on the trainer's device), their prompts
and a context (tags such as "unsafe" / "safe" / "adversarial", seeds, step) to a float tensor (B,); higher is better.
Rewards are `torch.nn.Module`s so that their weights follow the trainer's device; any callable with the same
signature is accepted too (a plugin can be a plain function).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch

ENTRY_POINT_GROUP = "rl_safety.rewards"


class Reward(torch.nn.Module):
    """Base class for rewards. Subclasses set `differentiable` and implement `forward(images, prompts, **context)`."""

    differentiable: bool = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        raise NotImplementedError


class RewardError(ValueError):
    """A reward could not be resolved, built, or returned an unusable value."""


# Built-ins by import path: a reward's heavy dependencies load only when a recipe names it.
BUILTIN_REWARDS = {
    "classifier": "rl_safety.rewards.classifier:ClassifierReward",
    "clip_steering": "rl_safety.rewards.clip_steering:ClipSteering",
    "hpsv2": "rl_safety.rewards.preference:HPSv2",
    "image_reward": "rl_safety.rewards.image_reward:ImageReward",
    "jpeg_compressibility": "rl_safety.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "rl_safety.rewards.jpeg:JpegIncompressibility",
    "laion_aesthetic": "rl_safety.rewards.preference:LaionAesthetic",
    "nudity": "rl_safety.rewards.nudity:NudityPenalty",
    "pickscore": "rl_safety.rewards.preference:PickScore",
    "toyworld_concept": "rl_safety.rewards.toyworld:ToyConceptPenalty",
    "toyworld_fidelity": "rl_safety.rewards.toyworld:ToyPromptFidelity",
}


def _import(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def available_rewards() -> list[str]:
    """Names usable in a recipe: built-ins, then plugins registered as `rl_safety.rewards` entry points."""
    return sorted(BUILTIN_REWARDS) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def resolve_reward(name: str) -> Callable[..., Any]:
    """The factory for `name`: a built-in, an entry point in group `rl_safety.rewards`, or `package.module:attr`."""
    if name in BUILTIN_REWARDS:
        return _import(BUILTIN_REWARDS[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        try:
            factory = _import(name)
        except (ImportError, AttributeError) as err:
            raise RewardError(f"reward {name!r}: cannot import it ({err})") from err
        if not callable(factory):
            raise RewardError(f"reward {name!r}: a {type(factory).__name__}, not a reward class or function")
        return factory
    raise RewardError(
        f"unknown reward {name!r}; valid names: {', '.join(available_rewards())}, or a 'package.module:attr' path"
    )


def default_reward_name(name: str) -> str:
    """The name a reward is logged under (`rewards/<name>/mean`) when its entry has no `alias`: a built-in's or an
    entry point's name as is, and for a `package.module:attr` path the attribute snake_cased (`pkg.mod:PickScore` ->
    `pick_score`, `my_rewards.brightness:brightness` -> `brightness`), so metric names carry no `:` or dots."""
    if ":" not in name:
        return name
    attr = name.rpartition(":")[2].rpartition(".")[2]
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", attr).lower()
    return re.sub(r"[^a-z0-9_]+", "_", snake).strip("_") or name


def build_reward(name: str, args: Mapping[str, Any] | None = None) -> Callable[..., torch.Tensor]:
    """Instantiate a reward by name. A factory that is a class or function taking the args is called with them;
    a plain reward function (no args given) is used as is."""
    factory = resolve_reward(name)
    args = dict(args or {})
    if isinstance(factory, type) or args:
        try:
            return factory(**args)
        except TypeError as err:
            raise RewardError(f"reward {name!r}: bad args {sorted(args)} ({err})") from err
        except RewardError:
            raise
        except (ValueError, OSError, ImportError) as err:
            # A missing checkpoint, a bad argument value or a missing optional extra: one line, no traceback.
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RewardError(f"reward {name!r}: {message}") from err
    return factory


@dataclass
class RewardOutput:
    total: torch.Tensor  # (B,) weighted sum
    components: dict[str, torch.Tensor]  # name -> (B,) unweighted values


def _weight(value: Any, where: str) -> float:
    """A reward weight as a float; anything else is a one-line `RewardError`."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RewardError(f"{where}={value!r}: must be a number")
    try:
        weight = float(value)
    except ValueError:
        raise RewardError(f"{where}={value!r}: must be a number") from None
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise RewardError(f"{where}={value!r}: must be finite")
    return weight


class RewardStack(torch.nn.Module):
    """Named rewards with weights; returns the weighted total and every component (logged as `rewards/<name>/...`)."""

    def __init__(
        self,
        rewards: Mapping[str, Callable[..., torch.Tensor]],
        weights: Mapping[str, float],
        labels: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if not rewards:
            raise RewardError("no rewards configured; add at least one entry under `rewards`")
        self.names = list(rewards)
        # How error messages name each reward: as the recipe wrote it (`name`, or `alias` when given).
        self.labels = {name: (labels or {}).get(name, name) for name in self.names}
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.names}
        # nn.ModuleDict moves module rewards with .to(); plain callables are kept beside it.
        self.modules_ = torch.nn.ModuleDict({n: r for n, r in rewards.items() if isinstance(r, torch.nn.Module)})
        self.callables = {n: r for n, r in rewards.items() if not isinstance(r, torch.nn.Module)}

    @classmethod
    def from_config(cls, entries: Sequence[Mapping[str, Any]], weights: Sequence[float] | None = None) -> RewardStack:
        """Build from recipe entries `{name, weight?, args?, alias?}`; `weights` (TRL's `reward_weights`) overrides.

        Each reward is keyed (and logged) by its `alias`, else by `default_reward_name(name)`; two entries with the
        same key are a one-line error asking for an alias."""
        rewards, entry_weights, labels, index = {}, {}, {}, {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise RewardError(f"rewards[{i}]: expected a mapping with a 'name' key, got {entry!r}")
            unknown = set(entry) - {"name", "weight", "args", "alias"}
            if unknown:
                raise RewardError(
                    f"rewards[{i}]: unknown keys {sorted(unknown)}; valid keys: name, weight, args, alias"
                )
            if not isinstance(entry["name"], str) or not entry["name"]:
                raise RewardError(f"rewards[{i}].name={entry['name']!r}: must be a reward name or import path")
            if not isinstance(entry.get("args") or {}, Mapping):
                raise RewardError(f"rewards[{i}].args={entry['args']!r}: must be a mapping of argument: value")
            if "alias" in entry and (not isinstance(entry["alias"], str) or not entry["alias"]):
                raise RewardError(f"rewards[{i}].alias={entry['alias']!r}: must be a non-empty name")
            label = entry.get("alias", entry["name"])
            key = entry["alias"] if "alias" in entry else default_reward_name(entry["name"])
            if key in rewards:
                if label == labels[key]:
                    raise RewardError(f"rewards[{i}]: {key!r} appears twice; give one of them an 'alias'")
                raise RewardError(
                    f"rewards[{i}]: {label!r} is logged as {key!r}, the name of rewards[{index[key]}] "
                    f"({labels[key]!r}); give one of them an 'alias'"
                )
            rewards[key] = build_reward(entry["name"], entry.get("args"))
            entry_weights[key] = _weight(entry.get("weight", 1.0), f"rewards[{i}].weight")
            labels[key], index[key] = label, i
        if weights is not None:
            if len(weights) != len(rewards):
                raise RewardError(f"reward_weights has {len(weights)} values for {len(rewards)} rewards")
            entry_weights = {
                key: _weight(w, f"reward_weights[{j}]") for j, (key, w) in enumerate(zip(rewards, weights))
            }
        return cls(rewards, entry_weights, labels)

    def _reward(self, name: str) -> Callable[..., torch.Tensor]:
        return self.modules_[name] if name in self.modules_ else self.callables[name]

    def is_differentiable(self, name: str) -> bool:
        return bool(getattr(self._reward(name), "differentiable", False))

    @property
    def differentiable(self) -> bool:
        return all(self.is_differentiable(n) for n in self.names)

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        components = {}
        total = torch.zeros(images.shape[0], device=images.device)
        for name in self.names:
            value = torch.as_tensor(self._reward(name)(images, prompts, **context), device=images.device).float()
            if value.shape != (images.shape[0],):
                raise RewardError(
                    f"reward {self.labels[name]!r} returned shape {tuple(value.shape)}; expected ({images.shape[0]},)"
                )
            bad = (~torch.isfinite(value)).nonzero().flatten()
            if len(bad):
                i = bad[0].item()
                raise RewardError(f"reward {self.labels[name]!r} returned {value[i].item()} for prompt {prompts[i]!r}")
            components[name] = value
            total = total + self.weights[name] * value
        return RewardOutput(total=total, components=components)
