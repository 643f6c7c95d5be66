"""`rl-safety classifier --config recipes/dyart/X.yaml [--field value ...]`: train a (robust) image classifier,
evaluate it with torchattacks, and save a checkpoint the `classifier` reward loads as it is.

accelerate launch -m rl_safety.classifiers.cli --config recipes/dyart/cifar10.yaml   # several processes / GPUs
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from ..command import run_command
from ..outputs import CONFIG_NAME, METRICS_NAME, atomic_write_text, holds_previous_run, write_resolved_config
from ..recipe_parser import ConfigError, RecipeParser
from ..resources import resolve_path, tried
from .config import ClassifierConfig
from .data import DataError, ImageData, load_data
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
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # safetensors and load_state_dict fail their own ways: one line either way
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
        tmp = output_dir / f".{CHECKPOINT_NAME}.tmp"
        save_file(state, str(tmp))
        tmp.replace(output_dir / CHECKPOINT_NAME)
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


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    output_dir = Path(config.output_dir)
    if holds_previous_run(output_dir) and not config.overwrite_output_dir:
        raise ConfigError(
            f"output_dir={str(output_dir)!r} holds a previous run; pass --overwrite_output_dir to replace it"
        )
    try:
        data = load_data(config.data, config.eval_data, config.eval_split, config.image_size, config.seed)
    except DataError as err:
        raise ConfigError(f"data: {str(err).splitlines()[0]}") from err
    check_data(config, data)
    if config.dyart_heads is not None and not set(config.dyart_heads) <= {str(h) for h in data.heads}:
        raise ConfigError(f"dyart_heads={config.dyart_heads}: the model's heads are {[str(h) for h in data.heads]}")
    accelerator = Accelerator()
    set_seed(config.seed)
    num_classes = len(data.class_names[data.heads[0]])
    args = architecture_args(config.architecture, num_classes, data.channels, config.width, None, None)
    model = build_model(config.architecture, args)
    if config.init_checkpoint:
        load_initial_weights(model, config.init_checkpoint)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / METRICS_NAME).unlink(missing_ok=True)
        shutil.rmtree(output_dir / "images", ignore_errors=True)
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
    start = time.perf_counter()
    trainer = ClassifierTrainer(model, config, data, accelerator)
    averaged = trainer.train()
    train_seconds = time.perf_counter() - start
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
        write_reports(output_dir, report)
        aa = report["autoattack_accuracy"]
        print(
            f"clean {report['clean_accuracy']:.4f}  PGD {report['pgd_accuracy']:.4f}  AutoAttack "
            f"{'n/a' if aa is None else f'{aa:.4f}'}  (epsilon {config.epsilon * 255:.2f}/255, {len(y)} images)"
        )
        print(f"checkpoint: {output_dir / CHECKPOINT_NAME}  report: {output_dir / 'report.html'}")
    accelerator.wait_for_everyone()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety classifier`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command(PROG, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
