"""Shipped recipes, prompt sets and toy models resolve from any working directory; user paths stay cwd-relative."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rl_safety.cli import main
from rl_safety.resources import PACKAGE, resolve_path, resolve_recipe
from tests.conftest import REPO


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory that holds none of the repository's folders."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_train_recipe_by_short_name_resolves_every_path(elsewhere):
    from rl_safety.train import parse_args

    model_args, prompt_args, args = parse_args(["--config", "toyworld/grpo_erase_red"])
    assert Path(model_args.pretrained_model_name_or_path, "model_index.json").is_file()
    assert len(prompt_args.train_prompts) == 2 and all(Path(p).is_file() for p in prompt_args.train_prompts)
    assert prompt_args.train_prompts[0].endswith("prompts/toyworld/red/unsafe.txt")
    assert Path(args.eval_config).is_file() and args.eval_config.endswith("toyworld/eval.yaml")
    assert args.output_dir == "runs/toyworld-erase-red"  # outputs stay relative to where the command runs


def test_reward_classifier_and_eval_recipe_paths_resolve(elsewhere):
    from rl_safety.evaluation.toyworld import parse_args as parse_eval_args
    from rl_safety.rewards import RewardStack
    from rl_safety.train import parse_args

    _, _, args = parse_args(["--config", "recipes/toyworld/grpo_erase_red_dyart.yaml", "--target_concept", "blue"])
    classifiers = [r["args"]["classifier"] for r in args.rewards if "classifier" in r.get("args", {})]
    assert len(classifiers) == 2
    assert all(Path(c, "model.safetensors").is_file() and c.endswith("reward_classifier_dyart") for c in classifiers)
    RewardStack.from_config([r for r in args.rewards if r["name"] == "toyworld_concept"])
    # The reward itself resolves a shipped name too (Python API, `rl-safety score`).
    RewardStack.from_config(
        [
            {
                "name": "toyworld_concept",
                "args": {"concept": "red", "classifier": "rl_safety/toyworld/assets/judge_classifier"},
            }
        ]
    )
    config = parse_eval_args(["--config", args.eval_config, "--target_concept", "blue"])
    for name in ("pretrained_model_name_or_path", "judge_classifier", "reward_classifier", "clip_model"):
        assert Path(getattr(config, name)).is_dir(), name
    assert config.reward_classifier.endswith("reward_classifier_dyart")
    for name in ("unsafe", "implicit", "safe"):
        path = Path(getattr(config, f"{name}_prompts"))
        assert path.is_file() and path.parent.name == "blue"


def test_attack_and_classifier_recipes_resolve(elsewhere):
    from rl_safety.attack.run import parse_args as parse_attack_args
    from rl_safety.classifiers.cli import parse_args as parse_classifier_args

    config = parse_attack_args(["--config", "toyworld/attack"])
    assert Path(config.prompts).is_file() and Path(config.judge_classifier).is_dir()
    assert config.output_dir == "runs/toyworld-attack-red"
    classifier = parse_classifier_args(["--config", "dyart/toyworld.yaml"])
    assert Path(resolve_path(classifier.init_checkpoint), "model.safetensors").is_file()
    assert classifier.output_dir == "rl_safety/toyworld/assets/reward_classifier_dyart"  # an output: not redirected


def test_a_user_path_relative_to_the_cwd_wins(elsewhere):
    from rl_safety.train import parse_args

    own = elsewhere / "prompts" / "toyworld" / "red"
    own.mkdir(parents=True)
    (own / "unsafe.txt").write_text("# tag: unsafe\na red thing\n")
    (elsewhere / "mine.yaml").write_text(
        (REPO / "recipes" / "toyworld" / "grpo_erase_red.yaml").read_text().replace("max_steps: 40", "max_steps: 3")
    )
    _, prompt_args, args = parse_args(["--config", "mine.yaml"])
    assert args.max_steps == 3
    assert prompt_args.train_prompts[0] == "prompts/toyworld/red/unsafe.txt"  # kept as written: the user's file
    assert prompt_args.train_prompts[1] != "prompts/toyworld/red/safe_train.txt"  # not in the cwd: the shipped one
    assert Path(prompt_args.train_prompts[1]).is_file()
    assert resolve_recipe("mine") == "mine.yaml"  # the user's recipe, relative to the cwd


def test_missing_paths_are_one_line_errors_saying_what_was_tried(elsewhere, capsys):
    code, err = run_cli(capsys, ["train", "--config", "toyworld/no_such_recipe"])
    assert code == 2 and len(err.splitlines()) == 1
    assert "--config toyworld/no_such_recipe: cannot read the recipe" in err and "tried" in err
    assert str(PACKAGE / "shipped" / "recipes") in err or str(PACKAGE.parent / "recipes") in err
    argv = ["train", "--config", "toyworld/grpo_erase_red", "--train_prompts", "prompts/toyworld/red/nope.txt"]
    code, err = run_cli(capsys, [*argv, "--output_dir", str(elsewhere / "out")])
    assert code == 2 and len(err.splitlines()) == 1
    assert "train_prompts: no prompt file 'prompts/toyworld/red/nope.txt' (tried prompts/toyworld/red/nope.txt" in err
    argv = ["train", "--config", "toyworld/grpo_erase_red", "--pretrained_model_name_or_path", "models/none/here"]
    code, err = run_cli(capsys, [*argv, "--output_dir", str(elsewhere / "out2")])
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(
        "rl-safety train: error: pretrained_model_name_or_path='models/none/here': no such directory"
    )


@pytest.mark.slow
def test_wheel_ships_recipes_prompts_and_models(tmp_path):
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", ".*cache*", "__pycache__", ".benchmarks")
    shutil.copytree(REPO, source, ignore=skip)
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source)]
    subprocess.run([*command, "-w", str(wheels)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("rl_safety-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [
        *(f"rl_safety/shipped/{p.relative_to(REPO).as_posix()}" for p in (REPO / "recipes").rglob("*.yaml")),
        *(f"rl_safety/shipped/{p.relative_to(REPO).as_posix()}" for p in (REPO / "prompts").rglob("*.txt")),
        *(p.relative_to(REPO).as_posix() for p in (REPO / "rl_safety/toyworld/assets").rglob("*.safetensors")),
        *(p.relative_to(REPO).as_posix() for p in (REPO / "rl_safety/toyworld/assets/pipeline").rglob("*.*")),
    ]
    assert len(expected) > 80
    assert sorted(set(expected) - names) == []
