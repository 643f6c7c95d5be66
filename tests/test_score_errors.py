"""`rl-safety score` on bad input: exit status 2, one line naming the flag or file, nothing written."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rl_safety.cli import main

from .conftest import REPO

IMAGE_REWARD = str(REPO / "tests" / "fixtures" / "imagereward_tiny")
TOY_CLASSIFIER = "rl_safety.toyworld.classifier:AttributeClassifier"


def wrong_shape(images, prompts, **context):
    """A plugin reward that returns one value too many per image."""
    return torch.zeros(len(images), 2)


class FailingLoad:
    """A plugin reward whose weights do not load: it logs on the root logger, as open_clip does, then raises."""

    def __init__(self, **args):
        logging.error("could not fetch the weights")
        raise RuntimeError("weights do not match the architecture")


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A folder of good and bad inputs; the tests run inside it."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save("ok.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save("ok.jpg")
    for name in ("ok.png", "ok.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"trunc{os.path.splitext(name)[1]}").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16)).save("i16.png")
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save("float.tiff")
    Image.fromarray(np.full((16, 16), 300, dtype=np.int32)).save("i32.tiff")
    for folder in ("imgs", "noimgs", "dir.png", "badimgs", "emptymodel"):
        (tmp_path / folder).mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save("imgs/a.png")
    (tmp_path / "badimgs" / "a.png").write_bytes((tmp_path / "ok.png").read_bytes())
    (tmp_path / "badimgs" / "b.png").write_text("not an image either")
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "comments.txt").write_text("# tag: safe\n# only comments\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01 not safetensors")
    return tmp_path


def snapshot(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def reward(name: str, **args) -> list[str]:
    return ["--reward", name, "--reward-args", json.dumps(args)]


JPEG = ["--reward", "jpeg_compressibility"]
CASES = [
    # the reward and its arguments
    (["--reward", "nope", "ok.png"], "unknown reward 'nope'; valid names: classifier"),
    (["--reward", " ", "ok.png"], "--reward: empty; give a reward name"),
    (["--reward", "no_such_module:attr", "ok.png"], "reward 'no_such_module:attr': cannot import it"),
    (["--reward", "os:path", "ok.png"], "reward 'os:path': a module, not a reward class or function"),
    ([*JPEG, "--reward-args", "{bad", "ok.png"], "--reward-args: not JSON (Expecting property name"),
    ([*JPEG, "--reward-args", "[90]", "ok.png"], "--reward-args: expected a JSON object"),
    ([*reward("jpeg_compressibility", quality="high"), "ok.png"], "quality='high': expected an integer in [1, 100]"),
    ([*reward("jpeg_compressibility", quality=500), "ok.png"], "quality=500: expected an integer in [1, 100]"),
    ([*reward("jpeg_compressibility", qualiti=90), "ok.png"], "reward 'jpeg_compressibility': bad args ['qualiti']"),
    ([*reward("classifier", checkpoint="nope.pt"), "ok.png"], "checkpoint='nope.pt': no such file"),
    (
        [*reward("classifier", checkpoint="corrupt.safetensors", architecture=TOY_CLASSIFIER), "ok.png"],
        "checkpoint='corrupt.safetensors': cannot read with safetensors",
    ),
    ([*reward("toyworld_concept", concept="magenta"), "ok.png"], "concept='magenta': the toy world's concepts are"),
    (
        [*reward("toyworld_concept", concept="red", classifier="emptymodel"), "ok.png"],
        "classifier='emptymodel': not a toy-world classifier folder",
    ),
    ([*reward("clip_steering", model="./no/clip"), "ok.png"], "model='./no/clip'"),
    ([*reward("image_reward", checkpoint="nope.pt"), "ok.png"], "no such file or folder 'nope.pt'"),
    (
        [*reward("image_reward", checkpoint="text.png"), "ok.png"],
        "checkpoint='text.png': not a readable torch checkpoint",
    ),
    (["--reward", "tests.test_score_errors:FailingLoad", "ok.png"], "cannot load (weights do not match"),
    (["--reward", "tests.test_score_errors:wrong_shape", "ok.png"], "returned shape (1, 2) for 1 images"),
    # the images
    ([*JPEG, "nope.png"], "nope.png: no such image file or folder"),
    ([*JPEG, "noimgs"], "noimgs: folder holds no images (.bmp, .jpeg, .jpg, .png, .webp)"),
    ([*JPEG, "dir.png"], "dir.png: folder holds no images"),
    ([*JPEG, "text.png"], "text.png: not a readable image (cannot identify image file"),
    ([*JPEG, "empty.png"], "empty.png: not a readable image"),
    ([*JPEG, "trunc.png"], "trunc.png: not a readable image"),
    ([*JPEG, "trunc.jpg"], "trunc.jpg: not a readable image (image file is truncated"),
    ([*JPEG, "i16.png"], "i16.png: image mode 'I;16' is not supported"),
    ([*JPEG, "float.tiff"], "float.tiff: image mode 'F' is not supported"),
    ([*JPEG, "i32.tiff"], "i32.tiff: image mode 'I' is not supported"),
    ([*JPEG, "ok.png", "badimgs"], "b.png: not a readable image"),
    ([*reward("image_reward", checkpoint=IMAGE_REWARD), "trunc.png"], "trunc.png: not a readable image"),
    # the prompts
    ([*JPEG, "--prompts", "two.txt", "ok.png"], "--prompts 'two.txt': holds 2 prompts for 1 images"),
    ([*JPEG, "--prompts", "comments.txt", "ok.png"], "--prompts 'comments.txt': holds no prompts"),
    ([*JPEG, "--prompts", "nope.txt", "ok.png"], "--prompts 'nope.txt': no such file"),
    ([*JPEG, "--prompts", "imgs", "ok.png"], "--prompts 'imgs': not a file"),
    ([*JPEG, "--prompts", "latin1.txt", "ok.png"], "'latin1.txt' is not UTF-8 text"),
    ([*JPEG, "--prompt", "x", "--prompts", "two.txt", "ok.png"], "argument --prompts: not allowed with argument"),
    # the output and the other flags
    ([*JPEG, "--output", "imgs", "ok.png"], "--output 'imgs': is a folder; name a file"),
    ([*JPEG, "--output", "afile/scores.json", "ok.png"], "--output 'afile/scores.json': 'afile' is a file"),
    ([*JPEG, "--batch-size", "0", "ok.png"], "--batch-size=0: must be ≥ 1"),
    ([*JPEG, "--batch-size", "many", "ok.png"], "argument --batch-size: invalid int value: 'many'"),
    ([*JPEG, "--device", "gpu0", "ok.png"], "--device='gpu0': not a torch device"),
    ([*JPEG, "--device", "cuda:99", "ok.png"], "--device='cuda:99'"),
    ([*JPEG, "--bogus", "ok.png"], "unrecognized arguments: --bogus"),
    (JPEG, "the following arguments are required: images"),
    (["ok.png"], "the following arguments are required: --reward"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_score_input_is_one_line(capsys, files, argv, expected):
    before = snapshot(files)
    assert main(["score", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("rl-safety score: error:") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert captured.out == ""
    assert snapshot(files) == before  # nothing written, not even a temporary file


def test_prompts_per_image_and_output_file(capsys, files):
    """The flags the table checks work when given right: one prompt per image, and an output file."""
    argv = ["score", "--reward", "jpeg_compressibility", "--prompts", "two.txt", "--output", "out/scores.json"]
    assert main([*argv, "ok.png", "imgs"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((files / "out" / "scores.json").read_text()) == printed and len(printed) == 2
    assert [p.name for p in (files / "out").iterdir()] == ["scores.json"]  # no temporary file left


def test_console_script_reports_one_line(files):
    proc = subprocess.run(
        [sys.executable, "-m", "rl_safety.cli", "score", "--reward", "jpeg_compressibility", "trunc.png"],
        capture_output=True,
        text=True,
        cwd=files,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("rl-safety score: error: trunc.png: not a readable image (") and "\n" not in err, err
