"""Which checkpoint folders a run may resume from: only those whose save finished.

transformers writes `checkpoint-N/` in place, file by file, so a kill during a save leaves a folder that looks like a
checkpoint and is not one (a truncated optimizer state, no RNG state). Once every process has written its part, the
main process adds `checkpoint_complete.json` (atomically) listing each file and its size; a folder without it, or
whose files no longer match it, is never resumed from, and is removed when the run resumes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .outputs import atomic_write_text

COMPLETE_NAME = "checkpoint_complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(folder: str | Path, global_step: int) -> None:
    """Record that `folder` holds a whole checkpoint: every file with its size, written last and atomically."""
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_NAME}
    atomic_write_text(folder / COMPLETE_NAME, json.dumps({"global_step": global_step, "files": files}, indent=1))


def incomplete_reason(folder: str | Path) -> str | None:
    """Why `folder` is not a checkpoint to resume from, or None if its save finished and its files are intact."""
    folder = Path(folder)
    try:
        record = json.loads((folder / COMPLETE_NAME).read_text())
        files = record["files"]
    except FileNotFoundError:
        return "its save did not finish (no checkpoint_complete.json)"
    except (OSError, ValueError, KeyError, TypeError):
        return "its checkpoint_complete.json is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} it was saved with"
    return None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders of a run, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose save finished, or None."""
    complete = [p for p in checkpoint_folders(output_dir) if incomplete_reason(p) is None]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete checkpoint folders whose save did not finish (a resumed run rewrites them); returns what it removed."""
    removed = [p for p in checkpoint_folders(output_dir) if incomplete_reason(p) is not None]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def rotate_complete_checkpoints(output_dir: str | Path, save_total_limit: int | None) -> None:
    """Keep the newest `save_total_limit` complete checkpoints (TRL's `save_total_limit`); None keeps all."""
    if not save_total_limit:
        return
    complete = [p for p in checkpoint_folders(output_dir) if incomplete_reason(p) is None]
    for folder in complete[:-save_total_limit]:
        shutil.rmtree(folder)
