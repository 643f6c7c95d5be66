"""Training killed at any moment — between steps, inside a checkpoint save, by Ctrl-C — and resumed with
`--resume_from_checkpoint last` ends with the adapter of an uninterrupted run; a half-written checkpoint is never
resumed from."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rl_safety.checkpoints import (
    COMPLETE_NAME,
    incomplete_reason,
    last_complete_checkpoint,
    mark_complete,
    remove_incomplete_checkpoints,
    rotate_complete_checkpoints,
)
from rl_safety.cli import main
from tests.conftest import REPO, recipe_args

ADAPTER = "pytorch_lora_weights.safetensors"
RUN = dict(max_steps=6, save_steps=1, save_total_limit=2)

# Runs the console entry point with one fault injected: the process kills itself (SIGKILL: no cleanup, no
# `finally`) at the N-th call of a function that runs inside a checkpoint save, after writing part of a file.


def default_sigint() -> None:
    """A child inherits an ignored SIGINT (a test runner or an earlier test may ignore it) and Python then installs
    no KeyboardInterrupt handler: Ctrl-C must reach the child as a user's terminal would deliver it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


KILLING_WRAPPER = """
import importlib, os, signal, sys

path, attr = os.environ["KILL_IN"].rsplit(".", 1)  # "package.module:Class.method" or "package.module.function"
module, _, cls = path.partition(":")
owner = importlib.import_module(module) if not cls else getattr(importlib.import_module(module), cls)
original, calls = getattr(owner, attr), [0]


def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_CALL"]):
        folders = [a for a in args if isinstance(a, (str, os.PathLike)) and "checkpoint-" in str(a)]
        if folders:  # a torn file, as a kill in the middle of a write leaves
            with open(os.path.join(folders[0], "torn.bin"), "wb") as handle:
                handle.write(bytes(100))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


setattr(owner, attr, killing)
from rl_safety.cli import main

sys.exit(main(sys.argv[1:]))
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd_path, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("straight")
    prompts = folder / "prompts.txt"
    prompts.write_text("# tag: safe\na red circle\na blue square\n")
    assert main(["train", *recipe_args(tiny_sd_path, prompts, folder / "run", **RUN)]) == 0
    return {"prompts": prompts, "adapter": load_file(folder / "run" / ADAPTER), "steps": logged_steps(folder / "run")}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(run_dir: Path, reference: dict) -> None:
    resumed = load_file(run_dir / ADAPTER)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert resumed[key].equal(reference[key]), key


def test_only_complete_checkpoints_are_resumed(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").write_bytes(b"x" * 10)
    mark_complete(run / "checkpoint-1", 1)
    mark_complete(run / "checkpoint-2", 2)
    assert last_complete_checkpoint(run) == run / "checkpoint-2"  # checkpoint-3's save never finished
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 4)  # truncated after the mark
    assert "optimizer.pt has 4 bytes, not the 10" in incomplete_reason(run / "checkpoint-2")
    assert last_complete_checkpoint(run) == run / "checkpoint-1"
    (run / "checkpoint-1" / COMPLETE_NAME).write_text("{")
    assert "unreadable" in incomplete_reason(run / "checkpoint-1")
    assert last_complete_checkpoint(run) is None
    mark_complete(run / "checkpoint-1", 1)
    assert remove_incomplete_checkpoints(run) == [run / "checkpoint-2", run / "checkpoint-3"]
    assert [p.name for p in run.iterdir()] == ["checkpoint-1"]


def test_rotation_keeps_complete_checkpoints_only(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 4:
            mark_complete(tmp_path / f"checkpoint-{step}", step)
    rotate_complete_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


@pytest.mark.parametrize(
    "kill_in, at_call",
    [
        ("transformers.trainer:Trainer._save_optimizer_and_scheduler", 3),  # checkpoint-3, mid-save
        ("transformers.trainer:Trainer._save_rng_state", 4),  # checkpoint-4, after model and optimizer
        ("rl_safety.trainers.base.mark_complete", 2),  # checkpoint-2 written whole, not yet marked
    ],
)
def test_kill_inside_a_checkpoint_save_resumes_to_the_same_adapter(
    tiny_sd_path, tmp_path, uninterrupted, kill_in, at_call
):
    run = tmp_path / "run"
    argv = recipe_args(tiny_sd_path, uninterrupted["prompts"], run, **RUN)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(KILLING_WRAPPER)
    killed = subprocess.run(
        [sys.executable, str(wrapper), "train", *argv],
        env={**env(), "KILL_IN": kill_in, "KILL_AT_CALL": str(at_call)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / ADAPTER).exists()
    interrupted = run / f"checkpoint-{at_call}"
    assert interrupted.is_dir() and incomplete_reason(interrupted) is not None  # on disk, but not trusted
    assert last_complete_checkpoint(run) == run / f"checkpoint-{at_call - 1}"

    assert main(["train", *argv, "--resume_from_checkpoint", "last"]) == 0
    assert_same_adapter(run, uninterrupted["adapter"])
    assert not (run / f"checkpoint-{at_call}" / "torn.bin").exists()
    assert logged_steps(run) == uninterrupted["steps"]  # metrics.jsonl reads as one uninterrupted run


def wait_for_write(path: Path, since: float, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_mtime > since):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_kills_at_random_moments_and_ctrl_c_resume_to_the_same_adapter(tiny_sd_path, tmp_path, uninterrupted):
    """SIGINT first (one line, exit 130), then SIGKILLs at seeded random moments once training has begun; each
    relaunch is the same command with `--resume_from_checkpoint last`."""
    run = tmp_path / "run"
    argv = ["train", *recipe_args(tiny_sd_path, uninterrupted["prompts"], run, **RUN)]
    rng = random.Random(1234)
    for attempt, sig in enumerate((signal.SIGINT, signal.SIGKILL, signal.SIGKILL)):
        resume = ["--resume_from_checkpoint", "last"] if attempt else []
        launched = time.time()
        process = subprocess.Popen(
            [sys.executable, "-m", "rl_safety.cli", *argv, *resume],
            env=env(),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        # The run has loaded and begun: metrics.jsonl is (re)written at start-up and after every logged step.
        wait_for_write(run / "metrics.jsonl", launched, process)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
        if process.returncode == 0:
            break  # the run finished before the signal: nothing left to interrupt
        if sig == signal.SIGINT:
            assert process.returncode == 130, stderr[-2000:]
            last = stderr.strip().splitlines()[-1]
            assert last.startswith("rl-safety train: interrupted; add --resume_from_checkpoint last"), last
            assert "Traceback" not in stderr
        else:
            assert process.returncode == -signal.SIGKILL
    assert main([*argv, "--resume_from_checkpoint", "last"]) == 0
    assert_same_adapter(run, uninterrupted["adapter"])
    assert logged_steps(run) == uninterrupted["steps"]
