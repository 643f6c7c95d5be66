"""`rl-safety classifier`: the same command on an .npz, an image folder and a `datasets` folder; the report; the
checkpoint loaded by the `classifier` reward as it is; bad input as one line and exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rl_safety.classifiers.cli import cli
from rl_safety.classifiers.config import ClassifierConfig
from rl_safety.rewards.classifier import ClassifierReward

FAST = ["--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--width", "8", "--eval_samples", "16"]
FAST += ["--autoattack", "false", "--eval_pgd_steps", "2", "--logging_steps", "1", "--max_grad_norm", "5"]


def blobs(num: int = 96, size: int = 8, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: a bright left half or a bright right half, in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, num)
    x = rng.normal(0.4, 0.1, (num, size, size, channels))
    half = size // 2
    for i in range(num):
        if y[i]:
            x[i, :, half:] += 0.3
        else:
            x[i, :, :half] += 0.3
    return (x.clip(0, 1) * 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture
def npz(tmp_path):
    x, y = blobs()
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y)
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method, burn_in", [("dyart", 10), ("pgd_at", 0), ("trades", 0), ("standard", 0)])
def test_burn_in_defaults_to_each_methods_own_convention(method, burn_in):
    assert ClassifierConfig(method=method, data="x.npz", num_train_epochs=20).burn_in_epochs == burn_in


def test_a_burn_in_trains_clean_before_the_adversarial_term(npz, tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["--data", str(npz), "--method", "trades", "--output_dir", str(out_dir), *FAST]
    code, _, err = run([*argv, "--num_train_epochs", "2", "--burn_in_epochs", "1"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "ce" in row]
    # TRADES logs its KL term only when it attacks: none in the clean epoch, every step of the second.
    assert {row["epoch"] for row in steps if "kl" not in row} == {1}
    assert {row["epoch"] for row in steps if "kl" in row} == {2}


def test_npz_run_writes_report_checkpoint_and_metrics(npz, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(["--data", str(npz), "--method", "trades", "--output_dir", str(out_dir), *FAST], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    for key in ("clean_accuracy", "pgd_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["autoattack_accuracy"] is None  # switched off here; tested below
    assert [round(p["epsilon"] * 255, 3) for p in report["curve"]] == [4.0, 8.0, 12.0]
    html = (out_dir / "report.html").read_text()
    assert "robust_accuracy.png" in html and (out_dir / "robust_accuracy.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in row for row in rows) and any("eval_clean_accuracy" in row for row in rows)
    assert "method: trades" in (out_dir / "config.yaml").read_text()
    # The checkpoint loads into the classifier reward as it is, and scores like the trained model.
    meta = json.loads((out_dir / "config.json").read_text())
    reward = ClassifierReward(
        checkpoint=out_dir / "model.safetensors",
        architecture=meta["architecture"],
        architecture_args=meta["architecture_args"],
        class_names=meta["class_names"],
        target_class=meta["class_names"][1],
        output="prob",
    )
    images = torch.rand(4, 1, 8, 8)
    scores = reward(images, [""] * 4)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    # Overwriting needs the flag.
    code, _, err = run(["--data", str(npz), "--method", "standard", "--output_dir", str(out_dir), *FAST], capsys)
    assert code == 2 and "--overwrite_output_dir" in err and len(err.strip().splitlines()) == 1


def test_image_folder_and_datasets_folder_use_the_same_command(tmp_path, capsys):
    x, y = blobs(num=64, channels=3)
    folder = tmp_path / "folder"
    for i, (image, label) in enumerate(zip(x, y)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"class{label}" / f"{i}.png")
    code, _, err = run(
        ["--data", str(folder), "--method", "standard", "--output_dir", str(tmp_path / "a"), *FAST], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "config.json").read_text())["class_names"] == ["class0", "class1"]

    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["left", "right"])})
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, part in (("train", slice(0, 48)), ("test", slice(48, 64))):
        rows = {"image": [Image.fromarray(im) for im in x[part]], "label": y[part].tolist()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(hub / f"{split}.parquet"))
    code, out, err = run(
        ["--data", str(hub), "--method", "pgd_at", "--output_dir", str(tmp_path / "b"), *FAST], capsys
    )
    assert code == 0, err
    assert "on 48 images (3, 8, 8)" in out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["class_names"] == ["left", "right"]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["num_eval"] == 16


def test_autoattack_from_torchattacks_on_a_tiny_model(npz, tmp_path, capsys):
    argv = ["--data", str(npz), "--method", "standard", "--output_dir", str(tmp_path / "aa"), *FAST]
    argv += ["--num_train_epochs", "4"]
    # At a large ε APGD-CE already breaks every point, so Square's 5,000 queries have nothing left to run on.
    argv += ["--autoattack", "true", "--eval_samples", "8", "--epsilon", "0.5", "--eval_epsilons", "0.5"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "aa" / "report.json").read_text())
    assert report["autoattack_accuracy"] == 0.0 and report["clean_accuracy"] > 0.5
    assert "APGD-T needs >= 4 classes" in report["attacks"]["autoattack"]  # two classes here
    assert "AutoAttack" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "fgsm"], "method='fgsm': expected one of dyart, pgd_at, trades, standard"),
        (["--epsilon", "8"], "epsilon=8.0: expected in (0, 1)"),
        (
            ["--method", "dyart", "--burn_in_epochs", "3", "--num_train_epochs", "2"],
            "burn_in_epochs=3 leaves no dyart epoch",
        ),
        (["--data", "/nonexistent/x.npz"], "data='/nonexistent/x.npz': no such .npz file"),
        (["--architecture", "toyworld"], "architecture=toyworld has colour and shape heads"),
        (["--learning_rat", "1"], "did you mean 'learning_rate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(npz, tmp_path, capsys, extra, message):
    argv = ["--data", str(npz), "--method", "standard", "--output_dir", str(tmp_path / "bad"), *FAST, *extra]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("rl-safety classifier: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_npz_without_labels_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "nolabels.npz"
    np.savez(path, x=np.zeros((4, 8, 8, 1), np.uint8))
    code, _, err = run(
        ["--data", str(path), "--method", "standard", "--output_dir", str(tmp_path / "r"), *FAST], capsys
    )
    assert code == 2 and "needs arrays 'x'" in err
