"""Checks shared by the commands' configs: devices, seeds and output folders, tested before any work starts.

They raise `ValueError` with `field=value: what is valid`, as a config's `__post_init__` does; the parser and
`run_command` turn it into one line (see `command.py`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


def check_device(value: str | None, field: str = "device") -> None:
    """`None` (pick one), or a torch device this machine has."""
    if value is None:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{field}={value!r}: not a torch device; e.g. cpu, cuda, cuda:1, mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}={value!r}: CUDA is not available on this machine; use cpu or leave it unset")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{field}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field}={value!r}: MPS is not available on this machine; use cpu or leave it unset")


def check_seeds(seeds: Sequence[int], field: str = "seeds") -> None:
    """At least one seed, none negative, none repeated (a repeated seed would count the same images twice)."""
    if not seeds:
        raise ValueError(f"{field}: must list at least one seed")
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"{field}={list(seeds)}: seeds must be ≥ 0")
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise ValueError(f"{field}={list(seeds)}: repeats {', '.join(map(str, repeated))}; list each seed once")


def check_output_folder(value: str | Path, field: str = "output_dir") -> None:
    """A folder that exists or can be created here and written to; checked up front so a run does not fail at its
    very end, after all the work, when it writes its results."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{field}={str(value)!r}: is a file, not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{field}={str(value)!r}: {str(parent)!r} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{field}={str(value)!r}: {str(parent)!r} is not writable")


MAX_SEED = 2**32 - 1  # numpy's limit; torch's is larger, and seeds derived from one (seed * k + step) stay in range


def check_seed(value: int, field: str = "seed") -> None:
    """One seed in [0, 2**32 - 1]."""
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{field}={value!r}: must be in [0, {MAX_SEED}]")


def check_fields(values: object, *rules: tuple[bool, str, str]) -> None:
    """Raise `ValueError("<field>=<value>: <rule>")` for the first rule that does not hold; `values` is a config or
    an argparse namespace holding the fields."""
    for ok, name, rule in rules:
        if not ok:
            raise ValueError(f"{name}={getattr(values, name)!r}: {rule}")
