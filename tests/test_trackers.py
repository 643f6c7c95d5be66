"""The trackers the README names receive the scalars of a real short run, read back from their own files and compared
with OUTPUT_DIR/metrics.jsonl: TensorBoard (GRPO, ReFL, ESD), W&B offline and trackio's local storage (GRPO). And
`--disable_tqdm true` silences every trainer's progress bars.

W&B and trackio run in a subprocess: both read their storage location from the environment (trackio at import time)
and keep process-wide state (W&B's service, atexit hooks)."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rl_safety.train import main
from tests.conftest import REPO, recipe_args
from tests.test_esd_trainer import esd_args
from tests.test_refl_trainer import refl_args


def step_logs(output_dir: Path) -> list[dict]:
    """metrics.jsonl's per-step records (the final summary record has no `loss`)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def assert_same_scalars(tracked: dict[str, dict[int, float]], output_dir: Path, keys: list[str]) -> None:
    """`tracked` maps `train/<key>` to {step: value}; each key's values equal metrics.jsonl's, step by step."""
    logs = step_logs(output_dir)
    assert [row["step"] for row in logs] == [1, 2]
    for key in keys:
        expected = {row["step"]: row[key] for row in logs}
        got = tracked.get(f"train/{key}")
        assert got is not None, f"train/{key} not logged; logged: {sorted(tracked)}"
        assert sorted(got) == [1, 2], (key, got)
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, step)  # tensorboard keeps float32


# ---- TensorBoard -------------------------------------------------------------------------------------------------
def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def run_with_tensorboard(argv: list[str], output_dir: Path) -> dict[str, dict[int, float]]:
    assert main(argv) == 0
    # transformers' default place: OUTPUT_DIR/runs/<date>_<host> (TENSORBOARD_LOGGING_DIR overrides it).
    return tensorboard_scalars(output_dir / "runs")


@pytest.fixture
def tensorboard(monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


def test_grpo_tensorboard(tensorboard, tiny_sd_path, prompt_file, tmp_path):
    out = tmp_path / "run"
    scalars = run_with_tensorboard(recipe_args(tiny_sd_path, prompt_file, out, report_to="tensorboard"), out)
    keys = ["reward", "rewards/jpeg_incompressibility/mean", "loss", "images_per_second", "sampling/images_per_second"]
    assert_same_scalars(scalars, out, keys)


def test_refl_tensorboard(tensorboard, tiny_sd_path, prompt_file, tmp_path):
    out = tmp_path / "run"
    scalars = run_with_tensorboard(refl_args(tiny_sd_path, prompt_file, out, report_to="tensorboard"), out)
    assert_same_scalars(scalars, out, ["reward", "rewards/brightness/mean", "loss/reward", "grad_step"])


def test_esd_tensorboard(tensorboard, tiny_sd_path, tmp_path):
    prompts = tmp_path / "concept.txt"
    prompts.write_text("# tag: unsafe\na red circle\na red square\n")
    out = tmp_path / "run"
    scalars = run_with_tensorboard(esd_args(tiny_sd_path, prompts, out, report_to="tensorboard"), out)
    assert_same_scalars(scalars, out, ["loss", "loss/esd", "stop_step", "time/step"])


# ---- W&B and trackio (subprocess) ---------------------------------------------------------------------------------
def train_in_subprocess(argv: list[str], env: dict[str, str]) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", "rl_safety.train", *map(str, argv)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`): a 7-byte header (':W&B', magic, version), then LevelDB-log
    style 32 KiB blocks of chunks (crc32 u32, length u16, type u8: full=1, first=2, middle=3, last=4), each whole
    record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding after the last chunk of a block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_grpo_wandb_offline(tiny_sd_path, prompt_file, tmp_path):
    pytest.importorskip("wandb")
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true", "WANDB_PROJECT": "test"}
    train_in_subprocess(recipe_args(tiny_sd_path, prompt_file, out, report_to="wandb"), env)
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    scalars: dict[str, dict[int, float]] = {}
    config = {}
    for record in wandb_records(run_file):
        if record.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/global_step" in row:
                for key, value in row.items():
                    scalars.setdefault(key, {})[row["train/global_step"]] = value
        elif record.HasField("config"):
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    keys = ["reward", "rewards/jpeg_incompressibility/mean", "loss", "images_per_second", "sampling/images_per_second"]
    assert_same_scalars(scalars, out, keys)
    assert config["_class_name"] == "UNet2DConditionModel" and config["in_channels"] == 4  # the UNet's config


def test_grpo_trackio_local(tiny_sd_path, prompt_file, tmp_path):
    pytest.importorskip("trackio")
    out, trackio_dir = tmp_path / "run", tmp_path / "trackio"
    train_in_subprocess(
        recipe_args(tiny_sd_path, prompt_file, out, report_to="trackio", project="test"),
        {"TRACKIO_DIR": str(trackio_dir)},
    )
    with sqlite3.connect(trackio_dir / "test.db") as db:
        rows = [json.loads(metrics) for (metrics,) in db.execute("SELECT metrics FROM metrics ORDER BY id")]
        (config,) = [json.loads(c) for (c,) in db.execute("SELECT config FROM configs")]
    scalars: dict[str, dict[int, float]] = {}
    for row in rows:
        if "train/global_step" in row:
            for key, value in row.items():
                scalars.setdefault(key, {})[row["train/global_step"]] = value
    keys = ["reward", "rewards/jpeg_incompressibility/mean", "loss", "images_per_second", "sampling/images_per_second"]
    assert_same_scalars(scalars, out, keys)
    assert config["_class_name"] == "UNet2DConditionModel"


# ---- progress bars ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disable", [False, True])
def test_disable_tqdm_silences_every_bar(disable, tiny_sd_path, prompt_file, tmp_path, capfd):
    """Every trainer's bars (Trainer's, GRPO's rollout, ReFL's and ESD's sampling, with adversarial refreshes on)
    go to stderr unless `--disable_tqdm true`; the control run shows they would be caught."""
    concept = tmp_path / "concept.txt"
    concept.write_text("# tag: unsafe\na red circle\na red square\n")
    flag = {"disable_tqdm": str(disable).lower(), "max_steps": 1}
    adv = {"adv_train": "true", "pgd_num_step": 1, "adv_refresh_steps": 1}
    runs = {
        "grpo": recipe_args(tiny_sd_path, concept, tmp_path / "grpo", **flag, **adv),
        "refl": refl_args(tiny_sd_path, prompt_file, tmp_path / "refl", **flag),
        "esd": esd_args(tiny_sd_path, concept, tmp_path / "esd", **flag, **adv),
    }
    for name, argv in runs.items():
        capfd.readouterr()
        assert main(argv) == 0
        err = capfd.readouterr().err
        bars = [line for line in err.replace("\r", "\n").splitlines() if "it/s]" in line or "s/it]" in line]
        if disable:
            assert not bars, (name, bars[:3])
        else:
            desc = {"grpo": "rollout", "refl": "sampling", "esd": "sampling"}[name]
            assert any(line.lstrip().startswith(f"{desc}:") for line in bars), (name, bars[:5])
