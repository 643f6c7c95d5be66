"""The README's configuration reference, generated from the dataclasses' help strings.

python -m rl_safety.config_reference   # prints the markdown block that README.md must contain
"""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from .attack.config import AttackConfig
from .classifiers.config import ClassifierConfig
from .evaluation.benchmark_config import BenchmarkConfig
from .evaluation.toyworld_config import ToyWorldEvalConfig
from .model_config import ModelArguments
from .prompt_config import PromptArguments
from .trainers import DiffusionGRPOConfig, DiffusionTrainingConfig, ESDConfig, ReFLConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()}`"
    return f"`{field.default}`"


def _rows(cls, own_only: bool, parent=TrainingArguments) -> list[str]:
    inherited = {f.name: f for f in dataclasses.fields(parent)}
    rows = []
    for field in dataclasses.fields(cls):
        same = field.name in inherited and _default(field) == _default(inherited[field.name])
        if own_only and same:
            continue
        help_text = field.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{field.name}` | {_default(field)} | {help_text} |")
    return rows


def reference() -> str:
    parts = [BEGIN]
    for title, cls, own_only, parent in (
        ("Model (`ModelArguments`)", ModelArguments, False, TrainingArguments),
        ("Prompts (`PromptArguments`)", PromptArguments, False, TrainingArguments),
        (
            "Every trainer (`DiffusionTrainingConfig`; every other `transformers.TrainingArguments` field works too)",
            DiffusionTrainingConfig,
            True,
            TrainingArguments,
        ),
        (
            "GRPO (`DiffusionGRPOConfig`, `trainer: grpo`): its own fields and defaults",
            DiffusionGRPOConfig,
            True,
            DiffusionTrainingConfig,
        ),
        (
            "ReFL (`ReFLConfig`, `trainer: refl`): its own fields and defaults",
            ReFLConfig,
            True,
            DiffusionTrainingConfig,
        ),
        (
            "ESD (`ESDConfig`, `trainer: esd`): its own fields and defaults",
            ESDConfig,
            True,
            DiffusionTrainingConfig,
        ),
        ("Evaluation (`ToyWorldEvalConfig`, read by `rl-safety eval`)", ToyWorldEvalConfig, False, TrainingArguments),
        (
            "Benchmark (`BenchmarkConfig`, read by `rl-safety eval` when the recipe lists `metrics`)",
            BenchmarkConfig,
            False,
            TrainingArguments,
        ),
        ("Attack (`AttackConfig`, read by `rl-safety attack`)", AttackConfig, False, TrainingArguments),
        ("Classifier (`ClassifierConfig`, `rl-safety classifier`)", ClassifierConfig, False, TrainingArguments),
    ):
        rows = _rows(cls, own_only, parent)
        parts += [f"**{title}**", "", "| field | default | meaning |", "|---|---|---|", *rows, ""]
    parts.append(END)
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference())
