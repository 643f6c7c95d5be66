"""`rl-safety classifier` with bad input, as a new user would give it: exit status 2, one line on stderr naming the
field or file and what would be valid, no traceback, and nothing written (checked before any training)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from rl_safety.checkpoints import mark_complete
from rl_safety.classifiers.models import SmallCNN
from rl_safety.cli import main
from tests.conftest import REPO

# Tiny settings: a case that wrongly passed the checks would still finish in a moment (and fail its assertions).
FAST = ["--method", "standard", "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--width", "4"]
FAST += ["--eval_samples", "4", "--autoattack", "false", "--eval_pgd_steps", "1"]
BASE = ["--data", "{tmp}/ok.npz", "--output_dir", "{tmp}/out", *FAST]


def images(num: int, size: int = 8, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num, size, size, channels), dtype=np.uint8), rng.integers(0, 2, num)


def save_folder(root: Path, classes: dict[str, int], size: int = 8) -> None:
    """An image folder: `classes` maps a class folder to its number of PNG images."""
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images(count, size, 3, seed=len(name))[0]):
            Image.fromarray(image).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    """Every bad (and one good) input of the table below, built once; no case may change anything in it."""
    root = tmp_path_factory.mktemp("classifier-errors")
    x, y = images(40)
    np.savez(root / "ok.npz", x=x, y=y)
    np.savez(root / "rgb.npz", x=images(12, channels=3)[0], y=y[:12])
    np.savez(root / "float.npz", x=x.astype(np.float32), y=y)
    np.savez(root / "float_labels.npz", x=x, y=y.astype(np.float64))
    np.savez(root / "negative.npz", x=x, y=y - 1)
    np.savez(root / "nolabels.npz", x=x)
    np.savez(root / "one_class.npz", x=x, y=np.zeros(40, np.int64))
    np.savez(root / "half_test.npz", x=x, y=y, x_test=x[:4])
    np.savez(root / "few_names.npz", x=x, y=y * 2, class_names=np.array(["a", "b"]))
    (root / "corrupt.npz").write_bytes(b"not a zip archive")
    (root / "a_file").write_text("not a folder")
    (root / "empty_folder").mkdir()
    (root / "no_images" / "cats").mkdir(parents=True)
    (root / "no_images" / "cats" / "notes.txt").write_text("no images here")
    save_folder(root / "one_class_folder", {"cats": 3})
    save_folder(root / "empty_class", {"cats": 3, "dogs": 0})
    save_folder(root / "corrupt_image", {"cats": 2, "dogs": 2})
    (root / "corrupt_image" / "dogs" / "broken.png").write_bytes(b"\x89PNG truncated")
    save_folder(root / "mixed_sizes", {"cats": 2})
    (root / "mixed_sizes" / "dogs").mkdir()
    Image.fromarray(images(1, 12, 3)[0][0]).save(root / "mixed_sizes" / "dogs" / "big.png")
    # `datasets` folders (parquet): one with string labels, one with an integer label column.
    import datasets

    pictures = [Image.fromarray(im) for im in images(6, channels=3)[0]]
    for name, labels in (("hub_strings", ["cat", "dog"] * 3), ("hub", [0, 1] * 3)):
        (root / name).mkdir()
        rows = {"image": pictures, "label": labels}
        datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(
            str(root / name / "train.parquet")
        )
    (root / "corrupt.safetensors").write_bytes(b"\x00" * 16)
    other = {k: v.contiguous() for k, v in SmallCNN(num_classes=2, in_channels=1, width=8).state_dict().items()}
    (root / "other_width").mkdir()
    save_file(other, str(root / "other_width" / "model.safetensors"))
    # Output folders: a previous run, a shipped model folder (weights only), a finished run.
    previous = root / "previous_run"
    (previous / "checkpoint-3").mkdir(parents=True)
    (previous / "config.yaml").write_text("method: standard\n")
    (previous / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    (previous / "checkpoint-3" / "optimizer.pt").write_bytes(b"torn")  # its save never finished
    (root / "shipped_model").mkdir()
    save_file(other, str(root / "shipped_model" / "model.safetensors"))
    (root / "shipped_model" / "config.json").write_text("{}\n")
    (root / "finished").mkdir()
    (root / "finished" / "config.yaml").write_text("method: standard\n")
    (root / "finished" / "report.json").write_text("{}\n")
    lora = root / "lora_run" / "checkpoint-2"  # a complete checkpoint of another command
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"x" * 10)
    mark_complete(lora, 2)
    # Recipes.
    (root / "unknown_key.yaml").write_text("methd: dyart\n")
    (root / "wrong_type.yaml").write_text("seed: 1.5\n")
    (root / "not_a_list.yaml").write_text("eval_epsilons: 0.1\n")
    (root / "not_a_number.yaml").write_text("dyart_lambda: heavy\n")
    (root / "broken.yaml").write_text("method: [dyart\n")
    (root / "list.yaml").write_text("- method\n- dyart\n")
    return root


CASES = [
    # fields: one per kind of mistake
    (["--method", "fgsm"], "method='fgsm': expected one of dyart, pgd_at, trades, standard"),
    (["--num_train_epochs", "0"], "num_train_epochs=0: expected >= 1"),
    (["--num_train_epochs", "-2"], "num_train_epochs=-2: expected >= 1"),
    (["--num_train_epochs", "2.5"], "argument --num_train_epochs/--num-train-epochs: invalid int value: '2.5'"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0: expected >= 1"),
    (["--eval_batch_size", "0"], "eval_batch_size=0: expected >= 1"),
    (["--learning_rate", "0"], "learning_rate=0.0: expected > 0"),
    (["--learning_rate", "-0.1"], "learning_rate=-0.1: expected > 0"),
    (["--learning_rate", "nan"], "learning_rate=nan: expected a finite number"),
    (["--momentum", "1.5"], "momentum=1.5: expected in (0, 1)"),
    (["--weight_decay", "-1"], "weight_decay=-1.0: expected >= 0"),
    (["--epsilon", "0"], "epsilon=0.0: expected in (0, 1), e.g. 0.0314 for 8/255"),
    (["--epsilon", "8"], "epsilon=8.0: expected in (0, 1)"),
    (["--pgd_step_size", "0"], "pgd_step_size=0.0: expected in (0, 1), or null for epsilon/4"),
    (["--pgd_steps", "0"], "pgd_steps=0: expected >= 1"),
    (["--eval_pgd_steps", "-1"], "eval_pgd_steps=-1: expected >= 1"),
    (["--dyart_overshoot", "0.5"], "dyart_overshoot=0.5: expected >= 1"),
    (["--dyart_r0", "0"], "dyart_r0=0.0: expected > 0, or null for 2·epsilon"),
    (["--dyart_beta", "0"], "dyart_beta=0.0: expected > 0"),
    (["--dyart_min_phi", "0.1"], "dyart_min_phi=0.1: expected < 0"),
    (["--dyart_search_steps", "0"], "dyart_search_steps=0: expected >= 1"),
    (["--trades_beta", "-1"], "trades_beta=-1.0: expected >= 0"),
    (["--method", "dyart", "--burn_in_epochs", "3", "--num_train_epochs", "2"], "burn_in_epochs=3 leaves no dyart"),
    (["--ema_decay", "1"], "ema_decay=1.0: expected in [0, 1)"),
    (["--max_grad_norm", "0"], "max_grad_norm=0.0: expected > 0, or null to disable clipping"),
    (["--eval_split", "0"], "eval_split=0.0: expected in (0, 1)"),
    (["--seed", "-1"], "seed=-1: expected in [0, 2**32)"),
    (["--width", "0"], "width=0: expected >= 1"),
    (["--image_size", "0"], "image_size=0: expected >= 1 pixels"),
    (["--save_steps", "0"], "save_steps=0: expected >= 1, or null to save every epoch"),
    (["--save_total_limit", "0"], "save_total_limit=0: expected >= 1, or null to keep all"),
    (["--logging_steps", "0"], "logging_steps=0: expected >= 1"),
    (["--architecture", "vit"], "architecture='vit': expected one of small_cnn, resnet18, wrn28_10, toyworld"),
    (["--architecture", "toyworld"], "architecture=toyworld has colour and shape heads: use data: toyworld"),
    (["--learning_rat", "1"], "unknown argument 'learning_rat'; did you mean 'learning_rate'?"),
    (["--dyart_heads", "colour"], "dyart_heads=['colour']: data="),
    # AutoAttack and evaluation options
    (["--autoattack", "maybe"], "argument --autoattack: Truthy value expected: got maybe"),
    (["--autoattack", "true", "--autoattack_epsilons", "2"], "autoattack_epsilons=[2.0]: each must be in (0, 1)"),
    (["--autoattack_epsilons", "0.1"], "autoattack_epsilons=[0.1] with autoattack=false: AutoAttack would not run"),
    (["--eval_epsilons", "0"], "eval_epsilons=[0.0]: each must be in (0, 1)"),
    (["--eval_samples", "0"], "eval_samples=0: expected >= 1, or null for the whole eval set"),
    # data
    (["--data", ""], "data is required: an .npz file, an image folder, a `datasets` id or toyworld"),
    (["--data", "{tmp}/missing.npz"], "data='{tmp}/missing.npz': no such .npz file"),
    (["--data", "./no/such/folder"], "data='./no/such/folder': no such file or folder"),
    (["--data", "no-such-user/no-such-set"], "data='no-such-user/no-such-set': cannot load as a `datasets` id"),
    (["--data", "{tmp}/a_file"], "data='{tmp}/a_file': a file that is not an .npz; expected an .npz file, an image"),
    (["--data", "{tmp}/corrupt.npz"], "data='{tmp}/corrupt.npz': not an .npz archive"),
    (["--data", "{tmp}/float.npz"], "data='{tmp}/float.npz': x must be uint8 images (N×H×W×C), got float32"),
    (["--data", "{tmp}/float_labels.npz"], "data='{tmp}/float_labels.npz': y must be 40 integer labels, got float64"),
    (["--data", "{tmp}/negative.npz"], "data='{tmp}/negative.npz': labels must be >= 0, found -1"),
    (["--data", "{tmp}/nolabels.npz"], "data='{tmp}/nolabels.npz': an .npz needs arrays 'x' (uint8 N×H×W×C) and 'y'"),
    (["--data", "{tmp}/one_class.npz"], "every training image has label 0; a classifier needs at least 2 classes"),
    (["--data", "{tmp}/half_test.npz"], "has x_test without its pair; a test set needs both x_test and y_test"),
    (["--data", "{tmp}/few_names.npz"], "class_names lists 2 names but the labels go up to 2"),
    (["--data", "{tmp}/empty_folder"], "data='{tmp}/empty_folder': an image folder needs one sub-folder per class"),
    (["--data", "{tmp}/no_images"], "data='{tmp}/no_images': no images (.bmp, .gif, .jpeg, .jpg, .png"),
    (["--data", "{tmp}/one_class_folder"], "one class folder (cats); a classifier needs at least 2"),
    (["--data", "{tmp}/empty_class"], "data='{tmp}/empty_class': class folder(s) dogs hold no images"),
    (["--data", "{tmp}/corrupt_image"], "data='{tmp}/corrupt_image': {tmp}/corrupt_image/dogs/broken.png is not a"),
    (["--data", "{tmp}/mixed_sizes"], "images have different sizes [(3, 8, 8), (3, 12, 12)]; set image_size"),
    (["--data", "{tmp}/hub_strings"], "label column 'label' (train) holds 'cat', not a class index >= 0"),
    (["--data", "{tmp}/hub", "--label_column", "class"], "label_column='class': not a column of data="),
    (["--data", "{tmp}/hub", "--image_column", "label"], "image column 'label' holds int values, not images"),
    (["--label_column", "y"], "label_column applies to `datasets` data; data='{tmp}/ok.npz' is a file or image"),
    (["--eval_data", "{tmp}/missing.npz"], "eval_data='{tmp}/missing.npz': no such .npz file"),
    (["--eval_data", "{tmp}/rgb.npz"], "eval_data='{tmp}/rgb.npz': evaluation images are (3, 8, 8), training images"),
    (["--data", "toyworld:0"], "data='toyworld:0': expected toyworld or toyworld:NUM_IMAGES with NUM_IMAGES >= 2"),
    (["--data", "toyworld:4", "--eval_data", "{tmp}/ok.npz"], "brings its own evaluation images; leave eval_data"),
    (["--data", "toyworld:4"], "data='toyworld:4' has colour and shape labels: use architecture: toyworld"),
    # initial weights
    (["--init_checkpoint", "{tmp}/missing"], "init_checkpoint='{tmp}/missing': no model.safetensors there"),
    (["--init_checkpoint", "{tmp}/corrupt.safetensors"], "init_checkpoint='{tmp}/corrupt.safetensors': cannot load"),
    (["--init_checkpoint", "{tmp}/other_width"], "init_checkpoint='{tmp}/other_width' does not fit the architecture"),
    # output folder
    (["--output_dir", "{tmp}/a_file"], "output_dir='{tmp}/a_file': is a file, not a folder"),
    (["--output_dir", "{tmp}/a_file/run"], "'{tmp}/a_file' is a file, so the folder cannot be created"),
    (["--output_dir", "{tmp}/previous_run"], "output_dir='{tmp}/previous_run' holds a previous run; pass --overwrite"),
    (["--output_dir", "{tmp}/shipped_model"], "output_dir='{tmp}/shipped_model' holds a previous run"),
    # resuming
    (["--resume_from_checkpoint", "last"], "resume_from_checkpoint=last: output_dir='{tmp}/out' holds no run to"),
    (["--resume_from_checkpoint", "{tmp}/nowhere"], "resume_from_checkpoint='{tmp}/nowhere': not a checkpoint"),
    (
        ["--output_dir", "{tmp}/previous_run", "--resume_from_checkpoint", "{tmp}/previous_run/checkpoint-3"],
        "not a complete checkpoint (its save did not finish (no checkpoint_complete.json)); 'last' picks",
    ),
    (
        ["--output_dir", "{tmp}/finished", "--resume_from_checkpoint", "last"],
        "output_dir='{tmp}/finished' holds a finished run (report.json); nothing to continue",
    ),
    (
        ["--resume_from_checkpoint", "{tmp}/lora_run/checkpoint-2"],
        "'{tmp}/lora_run/checkpoint-2': not a classifier checkpoint (no trainer_state.json)",
    ),
    # recipes
    (["--config", "{tmp}/unknown_key.yaml"], "unknown recipe key 'methd'; did you mean 'method'?"),
    (["--config", "{tmp}/wrong_type.yaml"], "recipe key 'seed': expected int, got 1.5"),
    (["--config", "{tmp}/not_a_list.yaml"], "recipe key 'eval_epsilons': expected list[float] | None, got 0.1"),
    (["--config", "{tmp}/not_a_number.yaml"], "argument --dyart_lambda/--dyart-lambda: invalid float value: 'heavy'"),
    (["--config", "{tmp}/broken.yaml"], "--config {tmp}/broken.yaml: not valid YAML"),
    (["--config", "{tmp}/list.yaml"], "--config {tmp}/list.yaml: must be a YAML mapping of field: value, not a list"),
    (["--config", "{tmp}/missing.yaml"], "--config {tmp}/missing.yaml: cannot read the recipe (No such file"),
]


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A `datasets` id is looked up on the Hub: never from the tests."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("extra, expected", CASES, ids=[" ".join(extra)[:60] for extra, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp, capsys, extra, expected):
    before = snapshot(tmp)
    code = main(["classifier", *(arg.format(tmp=tmp) for arg in [*BASE, *extra])])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("rl-safety classifier: error: "), err[-3000:]
    assert expected.format(tmp=tmp) in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert snapshot(tmp) == before  # no output folder, no change to what was there


def test_console_script_reports_one_line(tmp):
    argv = [arg.format(tmp=tmp) for arg in [*BASE, "--data", "{tmp}/corrupt_image"]]
    proc = subprocess.run(
        [sys.executable, "-m", "rl_safety.cli", "classifier", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"rl-safety classifier: error: data='{tmp}/corrupt_image': {tmp}/corrupt_image/dogs/broken.png is not a "
        f"readable image (cannot identify image file '{tmp}/corrupt_image/dogs/broken.png')"
    ]
    assert not (tmp / "out").exists()
