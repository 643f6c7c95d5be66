"""Checkpoints of `rl-safety classifier`: everything a killed run needs to continue to the weights it would have had.

`output_dir/checkpoint-STEP/` holds the model and its weight average (safetensors), the optimizer and scheduler
states, the RNG states (the shuffling generator at the start of the epoch, the attack/search generator, torch,
numpy, python) and `trainer_state.json` (epoch, batches done in it, the metrics logged so far and the settings
trained with). Each file is written atomically; `checkpoint_complete.json` is added last (`rl_safety/checkpoints.py`,
shared with the diffusion trainers), so a folder without it, or whose files no longer match it, is never resumed
from and is removed when the run continues.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoints import (
    checkpoint_folders,
    incomplete_reason,
    last_complete_checkpoint,
    mark_complete,
    remove_incomplete_checkpoints,
    rotate_complete_checkpoints,
)
from ..command import load_error, loading
from ..errors import ConfigError
from ..outputs import METRICS_NAME, atomic_write, atomic_write_text, holds_previous_run
from .config import ClassifierConfig

STATE_NAME = "trainer_state.json"
# What a finished run leaves (cli.py); report.json is written last and marks the run finished.
RESULT_NAMES = ("model.safetensors", "config.json", "robust_accuracy.png", "report.html", "report.json")
FINISHED_NAME = "report.json"
# Settings that change what is evaluated, logged or kept, never the trained weights: they may differ on resume.
FREE_FIELDS = {
    "eval_samples",
    "eval_pgd_steps",
    "eval_epsilons",
    "autoattack",
    "autoattack_epsilons",
    "eval_batch_size",
    "logging_steps",
    "output_dir",
    "overwrite_output_dir",
    "save_steps",
    "save_total_limit",
    "resume_from_checkpoint",
}


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_weights(folder: Path, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None) -> None:
    """model.safetensors (the trained weights) and ema.safetensors (their average, with its update count)."""
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(_tensors(model), tmp))
    if ema is not None:
        atomic_write(folder / "ema.safetensors", lambda tmp: save_file(_tensors(ema), tmp))


def save_optimizer_and_scheduler(folder: Path, optimizer: dict, scheduler: dict) -> None:
    """optimizer.pt (SGD's momentum buffers) and scheduler.pt (OneCycle's position)."""
    atomic_write(folder / "optimizer.pt", lambda tmp: torch.save(optimizer, tmp))
    atomic_write(folder / "scheduler.pt", lambda tmp: torch.save(scheduler, tmp))


def rng_states(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The given generators' states and the global ones, in types `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {f"generator_{name}": g.get_state() for name, g in generators.items()}
    states.update(
        torch=torch.get_rng_state(),
        numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        python=random.getstate(),
    )
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """The inverse of `rng_states`."""
    for name, generator in generators.items():
        generator.set_state(states[f"generator_{name}"])
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_rng_state(folder: Path, states: dict[str, Any]) -> None:
    """rng_state.pth: see `rng_states`."""
    atomic_write(folder / "rng_state.pth", lambda tmp: torch.save(states, tmp))


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """trainer_state.json: where the loop stands, the metrics so far and the settings trained with."""
    atomic_write_text(folder / STATE_NAME, json.dumps(state, indent=1) + "\n")


def write_checkpoint(output_dir: Path, step: int, parts: dict[str, Any], save_total_limit: int | None) -> Path:
    """`checkpoint-STEP/` from `parts` (see `ClassifierTrainer.checkpoint_parts`), marked complete once every file is
    written; then older complete checkpoints beyond `save_total_limit` are deleted. Main process only."""
    folder = output_dir / f"checkpoint-{step}"
    if folder.exists():
        shutil.rmtree(folder)  # the remains of an interrupted save of this step
    folder.mkdir(parents=True)
    save_weights(folder, parts["model"], parts["ema"])
    save_optimizer_and_scheduler(folder, parts["optimizer"], parts["scheduler"])
    save_rng_state(folder, parts["rng"])
    save_trainer_state(folder, parts["state"])
    mark_complete(folder, step)
    # Only now: deleting the previous checkpoint before this one is whole would leave nothing to resume from.
    rotate_complete_checkpoints(output_dir, save_total_limit)
    return folder


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The parts `write_checkpoint` saved; a file that does not load is a one-line error naming the folder."""
    field = "resume_from_checkpoint"
    try:
        with loading(field, str(folder)):
            return {
                "state": json.loads((folder / STATE_NAME).read_text()),
                "model": load_file(str(folder / "model.safetensors")),
                "ema": load_file(str(folder / "ema.safetensors")) if (folder / "ema.safetensors").exists() else None,
                "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
                "scheduler": torch.load(folder / "scheduler.pt", weights_only=True),
                "rng": torch.load(folder / "rng_state.pth", weights_only=True),
            }
    except (pickle.UnpicklingError, EOFError) as err:  # torch.load's own failures, outside `loading`'s list
        raise load_error(field, str(folder), err) from err


def trained_with(config: ClassifierConfig, world_size: int, num_train: int, image_shape: list[int]) -> dict:
    """The settings that decide the trained weights, as a checkpoint records them."""
    from ..outputs import config_dict

    settings = {k: v for k, v in config_dict(config).items() if k not in FREE_FIELDS}
    return {**settings, "world_size": world_size, "num_train": num_train, "image_shape": list(image_shape)}


def check_compatible(folder: Path, recorded: dict, now: dict) -> None:
    """A checkpoint continues only the run it came from: every setting that decides the weights must be the same."""
    differ = [k for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{k}={recorded.get(k)!r} there, {now.get(k)!r} now" for k in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise ConfigError(
            f"resume_from_checkpoint={str(folder)!r}: trained with other settings: {shown}{more}; resume with the "
            "settings it was trained with, or pass --overwrite_output_dir to start again"
        )


def holds_run(output_dir: Path) -> bool:
    """output_dir holds a run's files: a recipe, metrics, checkpoints or results (e.g. a shipped model folder)."""
    return holds_previous_run(output_dir) or any((output_dir / name).exists() for name in RESULT_NAMES)


def continues_last(config: ClassifierConfig) -> bool:
    """`resume_from_checkpoint: last` (or `true`, as transformers spells it)."""
    return str(config.resume_from_checkpoint).lower() in ("last", "true")


def resolve_resume(config: ClassifierConfig) -> Path | None:
    """`resume_from_checkpoint` as a complete checkpoint folder, or None to start from step 0 (also for `last` when
    the run was killed before its first checkpoint was complete). Refuses what cannot be continued, before any work."""
    value, output_dir = config.resume_from_checkpoint, Path(config.output_dir)
    if value is None or str(value).lower() in ("", "false", "none"):
        if holds_run(output_dir) and not config.overwrite_output_dir:
            raise ConfigError(
                f"output_dir={str(output_dir)!r} holds a previous run; pass --overwrite_output_dir to replace it or "
                "--resume_from_checkpoint last to continue it"
            )
        return None
    if continues_last(config):
        if (output_dir / FINISHED_NAME).exists():
            raise ConfigError(
                f"resume_from_checkpoint={value}: output_dir={str(output_dir)!r} holds a finished run "
                f"({FINISHED_NAME}); nothing to continue: drop resume_from_checkpoint and pass --overwrite_output_dir "
                "to train it again"
            )
        if not holds_run(output_dir):
            raise ConfigError(
                f"resume_from_checkpoint={value}: output_dir={str(output_dir)!r} holds no run to continue; "
                "leave resume_from_checkpoint unset to start one"
            )
        return last_complete_checkpoint(output_dir)
    folder = Path(value)
    if not folder.is_dir() or not (folder.name.startswith("checkpoint-") or (folder / STATE_NAME).exists()):
        raise ConfigError(
            f"resume_from_checkpoint={value!r}: not a checkpoint folder (output_dir/checkpoint-STEP), or use 'last'"
        )
    reason = incomplete_reason(folder)
    if reason:
        raise ConfigError(
            f"resume_from_checkpoint={value!r}: not a complete checkpoint ({reason}); 'last' picks the newest "
            "complete one"
        )
    if not (folder / STATE_NAME).is_file():
        raise ConfigError(f"resume_from_checkpoint={value!r}: not a classifier checkpoint (no {STATE_NAME})")
    return folder


def prepare_output_dir(output_dir: Path, resume: Path | None, log_history: list[dict]) -> None:
    """Make output_dir ready for training, once every input was checked: results of an earlier attempt go (they are
    all written again at the end); a fresh start also clears checkpoints and metrics; a resumed run drops
    half-written and later checkpoints and rewrites metrics.jsonl as the checkpoint logged it, so it reads as one
    uninterrupted run (a torn last line included). Main process only."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_NAMES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "images", ignore_errors=True)
    if resume is None:
        for folder in checkpoint_folders(output_dir):
            shutil.rmtree(folder)
        (output_dir / METRICS_NAME).unlink(missing_ok=True)
        return
    if resume.parent.resolve() == output_dir.resolve():
        step = int(resume.name.rsplit("-", 1)[1])
        for folder in checkpoint_folders(output_dir):  # a resumed run writes those steps again
            if int(folder.name.rsplit("-", 1)[1]) > step:
                shutil.rmtree(folder)
    remove_incomplete_checkpoints(output_dir)
    atomic_write_text(output_dir / METRICS_NAME, "".join(json.dumps(row) + "\n" for row in log_history))


def remove_checkpoints(output_dir: Path) -> None:
    """A finished run's checkpoints: its results are written, nothing is left to continue."""
    for folder in checkpoint_folders(output_dir):
        shutil.rmtree(folder)
