"""Prompt sets: plain-text files with a tag header, tabular files, or `datasets` Hub ids → one `datasets.Dataset`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import datasets
from datasets import Dataset, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError

from .errors import ConfigError
from .prompt_config import PromptArguments
from .resources import resolve_path, tried

TABULAR = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_prompt_file(path: str | Path, default_tag: str = "default") -> tuple[list[str], str]:
    """Prompts of a '.txt' file (one per line; '#' lines are comments) and its tag ('# tag: <tag>' header)."""
    prompts, tag = [], default_tag
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from err
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            key, _, value = line.lstrip("#").partition(":")
            if key.strip().lower() == "tag" and value.strip():
                tag = value.strip()
        elif line:
            prompts.append(line)
    return prompts, tag


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars or logged tracebacks from `datasets` while a small local file loads: a file it cannot parse
    is reported once, as our own one-line error."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load_source(source: str, args: PromptArguments) -> Dataset:
    path = Path(resolve_path(source, "file"))  # as given, or the shipped prompts/... (rl_safety/resources.py)
    if path.suffix == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"train_prompts: no prompt file {source!r}{tried(source)}")
        prompts, tag = read_prompt_file(path, args.default_tag)
        return Dataset.from_dict({"prompt": prompts, "tag": [tag] * len(prompts)})
    if path.suffix in TABULAR:
        if not path.is_file():
            raise FileNotFoundError(f"train_prompts: no prompt file {source!r}{tried(source)}")
        try:
            with quiet_datasets():
                data = load_dataset(TABULAR[path.suffix], data_files=str(path), split="train")
        except (OSError, ValueError, DatasetGenerationError) as err:
            cause = err.__cause__ or err  # datasets wraps the parser's own error, which says what is wrong
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ValueError(f"train_prompts: {source!r} does not parse as {path.suffix[1:]} ({first})") from err
    else:
        try:
            data = load_dataset(source, split=args.dataset_train_split)
        except (OSError, ValueError) as err:  # datasets' FileNotFoundError, DatasetNotFoundError, offline errors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"train_prompts: {source!r} is not a prompt file (.txt, {', '.join(TABULAR)}) and does not load "
                f"as a `datasets` id or folder ({first})"
            ) from err
    if args.prompt_column not in data.column_names:
        raise ValueError(
            f"train_prompts: {source!r} has no column {args.prompt_column!r} (prompt_column); "
            f"columns: {', '.join(data.column_names)}"
        )
    tags = data[args.tag_column] if args.tag_column in data.column_names else [args.default_tag] * len(data)
    return Dataset.from_dict({"prompt": list(data[args.prompt_column]), "tag": list(tags)})


def load_prompts(args: PromptArguments) -> Dataset:
    """All sources concatenated into a Dataset with columns `prompt` and `tag`."""
    if not args.train_prompts:
        raise ValueError("train_prompts: empty; give at least one prompt file or dataset id")
    dataset = concatenate_datasets([_load_source(source, args) for source in args.train_prompts])
    if len(dataset) == 0:
        raise ValueError(f"train_prompts: {args.train_prompts} hold no prompts")
    return dataset
