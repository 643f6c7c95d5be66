"""Two gloo processes on CPU: the run finishes, writes one adapter, and matches a one-process run of the same
global batch (noise is drawn for the global rollout, advantages on gathered rewards)."""

import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from rl_safety.train import main
from tests.conftest import REPO, recipe_args

ADV_TRAIN = {"adv_train": "true", "adv_refresh_steps": 1, "adv_share": 1.0, "pgd_num_step": 2, "adv_epsilon": 0.3}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, ADV_TRAIN], ids=["grpo", "grpo-adv_train"])
def test_two_process_cpu_run_matches_one_process(tiny_sd_path, prompt_file, tmp_path, extra):
    if extra:  # adversarial training attacks the concept prompts: give it some, beside the safe ones
        unsafe = tmp_path / "unsafe.txt"
        unsafe.write_text("# tag: unsafe\na red triangle\na red cross\n")
        prompt_file = [prompt_file, unsafe]
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        "-m",
        "rl_safety.train",
        *recipe_args(
            tiny_sd_path, prompt_file, two, per_device_train_batch_size=2, max_steps=2, save_steps=1, **extra
        ),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    adapters = sorted(p.relative_to(two) for p in two.rglob("pytorch_lora_weights.safetensors"))
    assert [str(p) for p in adapters] == [
        "checkpoint-1/pytorch_lora_weights.safetensors",
        "checkpoint-2/pytorch_lora_weights.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    assert yaml.safe_load((two / "config.yaml").read_text())["runtime"]["world_size"] == 2
    assert (two / "metrics.jsonl").read_text().count('"reward"') == 2  # one writer, one line per step

    one = tmp_path / "one"
    main(
        recipe_args(tiny_sd_path, prompt_file, one, per_device_train_batch_size=4, max_steps=2, save_steps=1, **extra)
    )
    a = load_file(one / "pytorch_lora_weights.safetensors")
    b = load_file(two / "pytorch_lora_weights.safetensors")
    # Same global rollout and averaged gradients: the adapters agree up to reduction order, which Adam magnifies
    # on near-zero gradients, so compare each tensor as a whole.
    for key in a:
        assert (a[key] - b[key]).norm() <= 1e-3 * a[key].norm(), key
