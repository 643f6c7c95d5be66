"""Caption prompt sets for the quality metrics: COCO captions (or any captions) from a file or a `datasets` id.

Quality after erasure is measured on ordinary prompts, and COCO captions are the convention (FID and CLIP score on
a seeded sample of captions, e.g. 30k or 10k of the 2014/2017 validation set). The sample is drawn with a seed so
that two evaluations of two models use the same prompts.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from ..errors import ConfigError, first_line

CAPTION_COLUMN = "caption"
FILE_SUFFIXES = (".txt", ".csv", ".json", ".jsonl")


def _column(rows: list[Any], column: str, where: str) -> list[str]:
    """`column` of each row (mappings); a one-line error naming the columns there are when it is missing."""
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"{where}: expected records with a {column!r} column, found none")
    missing = next((row for row in rows if column not in row), None)
    if missing is not None:
        raise ConfigError(f"{where}: no {column!r} column (columns: {', '.join(map(str, missing)) or 'none'})")
    return [str(row[column]) for row in rows]


def _json_captions(path: Path, column: str, one_per_image: bool) -> list[str]:
    """Captions of a JSON list of records, or of COCO's format {"annotations": [{"image_id", "caption"}]}."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "annotations" in data:
        annotations = data["annotations"]
        captions = _column(annotations, column, f"{path} annotations")
        if one_per_image and all(isinstance(a, dict) and "image_id" in a for a in annotations):
            # COCO has about five captions per image; the usual protocol samples images, one caption each.
            first: dict[Any, str] = {}
            for annotation, caption in zip(annotations, captions):
                first.setdefault(annotation["image_id"], caption)
            return list(first.values())
        return captions
    if isinstance(data, list):
        return _column(data, column, str(path))
    keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
    raise ConfigError(f"{path}: expected a list of records or COCO's {{'annotations': [...]}}, found {keys}")


def read_captions(source: str | Path, column: str = CAPTION_COLUMN, one_per_image: bool = True) -> list[str]:
    """Every caption of a local file: `.txt` (one a line), `.csv`/`.json`/`.jsonl` records with a `column` column,
    or COCO's annotations JSON (one caption per image unless `one_per_image=False`)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ConfigError(f"{path}: captions must be a {', '.join(FILE_SUFFIXES)} file or a `datasets` id")
    try:
        if suffix == ".txt":
            captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                rows = list(reader)
                if column not in (reader.fieldnames or []):
                    found = ", ".join(reader.fieldnames or []) or "none"
                    raise ConfigError(f"{path}: no {column!r} column (columns: {found})")
            captions = [row[column] for row in rows]
        elif suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            captions = _column([json.loads(line) for line in lines if line.strip()], column, str(path))
        else:
            captions = _json_captions(path, column, one_per_image)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read captions ({first_line(err)})") from err
    return [c.strip() for c in captions if c and c.strip()]


def dataset_captions(name: str, split: str = "validation", column: str = CAPTION_COLUMN) -> list[str]:
    """`column` of a `datasets` dataset (a Hub id or a local folder `load_dataset` reads)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a bad id, split or folder
        raise ConfigError(f"captions={name!r}: cannot load split {split!r} ({first_line(err)})") from err
    if column not in dataset.column_names:
        raise ConfigError(f"captions={name!r}: no {column!r} column (columns: {', '.join(dataset.column_names)})")
    return [str(c).strip() for c in dataset[column] if c is not None and str(c).strip()]


def load_captions(
    source: str | Path,
    num: int | None = None,
    seed: int = 0,
    column: str = CAPTION_COLUMN,
    split: str = "validation",
    one_per_image: bool = True,
) -> list[str]:
    """`num` captions sampled without replacement with `seed` (all of them, in order, when `num` is None) from a
    local file (see `read_captions`) or a `datasets` id."""
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: no such captions file")
        captions = read_captions(path, column, one_per_image)
    else:
        captions = dataset_captions(str(source), split, column)
    if not captions:
        raise ConfigError(f"{source}: no captions found")
    if num is None:
        return captions
    if not 0 < num <= len(captions):
        raise ConfigError(f"{source}: asked for num={num} captions but it has {len(captions)}")
    return random.Random(seed).sample(captions, num)
