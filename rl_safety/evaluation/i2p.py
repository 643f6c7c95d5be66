"""I2P prompts (Schramowski et al. 2023) with the seed and guidance scale each is evaluated at.

I2P fixes one seed and one guidance scale per prompt, so a nudity rate is comparable with published ones only when
images are generated with them; this loader keeps them beside each prompt. The source is a local CSV with I2P's
columns or a `datasets` id (default `AIML-TUDA/i2p`, split `train`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_safety.errors import ConfigError

from ..errors import first_line

I2P_DATASET = "AIML-TUDA/i2p"
REQUIRED_COLUMNS = ("prompt", "categories", "evaluation_seed", "evaluation_guidance", "hard")


@dataclass(frozen=True)
class I2PPrompt:
    """One I2P prompt with its evaluation seed and guidance scale, its categories and I2P's `hard` flag."""

    prompt: str
    seed: int
    guidance_scale: float
    categories: tuple[str, ...]
    hard: bool


def split_categories(value: Any) -> tuple[str, ...]:
    """I2P's comma-separated categories ("sexual, violence") as a tuple of stripped, lower-case names."""
    return tuple(c.strip().lower() for c in str(value or "").split(",") if c.strip())


def _number(value: Any, kind: type, source: str, row: int, column: str) -> Any:
    try:
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError
        return kind(number)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: row {row}, column {column!r}: {value!r} is not a {kind.__name__}") from err


def _read_rows(source: str, split: str) -> tuple[list[str], Iterable[Mapping[str, Any]]]:
    """Column names and rows of a local CSV, or of a `datasets` id's split."""
    path = Path(source).expanduser()
    if path.suffix == ".csv" or path.is_file():
        try:
            with path.open(newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                rows = list(reader)
                return list(reader.fieldnames or []), rows
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise ConfigError(f"I2P prompts {source!r}: cannot read it as a UTF-8 CSV ({err})") from err
    from datasets import load_dataset

    try:
        data = load_dataset(source, split=split)
    except (OSError, ValueError) as err:  # datasets' not-found and offline errors
        first = first_line(err)
        raise ConfigError(
            f"I2P prompts {source!r}: not a CSV file and does not load as a `datasets` id ({first})"
        ) from err
    return list(data.column_names), data


def load_i2p(
    source: str | Path = I2P_DATASET,
    categories: str | Sequence[str] | None = "sexual",
    hard_only: bool = False,
    split: str = "train",
) -> list[I2PPrompt]:
    """The prompts of `source` in any of `categories` (None: all), only I2P's `hard` ones if `hard_only`, in order."""
    source = str(source)
    wanted = (
        None
        if categories is None
        else set(split_categories(categories if isinstance(categories, str) else ",".join(categories)))
    )
    columns, rows = _read_rows(source, split)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ConfigError(
            f"I2P prompts {source!r}: missing column(s) {', '.join(missing)}; columns found: "
            f"{', '.join(columns) or 'none'}"
        )
    prompts = []
    for row_number, row in enumerate(rows, start=1):
        found = split_categories(row["categories"])
        hard = bool(_number(row["hard"], int, source, row_number, "hard"))
        if (wanted is not None and not wanted.intersection(found)) or (hard_only and not hard):
            continue
        prompts.append(
            I2PPrompt(
                prompt=str(row["prompt"]),
                seed=_number(row["evaluation_seed"], int, source, row_number, "evaluation_seed"),
                guidance_scale=_number(row["evaluation_guidance"], float, source, row_number, "evaluation_guidance"),
                categories=found,
                hard=hard,
            )
        )
    return prompts
