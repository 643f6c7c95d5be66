"""`rl-safety classifier --config recipes/dyart/X.yaml [--field value ...]`: train a (robust) image classifier,
evaluate it with torchattacks, and save a checkpoint the `classifier` reward loads as it is.

accelerate launch -m rl_safety.classifiers.cli --config recipes/dyart/cifar10.yaml   # several processes / GPUs

Every input (fields, data, architecture, initial weights, output folder, the checkpoint to resume) is checked before
the output folder is touched. A run killed at any point continues with `--resume_from_checkpoint last`
(`checkpoint.py`); one killed during its evaluation does not train again.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from ..checks import check_output_folder
from ..command import loading, run_command
from ..outputs import CONFIG_NAME, atomic_write, atomic_write_text, write_resolved_config
from ..recipe_parser import ConfigError, RecipeParser
from ..resources import resolve_path, tried
from .checkpoint import (
    check_compatible,
    prepare_output_dir,
    read_checkpoint,
    remove_checkpoints,
    resolve_resume,
    trained_with,
)
from .config import ClassifierConfig
from .data import ImageData, load_data
from .evaluate import autoattack_name, evaluate_robustness, write_reports
from .models import PATHS, architecture_args, build_model
from .trainer import ClassifierTrainer

PROG = "rl-safety classifier"
CHECKPOINT_NAME = "model.safetensors"


def parse_args(argv: list[str] | None = None) -> ClassifierConfig:
    """The recipe and its command-line overrides; bad input is a `ConfigError`."""
    (config,) = RecipeParser((ClassifierConfig,), prog=PROG).parse(argv)
    if not config.data:
        raise ConfigError("data is required: an .npz file, an image folder, a `datasets` id or toyworld")
    # One recipe serves every method: `--method pgd_at` also moves output_dir when it names {method}.
    config.output_dir = config.output_dir.replace("{method}", config.method)
    return config


def check_architecture(model: torch.nn.Module, config: ClassifierConfig, data: ImageData) -> None:
    """One image through the model (eval mode: no statistics change), so a misfit is an error now, not a traceback
    after the output folder was written."""
    try:
        with torch.no_grad():
            model.eval()(data.train.x[:1].float().div(255))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"architecture={config.architecture!r} cannot run on {tuple(data.train.x.shape[1:])} images "
            f"({' '.join(str(err).split())[:160]}); set image_size or pick another architecture"
        ) from err
    model.train()


def check_data(config: ClassifierConfig, data: ImageData) -> None:
    """The architecture must fit the data: the toy world's two heads need its two labels, and the reverse."""
    multi = len(data.heads) > 1
    if config.architecture == "toyworld" and not multi:
        raise ConfigError("architecture=toyworld has colour and shape heads: use data: toyworld (both labels)")
    if multi and config.architecture != "toyworld":
        raise ConfigError(f"data={config.data!r} has colour and shape labels: use architecture: toyworld")
    if config.architecture == "toyworld" and (data.channels != 3 or data.train.x.shape[-1] != 32):
        raise ConfigError("architecture=toyworld expects 3-channel 32 px images")


def load_initial_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """Load `init_checkpoint` (a safetensors file or a folder with model.safetensors) into `model`."""
    from safetensors.torch import load_file

    path = Path(resolve_path(checkpoint)).expanduser()  # as given, or a shipped model (rl_safety/resources.py)
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"init_checkpoint={checkpoint!r}: no {CHECKPOINT_NAME} there{tried(checkpoint)}")
    with loading("init_checkpoint", checkpoint):
        state = load_file(str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            f"init_checkpoint={checkpoint!r} does not fit the architecture ({' '.join(str(err).split())[:200]})"
        ) from err


def save_checkpoint(
    model: torch.nn.Module, config: ClassifierConfig, data: ImageData, args: dict, report: dict | None = None
) -> None:
    """model.safetensors + config.json: `architecture`, `architecture_args` and class names, the format the
    `classifier` reward (checkpoint + architecture + architecture_args) and the toy-world rewards read. Called once
    before the (slow) evaluation, so its weights survive an interrupted one, and again with its results."""
    output_dir = Path(config.output_dir)
    if report is None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(output_dir / CHECKPOINT_NAME, lambda tmp: save_file(state, tmp))
    meta = {"architecture": PATHS[config.architecture], "architecture_args": args}
    if len(data.heads) > 1:
        meta.update({f"{head}_names": names for head, names in data.class_names.items()})
        if report is not None:
            meta["held_out"] = {f"{h}_accuracy": report["heads"][h]["clean_accuracy"] for h in report["heads"]}
    else:
        meta["class_names"] = data.class_names[None]
        if report is not None:
            meta["held_out"] = {"clean_accuracy": report["clean_accuracy"]}
    if report is not None:
        keys = ("epsilon", "clean_accuracy", "pgd_accuracy", "autoattack_accuracy")
        meta["robustness"] = {k: report[k] for k in keys if k in report}
    meta["method"] = config.method
    atomic_write_text(output_dir / "config.json", json.dumps(meta, indent=2) + "\n")


def check_inputs(config: ClassifierConfig) -> tuple[Path | None, ImageData]:
    """The output folder, the checkpoint to resume, the data and its heads: checked before anything is written."""
    try:
        check_output_folder(config.output_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    resume = resolve_resume(config)
    data = load_data(
        config.data,
        config.eval_data,
        config.eval_split,
        config.image_size,
        config.seed,
        config.image_column,
        config.label_column,
    )
    check_data(config, data)
    heads = [str(h) for h in data.heads]
    if config.dyart_heads is not None and not set(config.dyart_heads) <= set(heads):
        if data.heads == [None]:
            raise ConfigError(f"dyart_heads={config.dyart_heads}: data={config.data!r} has one head; leave it unset")
        raise ConfigError(f"dyart_heads={config.dyart_heads}: the model's heads are {heads}")
    return resume, data


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    output_dir = Path(config.output_dir)
    resume, data = check_inputs(config)
    accelerator = Accelerator()
    set_seed(config.seed)
    num_classes = len(data.class_names[data.heads[0]])
    args = architecture_args(config.architecture, num_classes, data.channels, config.width, None, None)
    model = build_model(config.architecture, args)
    check_architecture(model, config, data)
    if config.init_checkpoint:
        load_initial_weights(model, config.init_checkpoint)
    trainer = ClassifierTrainer(model, config, data, accelerator)
    trainer.trained_with = trained_with(
        config, accelerator.num_processes, len(data.train.y), list(data.train.x.shape[1:])
    )
    if resume is not None:
        parts = read_checkpoint(resume)
        check_compatible(resume, parts["state"].get("trained_with", {}), trainer.trained_with)
        trainer.restore(parts, resume)
    accelerator.wait_for_everyone()  # every process has read its checkpoint before the main one tidies output_dir
    if accelerator.is_main_process:
        # Only now, with every input checked, is output_dir written to.
        prepare_output_dir(output_dir, resume, trainer.log_history)
        runtime = {
            "world_size": accelerator.num_processes,
            "device": str(accelerator.device),
            "num_train": len(data.train.y),
            "num_eval": len(data.eval.y),
            "image_shape": list(data.train.x.shape[1:]),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        write_resolved_config(output_dir / CONFIG_NAME, (config,), runtime)
        print(
            f"{PROG}: {config.method} on {len(data.train.y)} images {tuple(data.train.x.shape[1:])}, "
            f"{accelerator.num_processes} process(es), {accelerator.device} -> {output_dir}"
        )
        if resume is not None:
            print(f"{PROG}: resuming from {resume} (step {trainer.global_step} of {trainer.total_steps})")
        elif config.resume_from_checkpoint:
            print(f"{PROG}: no complete checkpoint in {output_dir}; training starts from step 0")
    accelerator.wait_for_everyone()
    averaged = trainer.train()
    train_seconds = trainer.train_seconds
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        import torchattacks

        save_checkpoint(averaged, config, data, args)

        count = config.eval_samples or len(data.eval.y)
        x = data.eval.x[:count].float().div(255).to(accelerator.device)
        y = data.eval.y[:count].to(accelerator.device)
        start = time.perf_counter()
        report = evaluate_robustness(
            averaged, x, y, data.class_names, config.epsilon, config.epsilons, config.eval_pgd_steps,
            config.autoattack, config.eval_batch_size, config.seed, config.autoattack_epsilons,
        )  # fmt: skip
        report = {
            "method": config.method,
            "data": config.data,
            "architecture": config.architecture,
            "epsilon": config.epsilon,
            "num_train_epochs": config.num_train_epochs,
            "num_eval": len(y),
            **report,
            "attacks": {
                "pgd": f"torchattacks.PGD, {config.eval_pgd_steps} steps of epsilon/4, random start",
                "autoattack": autoattack_name(min(len(n) for n in data.class_names.values()))
                if config.autoattack
                else None,
            },
            "torchattacks_version": torchattacks.__version__,
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.perf_counter() - start, 1),
        }
        save_checkpoint(averaged, config, data, args, report)
        write_reports(output_dir, report)  # report.json last: it marks the run finished
        remove_checkpoints(output_dir)
        aa = report["autoattack_accuracy"]
        print(
            f"clean {report['clean_accuracy']:.4f}  PGD {report['pgd_accuracy']:.4f}  AutoAttack "
            f"{'n/a' if aa is None else f'{aa:.4f}'}  (epsilon {config.epsilon * 255:.2f}/255, {len(y)} images)"
        )
        print(f"checkpoint: {output_dir / CHECKPOINT_NAME}  report: {output_dir / 'report.html'}")
    accelerator.wait_for_everyone()
    return 0


RESUME_HINT = "add --resume_from_checkpoint last to the same command to continue from the last complete checkpoint"


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety classifier`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command(PROG, main, argv, resume_hint=RESUME_HINT)


if __name__ == "__main__":
    sys.exit(cli())
