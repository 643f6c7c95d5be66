"""Bad input → one line on stderr naming the field and what is valid, exit status 2, no traceback."""

import shutil
import subprocess
import sys

import pytest

from rl_safety.cli import main
from tests.conftest import REPO, fill, recipe_args


def run_cli(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def recipe(tmp_path, tiny_sd_path, prompt_file):
    def write(**fields):
        base = {
            "pretrained_model_name_or_path": str(tiny_sd_path),
            "train_prompts": [str(prompt_file)],
            "output_dir": str(tmp_path / "out"),
            "rewards": [{"name": "jpeg_incompressibility"}],
            "max_steps": 1,
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "num_inference_steps": 2,
            "report_to": "none",
        }
        base.update(fields)
        base = {key: value for key, value in base.items() if value is not None}  # None drops a base field
        path = tmp_path / "recipe.yaml"
        import yaml

        path.write_text(yaml.safe_dump(base))
        return str(path)

    return write


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"learning_rat": 1e-4}, "unknown recipe key 'learning_rat'; did you mean 'learning_rate'"),
        ({"num_generations": 2.5}, "recipe key 'num_generations': expected int, got 2.5"),
        ({"num_generations": "many"}, "--num_generations/--num-generations: invalid int value: 'many'"),
        ({"scale_rewards": "median"}, "scale_rewards='median': must be one of group, batch, none"),
        ({"pretrained_model_name_or_path": "./no/such/model"}, "pretrained_model_name_or_path='./no/such/model'"),
        ({"rewards": [{"name": "jpeg_size"}]}, "unknown reward 'jpeg_size'; valid names: classifier, clip_steering"),
        ({"train_prompts": ["missing.txt"]}, "train_prompts: no prompt file 'missing.txt'"),
        ({"num_generations": 3}, "num_generations=3: must divide the global rollout"),
        ({"eta": 0.0}, "eta=0.0: must be > 0"),
        ({"learning_rate": -1}, "learning_rate=-1: must be > 0"),
        ({"lora_rank": 0}, "lora_rank=0: must be ≥ 1"),
        (
            {"lora_target_modules": ["nonexistent_mod"]},
            "lora_target_modules=['nonexistent_mod']: no module of the UNet",
        ),
        ({"guidance_scale": 0.5}, "guidance_scale=0.5: must be ≥ 1"),
        ({"resolution": 30}, "resolution=30: must be a multiple of 8"),
        ({"adv_epsilon": 0}, "adv_epsilon=0: must be > 0"),
        ({"adv_share": 2}, "adv_share=2: must be in [0, 1]"),
        ({"adv_refresh_steps": 0}, "adv_refresh_steps=0: must be ≥ 1"),
        ({"adv_objective": "pez"}, "adv_objective='pez'"),
        ({"adv_train": True}, "adv_prompts_tag='unsafe': no train prompt has that tag"),
        (
            {"explore_generations": 1, "explore_drop_words": ["red"], "explore_prompts_tags": ["unsafe"]},
            "explore_prompts_tags: no train prompt has the tag unsafe; tags present: safe",
        ),
        (
            {"beta": 0.1, "beta_prompts_tags": ["unsafe"]},
            "beta_prompts_tags: no train prompt has the tag unsafe; tags present: safe",
        ),
        ({"explore_generations": 2}, "explore_generations=2: must be in [0, num_generations=2)"),
        (
            {"explore_generations": 1, "explore_from_base": False},
            "explore_drop_words=[]: must name at least one word when exploring with the policy itself",
        ),
        ({"trainer": "dpo"}, "trainer='dpo': valid trainers are grpo, refl, esd"),
        ({"negative_guidance": 1.0}, "'negative_guidance': not a field of trainer grpo (it belongs to trainer esd)"),
        ({"eval_config": "missing.yaml"}, "eval_config="),
        ({"push_to_hub": True}, "hub_model_id"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0: must be ≥ 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0: must be ≥ 1"),
        ({"save_steps": 0}, "save_steps=0: must be > 0"),
        ({"resolution": 0}, "resolution=0: must be ≥ 8"),
        ({"weight_decay": -1}, "weight_decay=-1: must be ≥ 0"),
        ({"adam_beta1": 1.5}, "adam_beta1=1.5: must be in [0, 1)"),
        ({"adam_beta2": -0.1}, "adam_beta2=-0.1: must be in [0, 1)"),
        ({"num_generations": 1}, "num_generations=1: must be ≥ 2"),
        ({"lora_rank": "big"}, "--lora_rank/--lora-rank: invalid int value: 'big'"),
        ({"rewards": [{"name": "jpeg_incompressibility", "weight": "heavy"}]}, "rewards[0].weight='heavy'"),
        ({"rewards": [{"name": "jpeg_incompressibility", "args": {"nope": 1}}]}, "bad args ['nope']"),
        ({"rewards": []}, "rewards: empty"),
        ({"train_prompts": []}, "train_prompts: empty"),
        ({"resume_from_checkpoint": "nowhere"}, "resume_from_checkpoint='nowhere': not a checkpoint folder"),
        ({"resume_from_checkpoint": "last"}, "resume_from_checkpoint=last: "),
        ({"torch_dtype": "float8"}, "torch_dtype='float8': expected one of"),
        ({"save_total_limit": -2}, "save_total_limit=-2: must be ≥ 1 or unset"),
        ({"logging_steps": -1}, "logging_steps=-1"),
        ({"max_grad_norm": -1}, "max_grad_norm=-1"),
        ({"seed": -1}, "seed=-1: must be ≥ 0"),
        ({"max_steps": 0}, "max_steps=0: must be ≥ 1, or -1 to train num_train_epochs"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers=-1: must be ≥ 0"),
        ({"lr_scheduler_type": "nosuch"}, "lr_scheduler_type='nosuch': must be one of linear, cosine"),
        ({"warmup_steps": -3}, "warmup_steps = -3"),
        ({"report_to": "nosuch"}, "report_to='nosuch': not a tracker; valid: none, all, azure_ml"),
        ({"report_to": "kubeflow"}, "report_to='kubeflow': not installed here"),
        ({"rewards": [{"name": "classifier", "args": 5}]}, "rewards[0].args=5: must be a mapping"),
        ({"rewards": [{"name": 3}]}, "rewards[0].name=3: must be a reward name"),
        ({"rewards": [{"name": "os:path"}]}, "reward 'os:path': a module, not a reward class or function"),
    ],
)
def test_bad_recipe(capsys, recipe, fields, expected):
    code, err = run_cli(capsys, ["train", "--config", recipe(**fields)])
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert expected in err


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"trainer": "refl", "num_inference_steps": 4}, "not differentiable"),
        ({"trainer": "refl", "grad_step_window": [0.9, 0.5]}, "grad_step_window=[0.9, 0.5]: must be [start, end]"),
        ({"trainer": "refl", "grad_step_window": [0.6, 0.7]}, "holds no step index of a 2-step schedule"),
        ({"trainer": "refl", "reward_loss": "hinge"}, "reward_loss='hinge'"),
        ({"trainer": "refl", "reward_scale": -1}, "reward_scale=-1"),
        ({"trainer": "refl", "pretrain_every": 1}, "pretrain_every=1: 1 would never take a reward step"),
        ({"trainer": "refl", "anchor_loss_weight": -1}, "anchor_loss_weight=-1: must be ≥ 0"),
        (
            {"trainer": "refl", "num_inference_steps": 4, "anchor_loss_weight": 1, "anchor_prompts_tags": ["keep"]},
            "anchor_prompts_tags: no train prompt has the tag keep; tags present: safe",
        ),
        ({"trainer": "refl", "num_inference_steps": 4, "pretrain_every": 3}, "pretrain_every=3: set pretrain_dataset"),
        ({"trainer": "refl", "num_generations": 4}, "'num_generations': not a field of trainer refl"),
        ({"trainer": "esd"}, "rewards=[{'name': 'jpeg_incompressibility'}]: ESD trains without rewards"),
        ({"trainer": "esd", "rewards": [], "train_method": "attn"}, "train_method"),
        ({"trainer": "esd", "rewards": [], "negative_guidance": -1}, "negative_guidance=-1"),
        ({"trainer": "esd", "rewards": [], "start_guidance": 0.5}, "start_guidance=0.5: must be ≥ 1"),
    ],
)
def test_bad_refl_and_esd_recipe(capsys, recipe, fields, expected):
    fields = {"num_generations": None, **fields}  # a GRPO field of the base recipe
    code, err = run_cli(capsys, ["train", "--config", recipe(**fields)])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.csv", b'prompt\n"unterminated\n', "does not parse as csv"),
        ("bad.parquet", b"\x00\x01 not parquet", "does not parse as parquet"),
        ("cols.csv", b"text,tag\na red circle,safe\n", "has no column 'prompt' (prompt_column); columns: text, tag"),
        ("empty.txt", b"# tag: safe\n", "hold no prompts"),
        ("folder", None, "is not a prompt file (.txt, .csv"),
    ],
)
def test_bad_prompt_files(capsys, recipe, tmp_path, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.mkdir()  # a folder with nothing `datasets` can read
    else:
        path.write_bytes(content)
    code, err = run_cli(capsys, ["train", "--config", recipe(train_prompts=[str(path)])])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"train_prompts: {str(path)!r}" in err or "train_prompts: [" in err, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"output_dir": "{tmp}/a_file"}, "output_dir='{tmp}/a_file': is a file, not a folder"),
        ({"output_dir": "{tmp}/a_file/run"}, "'{tmp}/a_file' is a file, so the folder cannot be created"),
        ({"train_prompts": ["{tmp}/binary.txt"]}, "prompt file '{tmp}/binary.txt' is not UTF-8 text"),
        (
            {"eval_config": "{tmp}/broken.yaml"},
            "eval_config='{tmp}/broken.yaml': --config {tmp}/broken.yaml: not valid",
        ),
        ({"pretrained_model_name_or_path": "{tmp}/empty_folder"}, "no model_index.json in that folder"),
        ({"pretrained_model_name_or_path": "{tmp}/broken_model"}, "unet/diffusion_pytorch_model.safetensors is not a"),
    ],
)
def test_bad_files_in_a_recipe(capsys, recipe, bad_files, tiny_sd_path, fields, expected):
    broken = bad_files / "broken_model"  # a copy of the tiny pipeline with its UNet weights cut short
    shutil.copytree(tiny_sd_path, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    fields = {
        key: fill(value, bad_files) if isinstance(value, list) else fill([value], bad_files)[0]
        for key, value in fields.items()
    }
    code, err = run_cli(capsys, ["train", "--config", recipe(**fields)])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected.format(tmp=bad_files) in err, err
    assert not (bad_files / "out").exists()


def test_a_half_written_checkpoint_is_refused_by_name(capsys, recipe, tmp_path):
    folder = tmp_path / "out" / "checkpoint-3"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"torn")
    code, err = run_cli(capsys, ["train", "--config", recipe(resume_from_checkpoint=str(folder))])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"resume_from_checkpoint={str(folder)!r}: not a complete checkpoint (its save did not finish" in err


def test_unknown_cli_flag_and_missing_recipe(capsys, recipe):
    code, err = run_cli(capsys, ["train", "--config", recipe(), "--num_generation", "4"])
    assert code == 2 and "unknown argument 'num_generation'; did you mean 'num_generations'" in err
    code, err = run_cli(capsys, ["train", "--config", "recipes/nope.yaml"])
    assert code == 2 and "--config recipes/nope.yaml: cannot read the recipe" in err


def test_previous_run_is_not_overwritten(capsys, recipe, tmp_path):
    path = recipe()
    assert main(["train", "--config", path]) == 0
    lora = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    before = lora.read_bytes()
    code, err = run_cli(capsys, ["train", "--config", path])
    assert code == 2 and "holds a previous run; pass --overwrite_output_dir" in err
    assert lora.read_bytes() == before
    assert main(["train", "--config", path, "--overwrite_output_dir", "true", "--learning_rate", "0.5"]) == 0
    assert lora.read_bytes() != before


def test_console_script_reports_one_line(tmp_path, tiny_sd_path, prompt_file):
    argv = recipe_args(tiny_sd_path, prompt_file, tmp_path / "o", rewards='{"name": "nope"}')
    proc = subprocess.run(
        [sys.executable, "-m", "rl_safety.cli", "train", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("rl-safety train: error: unknown reward 'nope'")
    assert "Traceback" not in proc.stderr


def test_world_size_guard(monkeypatch):
    from rl_safety.recipe_parser import ConfigError
    from rl_safety.train import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but accelerate sees 1 process"):
        check_world_size(1)
    check_world_size(2)
