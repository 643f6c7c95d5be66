"""`rl-safety classifier` killed at any point — between steps, inside a checkpoint save, during the evaluation, by
Ctrl-C — and continued with `--resume_from_checkpoint last` ends with the weights, metrics and report of an
uninterrupted run; a half-written checkpoint is never resumed from."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from rl_safety.checkpoints import incomplete_reason, last_complete_checkpoint
from rl_safety.cli import main
from tests.conftest import REPO

# 40 training images in batches of 8: 5 steps an epoch, 15 in all; DyART from epoch 2 (its boundary search draws from
# the generator the checkpoints keep). Checkpoints at steps 3, 6, 9 and 12 (inside epochs) and 15 (the last).
SETTINGS = ["--method", "dyart", "--burn_in_epochs", "1", "--num_train_epochs", "3", "--per_device_train_batch_size"]
SETTINGS += ["8", "--width", "4", "--epsilon", "0.1", "--dyart_search_steps", "3", "--max_grad_norm", "5"]
SETTINGS += ["--eval_samples", "8", "--autoattack", "false", "--eval_pgd_steps", "2", "--logging_steps", "2"]
SETTINGS += ["--dyart_r0", "0.9", "--ema_decay", "0.9", "--save_steps", "3", "--save_total_limit", "1"]
RESUME = ["--resume_from_checkpoint", "last"]

# Runs the console entry point with one fault injected: at the N-th call of a function (inside a checkpoint save,
# the training step or the evaluation) the process kills itself (SIGKILL: no cleanup, no `finally`) or sends itself
# Ctrl-C (SIGINT). A kill inside a save first leaves a torn file in the checkpoint folder, as a kill mid-write would.


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
sig = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))


def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_CALL"]):
        folders = [a for a in args if isinstance(a, (str, os.PathLike)) and "checkpoint-" in str(a)]
        if folders and sig == signal.SIGKILL:
            with open(os.path.join(folders[0], "torn.bin"), "wb") as handle:
                handle.write(bytes(100))
        os.kill(os.getpid(), sig)
    return original(*args, **kwargs)


setattr(owner, attr, killing)
from rl_safety.cli import main

sys.exit(main(sys.argv[1:]))
"""

SAVE = "rl_safety.classifiers.checkpoint"
# name: (function, its call that is interrupted, signal, the newest complete checkpoint left, the torn one)
KILLS = {
    "inside_optimizer_save": (f"{SAVE}.save_optimizer_and_scheduler", 2, "SIGKILL", 3, 6),
    "inside_rng_save": (f"{SAVE}.save_rng_state", 3, "SIGKILL", 6, 9),
    "before_the_mark": (f"{SAVE}.mark_complete", 4, "SIGKILL", 9, 12),
    "between_checkpoints": ("rl_safety.classifiers.trainer:ClassifierTrainer._step", 8, "SIGKILL", 6, None),
    "during_evaluation": ("rl_safety.classifiers.evaluate.evaluate_robustness", 1, "SIGKILL", 15, None),
    "ctrl_c_inside_a_save": (f"{SAVE}.save_weights", 2, "SIGINT", 3, 6),
}


def blobs(num: int = 50, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: a bright left or right half, in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, num)
    x = rng.normal(0.4, 0.1, (num, size, size, 1))
    for i in range(num):
        x[i, :, size // 2 :] += 0.3 * y[i]
        x[i, :, : size // 2] += 0.3 * (1 - y[i])
    return (x.clip(0, 1) * 255).astype(np.uint8), y.astype(np.int64)


def argv(data: Path, run: Path) -> list[str]:
    return ["classifier", "--data", str(data), "--output_dir", str(run), *SETTINGS]


def result(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    for timing in ("train_seconds", "eval_seconds"):
        report.pop(timing)
    return {
        "weights": load_file(run / "model.safetensors"),
        "metrics": (run / "metrics.jsonl").read_text(),
        "report": report,
        "config": json.loads((run / "config.json").read_text()),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted run, and every interrupted one (launched together: each spends most of its time importing)."""
    root = tmp_path_factory.mktemp("classifier-resume")
    data = root / "blobs.npz"
    x, y = blobs()
    np.savez(data, x=x, y=y)
    wrapper = root / "wrapper.py"
    wrapper.write_text(KILLING_WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    processes = {}
    for name, (kill_in, at_call, sig, _, _) in KILLS.items():
        processes[name] = subprocess.Popen(
            [sys.executable, str(wrapper), *argv(data, root / name)],
            env={**env, "KILL_IN": kill_in, "KILL_AT_CALL": str(at_call), "KILL_SIGNAL": sig},
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
    assert main(argv(data, root / "straight")) == 0
    killed = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        killed[name] = (process.returncode, stderr)
    shutil.copytree(root / "between_checkpoints", root / "settings_changed")  # for the last test, not resumed
    return {"data": data, "root": root, "straight": result(root / "straight"), "killed": killed}


@pytest.mark.parametrize("name", list(KILLS))
def test_interrupted_run_resumes_to_the_uninterrupted_result(runs, name, capsys):
    _, _, sig, last_step, torn_step = KILLS[name]
    run = runs["root"] / name
    code, stderr = runs["killed"][name]
    if sig == "SIGINT":
        assert code == 130, stderr[-2000:]
        assert "Traceback" not in stderr
        line = stderr.strip().splitlines()[-1]
        assert line == (
            "rl-safety classifier: interrupted; add --resume_from_checkpoint last to the same command to continue "
            "from the last complete checkpoint"
        )
    else:
        assert code == -signal.SIGKILL, stderr[-2000:]
    assert not (run / "report.json").exists()  # nothing a later reader takes for a finished run
    assert last_complete_checkpoint(run) == run / f"checkpoint-{last_step}"
    if torn_step is not None:  # on disk, but never trusted
        assert incomplete_reason(run / f"checkpoint-{torn_step}") is not None

    # One run names its checkpoint; the others continue from `last`.
    resume = [RESUME[0], str(run / f"checkpoint-{last_step}")] if name == "between_checkpoints" else RESUME
    assert main([*argv(runs["data"], run), *resume]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / f'checkpoint-{last_step}'} (step {last_step} of 15)" in out
    resumed, straight = result(run), runs["straight"]
    assert resumed["weights"].keys() == straight["weights"].keys()
    for key, tensor in straight["weights"].items():
        assert resumed["weights"][key].equal(tensor), key
    assert resumed["metrics"] == straight["metrics"]  # metrics.jsonl reads as one uninterrupted run
    assert resumed["report"] == straight["report"] and resumed["config"] == straight["config"]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (runs["root"] / "straight").iterdir())


def test_last_without_a_complete_checkpoint_starts_again(runs, capsys):
    """Killed before its first checkpoint was marked complete: `last` starts from step 0, and clears the remains."""
    run = runs["root"] / "killed_early"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "model.safetensors").write_bytes(b"torn")
    (run / "config.yaml").write_text("method: dyart\n")
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 0.5}\n{"step": 3, "lo')  # a torn last line
    assert main([*argv(runs["data"], run), *RESUME]) == 0
    assert f"no complete checkpoint in {run}; training starts from step 0" in capsys.readouterr().out
    resumed, straight = result(run), runs["straight"]
    assert all(resumed["weights"][k].equal(v) for k, v in straight["weights"].items())
    assert resumed["metrics"] == straight["metrics"] and resumed["report"] == straight["report"]
    assert not list(run.glob("checkpoint-*"))


def test_a_checkpoint_continues_only_its_own_settings(runs, capsys):
    """Resuming with a setting that changes the weights is refused by name, and the run is left as it was."""
    run = runs["root"] / "settings_changed"
    before = sorted((str(p.relative_to(run)), p.stat().st_size) for p in run.rglob("*"))
    code = main([*argv(runs["data"], run), *RESUME, "--learning_rate", "0.05", "--num_train_epochs", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(
        f"rl-safety classifier: error: resume_from_checkpoint={str(run / 'checkpoint-6')!r}: trained with other "
        "settings: learning_rate=0.1 there, 0.05 now, num_train_epochs=3 there, 4 now; resume with the settings"
    ), err
    assert sorted((str(p.relative_to(run)), p.stat().st_size) for p in run.rglob("*")) == before
