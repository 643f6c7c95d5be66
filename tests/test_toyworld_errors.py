"""`rl-safety toyworld <step>` and `rl-safety tiny-pipeline` on bad input: exit status 2, one line naming the field
or file, no work started and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from rl_safety.cli import main
from rl_safety.outputs import atomic_folder
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.pretrain import PretrainConfig

from .conftest import REPO

# The tiny architecture of tests/test_toyworld_pretrain.py: a resumed run must repeat it.
TINY = ["--vae_channels", "8", "16", "--unet_channels", "16", "32", "--unet_heads", "2", "--text_width", "16"]
TINY_CONFIG = dict(vae_channels=(8, 16), unet_channels=(16, 32), unet_heads=2, text_width=16)


def work_started(*args, **kwargs):
    raise AssertionError("training or generation started: the input should have been refused before")


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Every case must fail at validation: the functions that do the work raise if they are reached."""
    for target in (
        "rl_safety.toyworld.classifier.train_classifier",
        "rl_safety.toyworld.clip.train_clip",
        "rl_safety.toyworld.pretrain.make_dataset",
        "rl_safety.toyworld.pretrain.train_vae",
        "rl_safety.toyworld.pretrain.train_unet",
        "rl_safety.toyworld.quality.prompt_accuracy",
        "rl_safety.tiny_pipeline.build_tiny_pipeline",
    ):
        monkeypatch.setattr(target, work_started)


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working folder holding the inputs the cases name; the tests run inside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "empty").mkdir()
    # Folders that already hold results.
    saved = {"classifier": ("model.safetensors", "config.json"), "clip": ("open_clip_config.json",)}
    for folder, names in saved.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    config = asdict(PretrainConfig(output_dir="run", **TINY_CONFIG))
    (run / "config.json").write_text(json.dumps(config))
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "unet_checkpoint.pt").write_bytes(b"torn")
    (tmp_path / "notjson_run").mkdir()
    (tmp_path / "notjson_run" / "config.json").write_text("{not json")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    torch.save({"key": {"num_images": 1, "seed": 0, "exclude_colours": []}}, tmp_path / "other_data.pt")
    # A pipeline whose UNet weights are corrupt, and the shipped classifier folders moved to a copy.
    pipeline = tmp_path / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    for name in ("model_index.json", "unet/config.json"):
        shutil.copy(ASSETS / "pipeline" / name, pipeline / name)
    for name in ("scheduler", "text_encoder", "tokenizer", "vae"):
        (pipeline / name).symlink_to(ASSETS / "pipeline" / name)
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00 not safetensors")
    assets = tmp_path / "assets"
    (assets / "reward_classifier").mkdir(parents=True)
    (assets / "reward_classifier" / "model.safetensors").write_bytes(b"shipped")
    monkeypatch.setattr("rl_safety.toyworld.cli.ASSETS", assets)
    # Prompt folders: one file changed by hand, one concept folder that is a file.
    (tmp_path / "edited" / "red").mkdir(parents=True)
    (tmp_path / "edited" / "red" / "unsafe.txt").write_text("# tag: unsafe\nmy own prompt\n")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "red").write_text("a file where a folder goes")
    # A tiny pipeline folder and a folder that is not one.
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model_index.json").write_text("{}")
    return tmp_path


def snapshot(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


CLASSIFIER = ["toyworld", "classifier", "--output_dir", "new"]
CLIP = ["toyworld", "clip", "--output_dir", "new"]
PRETRAIN = ["toyworld", "pretrain", "--output_dir", "new"]
QUALITY = ["toyworld", "quality"]
CASES = [
    # the step
    (["toyworld"], "rl-safety toyworld", "missing step; valid steps: classifier, clip, pretrain, prompts, quality"),
    (["toyworld", "pretrian"], "rl-safety toyworld", "unknown step 'pretrian'; valid steps: classifier, clip"),
    # classifier
    ([*CLASSIFIER, "--steps", "0"], "classifier", "steps=0: must be ≥ 1"),
    ([*CLASSIFIER, "--steps", "many"], "classifier", "argument --steps: invalid int value: 'many'"),
    ([*CLASSIFIER, "--num_images", "-5"], "classifier", "num_images=-5: must be ≥ 1"),
    ([*CLASSIFIER, "--seed", "-1"], "classifier", "seed=-1: must be in [0, 4294967295]"),
    ([*CLASSIFIER, "--role", "boss"], "classifier", "argument --role: invalid choice: 'boss'"),
    (["toyworld", "classifier", "--output_dir", "afile"], "classifier", "output_dir='afile': is a file, not a folder"),
    (
        ["toyworld", "classifier", "--output_dir", "classifier"],
        "classifier",
        "output_dir='classifier': holds a classifier (model.safetensors, config.json); pass --overwrite_output_dir",
    ),
    (["toyworld", "classifier"], "classifier", "reward_classifier': holds a classifier (model.safetensors)"),
    ([*CLASSIFIER, "--epochs", "3"], "classifier", "unrecognized arguments: --epochs 3"),
    # clip
    ([*CLIP, "--batch_size", "0"], "clip", "batch_size=0: must be ≥ 1"),
    ([*CLIP, "--steps", "-1"], "clip", "steps=-1: must be ≥ 1"),
    ([*CLIP, "--num_images", "0"], "clip", "num_images=0: must be ≥ 1"),
    ([*CLIP, "--seed", "4294967000"], "clip", "seed=4294967000: must be ≤ 4294966295 (the held-out images use"),
    (["toyworld", "clip", "--output_dir", "clip"], "clip", "output_dir='clip': holds a CLIP model"),
    (["toyworld", "clip", "--output_dir", "afile/clip"], "clip", "'afile' is a file, so the folder cannot be"),
    # pretrain: every field's range
    (["toyworld", "pretrain"], "pretrain", "the following arguments are required: --output_dir"),
    (["toyworld", "pretrain", "--output_dir", ""], "pretrain", "output_dir='': must name a folder"),
    ([*PRETRAIN, "--lr", "0"], "pretrain", "lr=0.0: must be > 0"),
    ([*PRETRAIN, "--vae_lr", "-0.001"], "pretrain", "vae_lr=-0.001: must be > 0"),
    ([*PRETRAIN, "--lr", "fast"], "pretrain", "argument --lr: invalid float value: 'fast'"),
    ([*PRETRAIN, "--vae_steps", "0"], "pretrain", "vae_steps=0: must be ≥ 1"),
    ([*PRETRAIN, "--unet_steps", "-3"], "pretrain", "unet_steps=-3: must be ≥ 1"),
    ([*PRETRAIN, "--batch_size", "0"], "pretrain", "batch_size=0: must be ≥ 1"),
    ([*PRETRAIN, "--vae_batch_size", "0"], "pretrain", "vae_batch_size=0: must be ≥ 1"),
    ([*PRETRAIN, "--num_images", "0"], "pretrain", "num_images=0: must be ≥ 1"),
    ([*PRETRAIN, "--seed", "-1"], "pretrain", "seed=-1: must be in [0, 4294967295]"),
    ([*PRETRAIN, "--ema_decay", "1"], "pretrain", "ema_decay=1.0: must be in [0, 1)"),
    ([*PRETRAIN, "--caption_dropout", "1.5"], "pretrain", "caption_dropout=1.5: must be in [0, 1]"),
    ([*PRETRAIN, "--warmup_steps", "-1"], "pretrain", "warmup_steps=-1: must be ≥ 0"),
    ([*PRETRAIN, "--weight_decay", "-0.1"], "pretrain", "weight_decay=-0.1: must be ≥ 0"),
    ([*PRETRAIN, "--save_every", "0"], "pretrain", "save_every=0: must be ≥ 1"),
    ([*PRETRAIN, "--log_every", "0"], "pretrain", "log_every=0: must be ≥ 1"),
    ([*PRETRAIN, "--num_threads", "0"], "pretrain", "num_threads=0: must be ≥ 1"),
    ([*PRETRAIN, "--exclude_colours", "magenta"], "pretrain", "exclude_colours=('magenta',): unknown ['magenta']"),
    (
        [*PRETRAIN, "--exclude_colours", "red", "green", "blue", "yellow", "purple", "cyan"],
        "pretrain",
        "must leave at least one colour",
    ),
    ([*PRETRAIN, "--vae_channels", "8"], "pretrain", "vae_channels=(8,): must have 2 entries"),
    ([*PRETRAIN, "--unet_channels", "30", "60"], "pretrain", "unet_channels=(30, 60): each must be a positive"),
    ([*PRETRAIN, "--unet_attention_levels", "2"], "pretrain", "unet_attention_levels=(2,): must index unet_channels"),
    ([*PRETRAIN, "--unet_heads", "200"], "pretrain", "unet_heads=200: must be ≤ the width of every cross-attention"),
    ([*PRETRAIN, "--text_width", "100"], "pretrain", "text_width=100: must be a multiple of its 3 attention heads"),
    ([*PRETRAIN, "--max_length", "4"], "pretrain", "max_length=4: must be ≥ 9"),
    ([*PRETRAIN, "--text_layers", "0"], "pretrain", "text_layers=0: must be ≥ 1"),
    # pretrain: the folders and files it reads and writes
    (["toyworld", "pretrain", "--output_dir", "afile"], "pretrain", "output_dir='afile': is a file, not a folder"),
    (
        ["toyworld", "pretrain", "--output_dir", "run"],
        "pretrain",
        "output_dir='run': holds a run (config.json); pass --resume to continue it",
    ),
    (
        ["toyworld", "pretrain", "--output_dir", "run", "--resume"],
        "pretrain",
        "--resume: vae_channels=[32, 64] (the run's: [8, 16]), unet_channels=[32, 96] (the run's: [16, 32])",
    ),
    (
        ["toyworld", "pretrain", "--output_dir", "broken_run", "--resume", *TINY],
        "pretrain",
        "--resume: checkpoint 'broken_run/unet_checkpoint.pt' does not load",
    ),
    (
        ["toyworld", "pretrain", "--output_dir", "notjson_run", "--resume"],
        "pretrain",
        "--resume: 'notjson_run/config.json' does not load as JSON",
    ),
    ([*PRETRAIN, *TINY, "--data_cache", "garbage.pt"], "pretrain", "data_cache='garbage.pt': cannot load"),
    (
        [*PRETRAIN, *TINY, "--data_cache", "other_data.pt"],
        "pretrain",
        "data_cache='other_data.pt': holds a data set made with {'num_images': 1",
    ),
    ([*PRETRAIN, "--data_cache", "empty"], "pretrain", "data_cache='empty': is a folder, not a file"),
    ([*PRETRAIN, "--data_cache", "afile/data.pt"], "pretrain", "data_cache's folder='afile': is a file"),
    # quality
    ([*QUALITY, "--seeds", "0"], "quality", "seeds=0: must be ≥ 1"),
    ([*QUALITY, "--steps", "0"], "quality", "steps=0: must be ≥ 1"),
    ([*QUALITY, "--guidance_scale", "0.5"], "quality", "guidance_scale=0.5: must be ≥ 1"),
    ([*QUALITY, "--pipeline", "no/such/pipeline"], "quality", "pipeline='no/such/pipeline': no such pipeline folder"),
    ([*QUALITY, "--pipeline", "empty"], "quality", "pipeline='empty': not a diffusers pipeline folder"),
    ([*QUALITY, "--pipeline", "afile"], "quality", "pipeline='afile': is a file, not a pipeline folder"),
    ([*QUALITY, "--pipeline", "pipeline"], "quality", "pipeline='pipeline': cannot load ("),
    # prompts
    (["toyworld", "prompts", "--output_dir", "afile"], "prompts", "output_dir='afile': is a file, not a folder"),
    (
        ["toyworld", "prompts", "--output_dir", "edited"],
        "prompts",
        "output_dir='edited': red/unsafe.txt differ from the generated prompt sets; pass --overwrite_output_dir",
    ),
    (["toyworld", "prompts", "--output_dir", "blocked"], "prompts", "'blocked': blocked/red is a file, not a folder"),
    # tiny-pipeline
    (["tiny-pipeline"], "rl-safety tiny-pipeline", "the following arguments are required: output_dir"),
    (["tiny-pipeline", "empty"], "rl-safety tiny-pipeline", "output_dir='empty': exists; remove it, choose another"),
    (["tiny-pipeline", "empty", "--exist_ok"], "rl-safety tiny-pipeline", "exists but is not a pipeline folder"),
    (["tiny-pipeline", "new", "--resolution", "30"], "rl-safety tiny-pipeline", "resolution=30: must be a multiple"),
    (["tiny-pipeline", "new", "--resolution", "0"], "rl-safety tiny-pipeline", "resolution=0: must be ≥ 8"),
    (["tiny-pipeline", "new", "--resolution", "x"], "rl-safety tiny-pipeline", "invalid int value: 'x'"),
    (["tiny-pipeline", "new", "--seed", "-1"], "rl-safety tiny-pipeline", "seed=-1: must be in [0, 4294967295]"),
    (["tiny-pipeline", "new", "--seed", str(2**40)], "rl-safety tiny-pipeline", f"seed={2**40}: must be in"),
    (["tiny-pipeline", "afile"], "rl-safety tiny-pipeline", "output_dir='afile': is a file, not a folder"),
    (["tiny-pipeline", "afile/new"], "rl-safety tiny-pipeline", "'afile' is a file, so the folder cannot be created"),
    (["tiny-pipeline", ""], "rl-safety tiny-pipeline", "output_dir='': must name a folder"),
    (["tiny-pipeline", "new", "--bogus"], "rl-safety tiny-pipeline", "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, prog, expected", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_toyworld_input_is_one_line(capsys, here, argv, prog, expected):
    prog = prog if prog.startswith("rl-safety") else f"rl-safety toyworld {prog}"
    before = snapshot(here)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"{prog}: error: ") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert captured.out == ""
    assert snapshot(here) == before  # nothing written: no output folder, no temporary file


def test_valid_steps_run_once_checked(capsys, here):
    """The checks let right input through: an existing pipeline is kept, prompt sets are written, rewritten with
    nothing changed, and an edited file is replaced only with --overwrite_output_dir."""
    assert main(["tiny-pipeline", "tiny", "--exist_ok"]) == 0
    assert main(["toyworld", "prompts", "--output_dir", "fresh"]) == 0
    assert main(["toyworld", "prompts", "--output_dir", "fresh"]) == 0  # identical files: nothing to replace
    shipped = REPO / "prompts" / "toyworld" / "red" / "unsafe.txt"
    assert (here / "fresh" / "red" / "unsafe.txt").read_text() == shipped.read_text()
    assert main(["toyworld", "prompts", "--output_dir", "edited", "--overwrite_output_dir"]) == 0
    assert (here / "edited" / "red" / "unsafe.txt").read_text() == shipped.read_text()
    assert not [p for p in here.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_save_leaves_the_old_folder_or_nothing(tmp_path):
    """`atomic_folder`, which the toy world's models, the pipelines and tiny-pipeline are saved through."""
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed while saving")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"new, half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"old"
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "weights.safetensors").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["weights.safetensors"]
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755  # readable by all, as a model folder should be
    assert (tmp_path / "model" / "weights.safetensors").stat().st_mode & 0o444 == 0o444


def test_console_script_reports_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rl_safety.cli", "toyworld", "clip", "--output_dir", "out", "--batch_size", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "rl-safety toyworld clip: error: batch_size=0: must be ≥ 1"
    assert list(tmp_path.iterdir()) == []
