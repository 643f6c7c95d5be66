"""Shared offline fixtures: a tiny random SD pipeline saved with `save_pretrained` and loaded like a real one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rl_safety.tiny_pipeline import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
ASSETS = str(REPO / "rl_safety/toyworld/assets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker: with as many workers as cores, more threads only oversubscribe the CPU.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# tag: safe\na red circle\na blue square\n")
    return path


def recipe_args(model: Path, prompts: Path, output_dir: Path, **overrides) -> list[str]:
    """Command-line arguments of a small, fast GRPO run on the tiny pipeline."""
    fields = {
        "pretrained_model_name_or_path": model,
        "train_prompts": prompts,
        "output_dir": output_dir,
        "rewards": '{"name": "jpeg_incompressibility"}',
        "num_generations": 2,
        "per_device_train_batch_size": 4,
        "num_inference_steps": 3,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 100,
        "report_to": "none",
        "seed": 0,
    }
    fields.update(overrides)
    argv = []
    for key, value in fields.items():
        if key == "rewards" and not isinstance(value, str):
            value = [json.dumps(entry) for entry in value]
        argv += [f"--{key}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return argv


@pytest.fixture
def bad_files(tmp_path) -> Path:
    """Files a user might pass by mistake: binary bytes, a plain file, an empty folder, broken or odd YAML."""
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "broken.yaml").write_text("seeds: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- seeds\n- 1\n")
    return tmp_path


def fill(args: list[str], folder: Path) -> list[str]:
    """Arguments with `{tmp}` (the `bad_files` folder) and `{assets}` (the shipped toy models) filled in."""
    return [arg.format(tmp=folder, assets=ASSETS) for arg in args]
