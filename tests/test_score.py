import json

import numpy as np
import pytest
import torch
from PIL import Image

from rl_safety.cli import main
from rl_safety.rewards import jpeg_kilobytes
from rl_safety.score import load_tensor
from tests.conftest import REPO


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    Image.fromarray(np.full((32, 48, 3), 128, dtype=np.uint8)).save(folder / "flat.png")
    return folder


def test_scores_files_and_folders_in_order(capsys, image_dir):
    paths = sorted(image_dir.iterdir())
    code = main(
        [
            "score",
            "--reward",
            "jpeg_incompressibility",
            "--reward-args",
            '{"quality": 90}',
            "--prompt",
            "x",
            str(paths[-1]),
            str(image_dir),
        ]
    )
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    expected = [jpeg_kilobytes(load_tensor(p)[None], 90).item() for p in [paths[-1], *paths]]
    assert scores == pytest.approx(expected)


CALLS = []


def counting_brightness(images, prompts, **context):
    CALLS.append(images.shape[0])
    return images.mean(dim=(1, 2, 3))


def test_64_images_scored_in_one_batch(capsys, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    CALLS.clear()
    assert main(["score", "--reward", "tests.test_score:counting_brightness", str(tmp_path)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert CALLS == [64]
    first = load_tensor(tmp_path / "00.png")
    assert scores[0] == pytest.approx(first.mean().item(), rel=1e-6)
    assert len(scores) == 64 and torch.tensor(scores).std() > 0


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--reward", "jpeg_compressibility", "--reward-args", "{bad"], "--reward-args: not JSON"),
        (["--reward", "jpeg_compressibility", "--reward-args", '{"quality": 500}'], "quality=500"),
    ],
)
def test_bad_input_is_one_line(capsys, image_dir, argv, expected):
    assert main(["score", *argv, str(image_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_missing_image(capsys, tmp_path):
    assert main(["score", "--reward", "jpeg_compressibility", str(tmp_path / "nope.png")]) == 2
    assert "nope.png: no such image file or folder" in capsys.readouterr().err


def test_image_reward_from_the_shell_matches_the_original(capsys):
    """`rl-safety score` uses ImageReward's exact file preprocessing: the original package's scores come back."""
    fixture = REPO / "tests" / "fixtures" / "imagereward_tiny"
    expected = json.loads((fixture / "expected.json").read_text())
    case = expected["scores"][1]
    args = {"checkpoint": str(fixture), "tokenizer": str(fixture), "vision_num_heads": expected["vision"]["num_heads"]}
    argv = ["score", "--reward", "image_reward", "--reward-args", json.dumps(args), "--prompt", case["prompt"]]
    assert main(argv + [str(fixture / name) for name in case["images"]]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == pytest.approx(case["score"], rel=1e-4)
