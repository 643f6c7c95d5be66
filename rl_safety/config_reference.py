"""The README's configuration reference, generated from the dataclasses' help strings.

python -m rl_safety.config_reference   # prints the markdown block that README.md must contain
"""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from .grpo_config import DiffusionGRPOConfig
from .model_config import ModelArguments
from .prompt_config import PromptArguments
from .toyworld.eval_config import ToyWorldEvalConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()}`"
    return f"`{field.default}`"


def _rows(cls, own_only: bool) -> list[str]:
    inherited = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    rows = []
    for field in dataclasses.fields(cls):
        if own_only and field.name in inherited and field.default == inherited[field.name].default:
            continue
        help_text = field.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{field.name}` | {_default(field)} | {help_text} |")
    return rows


def reference() -> str:
    parts = [BEGIN]
    for title, cls, own_only in (
        ("Model (`ModelArguments`)", ModelArguments, False),
        ("Prompts (`PromptArguments`)", PromptArguments, False),
        (
            "GRPO (`DiffusionGRPOConfig`; every other `transformers.TrainingArguments` field works too)",
            DiffusionGRPOConfig,
            True,
        ),
        ("Evaluation (`ToyWorldEvalConfig`, read by `rl-safety eval`)", ToyWorldEvalConfig, False),
    ):
        parts += [f"**{title}**", "", "| field | default | meaning |", "|---|---|---|", *_rows(cls, own_only), ""]
    parts.append(END)
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference())
