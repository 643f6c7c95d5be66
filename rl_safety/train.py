"""Train a LoRA adapter from a recipe; its `trainer:` field (grpo, refl, esd) picks the config/trainer pair.

rl-safety train --config recipes/tiny/grpo_jpeg.yaml [--field value ...]
accelerate launch [--config_file recipes/accelerate/multi_gpu.yaml] -m rl_safety.train --config recipes/...yaml
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import diffusers
import torch
import transformers
import trl
import yaml

from rl_safety.rewards import RewardError, RewardStack

from .checkpoints import incomplete_reason, last_complete_checkpoint, remove_incomplete_checkpoints
from .checks import check_output_folder
from .command import load_error, run_command
from .concept import check_concept_files, fill_target_concept
from .evaluation.toyworld_config import ToyWorldEvalConfig
from .model_config import ModelArguments
from .outputs import (
    CONFIG_NAME,
    METRICS_NAME,
    MetricsFileCallback,
    atomic_write_text,
    holds_previous_run,
    write_model_card,
    write_resolved_config,
)
from .pipelines import load_pipeline, unmatched_lora_targets
from .prompt_config import PromptArguments
from .prompts import load_prompts
from .recipe_parser import ConfigError, RecipeParser
from .resources import resolve_path, resolve_recipe, resolve_reward_paths, tried
from .trainers import TRAINERS, DiffusionTrainer, DiffusionTrainingConfig
from .trainers.refl import check_differentiable


def trainer_name(argv: list[str]) -> str:
    """The recipe's `trainer:` (the command line's `--trainer` wins); 'grpo' when neither names one."""
    name = None
    for i, arg in enumerate(argv):
        if arg == "--trainer" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--trainer="):
            name = arg.split("=", 1)[1]
    if name is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        try:
            with open(resolve_recipe(argv[argv.index("--config") + 1])) as handle:
                recipe = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError):
            recipe = None  # the parser reports an unreadable recipe with its own message
        if isinstance(recipe, dict):
            name = recipe.get("trainer")
    name = "grpo" if name is None else name
    if name not in TRAINERS:
        raise ConfigError(f"trainer={name!r}: valid trainers are {', '.join(TRAINERS)}")
    return name


def foreign_fields(name: str) -> dict[str, str]:
    """Fields of the other trainers' configs, each with the one-line reason it is refused under `name`."""
    own = set(TRAINERS[name][0].__dataclass_fields__)
    owners: dict[str, list[str]] = {}
    for other, (config_class, _) in TRAINERS.items():
        for field_name in config_class.__dataclass_fields__:
            if field_name not in own:
                owners.setdefault(field_name, []).append(other)
    return {
        key: f"not a field of trainer {name} (it belongs to trainer {' and '.join(others)}); remove it or set "
        f"trainer: {others[0]}"
        for key, others in owners.items()
    }


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, PromptArguments, DiffusionTrainingConfig]:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = trainer_name(argv)
    parser = RecipeParser((ModelArguments, PromptArguments, TRAINERS[name][0]), foreign_fields=foreign_fields(name))
    model_args, prompt_args, args = parser.parse(argv)
    concept = prompt_args.target_concept
    try:
        check_concept_files(list(prompt_args.train_prompts or []), concept, "train_prompts")
        prompt_args.train_prompts = fill_target_concept(prompt_args.train_prompts, concept, "train_prompts")
        args.rewards = fill_target_concept(args.rewards, concept, "rewards")
        args.output_dir = fill_target_concept(args.output_dir, concept, "output_dir")
        if getattr(args, "explore_drop_words", None):
            args.explore_drop_words = fill_target_concept(args.explore_drop_words, concept, "explore_drop_words")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # Shipped names (recipes/, prompts/, rl_safety/toyworld/assets/) work from any folder; outputs stay where given.
    model_args.pretrained_model_name_or_path = resolve_path(model_args.pretrained_model_name_or_path, "dir")
    prompt_args.train_prompts = [resolve_path(source, "file") for source in prompt_args.train_prompts]
    args.rewards = resolve_reward_paths(args.rewards)
    if args.eval_config:
        args.eval_config = resolve_recipe(args.eval_config)
    return model_args, prompt_args, args


def check_world_size(num_processes: int) -> None:
    """Fail loudly when a multi-process launch collapsed into one process (e.g. `--cpu --num_processes 2`)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise ConfigError(
            f"WORLD_SIZE={launched} but accelerate sees 1 process; on a CPU-only host launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`"
        )


def continues_last(args: DiffusionTrainingConfig) -> bool:
    return str(args.resume_from_checkpoint).lower() in ("last", "true")


def resolve_resume(args: DiffusionTrainingConfig) -> str | None:
    """`resume_from_checkpoint`: a checkpoint folder, or 'last'/'true' for the newest complete one in output_dir
    (None when the run was interrupted before its first checkpoint: it starts again from step 0)."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if continues_last(args):
        if not holds_previous_run(args.output_dir):
            raise ConfigError(
                f"resume_from_checkpoint={value}: output_dir={args.output_dir!r} holds no run to continue"
            )
        last = last_complete_checkpoint(args.output_dir)
        if last is None and args.process_index == 0:
            print(f"rl-safety: no complete checkpoint in {args.output_dir}; training starts from step 0")
        return None if last is None else str(last)
    if not Path(value).is_dir():
        raise ConfigError(f"resume_from_checkpoint={value!r}: not a checkpoint folder (or use 'last')")
    reason = incomplete_reason(value)
    if reason:
        raise ConfigError(
            f"resume_from_checkpoint={value!r}: not a complete checkpoint ({reason}); 'last' picks the "
            "newest complete one"
        )
    return value


def check_output_dir(args: DiffusionTrainingConfig, resume: str | None) -> None:
    """A folder that can be written, holding no previous run unless asked to overwrite or resume."""
    try:
        check_output_folder(args.output_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if holds_previous_run(args.output_dir) and not (args.overwrite_output_dir or resume or continues_last(args)):
        raise ConfigError(
            f"output_dir={args.output_dir!r} holds a previous run; pass --overwrite_output_dir to replace it or "
            "--resume_from_checkpoint last to continue it"
        )


def prepare_output_dir(args: DiffusionTrainingConfig, resume: str | None, is_main: bool) -> None:
    """Create output_dir, or clear a replaced run's checkpoints; on resume drop half-written checkpoints and the
    metrics past the checkpoint, so metrics.jsonl reads as one uninterrupted run. Called once the inputs are
    validated (check_output_dir ran before), so bad input changes nothing on disk."""
    output_dir = Path(args.output_dir)
    if not is_main:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = output_dir / METRICS_NAME
    if resume is None:
        if args.overwrite_output_dir or continues_last(args):
            for child in output_dir.glob("checkpoint-*"):
                shutil.rmtree(child)
        metrics.unlink(missing_ok=True)
        return
    remove_incomplete_checkpoints(output_dir)  # a resumed run writes those steps again
    if metrics.exists():
        resumed_step = int(Path(resume).name.rsplit("-", 1)[-1])
        lines = metrics.read_text().splitlines()
        kept = [line for line in lines if (row := metrics_row(line)) and row["step"] <= resumed_step]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))


def metrics_row(line: str) -> dict | None:
    """One metrics.jsonl record; None for a blank line or the torn last line of a killed run."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def build_trainer(
    model_args: ModelArguments, prompt_args: PromptArguments, args: DiffusionTrainingConfig
) -> DiffusionTrainer:
    """Load prompts, rewards and the pipeline; bad input becomes a `ConfigError` naming what to fix."""
    if not model_args.pretrained_model_name_or_path:
        raise ConfigError("pretrained_model_name_or_path is required: a Hub id or a local diffusers directory")
    model_path = model_args.pretrained_model_name_or_path
    looks_local = model_path.startswith((".", "/", "~")) or model_path.count("/") > 1
    if looks_local and not Path(model_path).expanduser().is_dir():
        raise ConfigError(f"pretrained_model_name_or_path={model_path!r}: no such directory{tried(model_path)}")
    try:
        dataset = load_prompts(prompt_args)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    if args.adv_train and args.adv_prompts_tag not in set(dataset["tag"]):
        raise ConfigError(
            f"adv_prompts_tag={args.adv_prompts_tag!r}: no train prompt has that tag, so adv_train has nothing to "
            f"attack; tags present: {', '.join(sorted(set(dataset['tag'])))}"
        )
    missing = set(getattr(args, "explore_prompts_tags", None) or []) - set(dataset["tag"])
    if getattr(args, "explore_generations", 0) and missing:
        raise ConfigError(
            f"explore_prompts_tags: no train prompt has the tag {', '.join(sorted(missing))}; tags present: "
            f"{', '.join(sorted(set(dataset['tag'])))}"
        )
    for tags_field, weight_field in (("beta_prompts_tags", "beta"), ("anchor_prompts_tags", "anchor_loss_weight")):
        missing = set(getattr(args, tags_field, None) or []) - set(dataset["tag"])
        if getattr(args, weight_field, 0) and missing:
            raise ConfigError(
                f"{tags_field}: no train prompt has the tag {', '.join(sorted(missing))}; tags present: "
                f"{', '.join(sorted(set(dataset['tag'])))}"
            )
    if not args.rewards and args.needs_rewards:
        raise ConfigError("rewards: empty; add at least one, e.g. rewards: [{name: jpeg_incompressibility}]")
    reward_stack = None  # a method without rewards (ESD)
    try:
        if args.rewards:
            reward_stack = RewardStack.from_config(args.rewards, args.reward_weights)
    except RewardError as err:
        raise ConfigError(str(err)) from err
    if args.trainer == "refl":
        try:
            check_differentiable(reward_stack)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    problem = unmatched_lora_targets(model_args, args.lora_targets())
    if problem:
        raise ConfigError(problem)
    try:
        pipeline = load_pipeline(model_args)
    except (OSError, ValueError) as err:
        raise load_error("pretrained_model_name_or_path", model_path, err) from err
    trainer_class = TRAINERS[args.trainer][1]
    extra = {"target_concept": prompt_args.target_concept} if args.trainer == "refl" else {}
    try:
        return trainer_class(pipeline, args, dataset, reward_stack, callbacks=[MetricsFileCallback()], **extra)
    except (OSError, ValueError) as err:
        # Settings that only the loaded model or data can check (scheduler, differentiability, regulariser data).
        raise ConfigError(str(err).strip().splitlines()[0]) from err


def runtime_info(trainer: DiffusionTrainer) -> dict:
    return {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "device": str(trainer.accelerator.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def summary(log_history: list[dict], output_dir: Path, window: int = 5) -> str:
    """Mean reward over the first and the last `window` logged steps, and where the adapter is."""
    rewards = [entry["reward"] for entry in log_history if "reward" in entry]
    lines = [f"adapter: {output_dir / 'pytorch_lora_weights.safetensors'}"]
    if rewards:
        n = min(window, len(rewards))
        first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
        lines.insert(0, f"reward: {first:.4f} (mean of the first {n} steps) -> {last:.4f} (last {n} steps)")
    return "\n".join(lines)


def eval_recipe(
    eval_config: str, model_args: ModelArguments, prompt_args: PromptArguments, output_dir: Path
) -> ToyWorldEvalConfig:
    """The evaluation recipe `eval_config` aimed at this run: its base model, its concept, its adapter."""
    from .evaluation.toyworld import parse_args as parse_eval_args

    argv = ["--config", eval_config, "--adapter", str(output_dir), "--output_dir", str(output_dir / "eval")]
    argv += ["--overwrite_output_dir"]
    if model_args.pretrained_model_name_or_path:
        argv += ["--pretrained_model_name_or_path", model_args.pretrained_model_name_or_path]
    if prompt_args.target_concept:
        argv += ["--target_concept", prompt_args.target_concept]
    try:
        return parse_eval_args(argv)
    except ConfigError as err:
        raise ConfigError(f"eval_config={eval_config!r}: {err}") from err


def evaluate_after_training(config: ToyWorldEvalConfig) -> None:
    """Run the evaluation on the base model and the new adapter into OUTPUT_DIR/eval; print its table."""
    from .evaluation.toyworld import evaluate, format_table

    report = evaluate(config)
    print(format_table(report))
    print(f"evaluation report: {Path(config.output_dir) / 'report.html'}")


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Turn the loading bars of diffusers, transformers and huggingface_hub off (when not `enabled`) for the block,
    restoring their previous state after: `disable_tqdm` then silences every bar of a run, not only Trainer's."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    if enabled:
        yield
        return
    was = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
        not are_progress_bars_disabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        for on, library in zip(was[:2], (diffusers_logging, transformers_logging)):
            if on:
                library.enable_progress_bar()
        if was[2]:
            enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    model_args, prompt_args, args = parse_args(argv)
    with library_progress_bars(enabled=not args.disable_tqdm):
        return run(model_args, prompt_args, args)


def run(model_args: ModelArguments, prompt_args: PromptArguments, args: DiffusionTrainingConfig) -> int:
    """Train (and evaluate, with `eval_config`) as the parsed recipe says; `main` without the parsing."""
    # Read before any work, so a bad evaluation recipe fails now rather than after training.
    evaluation = None
    if args.eval_config:
        evaluation = eval_recipe(args.eval_config, model_args, prompt_args, Path(args.output_dir))
    resume = resolve_resume(args)
    check_output_dir(args, resume)
    trainer = build_trainer(model_args, prompt_args, args)
    prepare_output_dir(args, resume, is_main=trainer.is_world_process_zero())
    check_world_size(trainer.accelerator.num_processes)
    output_dir = Path(args.output_dir)
    if trainer.is_world_process_zero():
        runtime = runtime_info(trainer)
        print(f"rl-safety: training on {runtime['world_size']} process(es), {runtime['device']} -> {output_dir}")
        write_resolved_config(output_dir / CONFIG_NAME, (model_args, prompt_args, args), runtime)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        final = {k: v for k, v in trainer.state.log_history[-1].items()} if trainer.state.log_history else {}
        final.update(result.metrics)
        recipe = {**vars(model_args), **vars(prompt_args), "rewards": args.rewards}
        write_model_card(
            output_dir,
            model_args.pretrained_model_name_or_path,
            recipe,
            args.rewards,
            final,
            trainer_name=type(trainer).__name__,
            method_tag=args.trainer,
        )
        print(summary(trainer.state.log_history, output_dir))
    trainer.accelerator.wait_for_everyone()
    # After the last collective: the other processes may exit while the main one evaluates.
    if evaluation is not None and trainer.is_world_process_zero():
        evaluate_after_training(evaluation)
    # Last, so the card holds the evaluation table; only the main process uploads (see DiffusionTrainer.push_to_hub).
    if args.push_to_hub and trainer.is_world_process_zero():
        print(f"pushed to {trainer.push_to_hub()}")
    return 0


RESUME_HINT = "add --resume_from_checkpoint last to the same command to continue from the last complete checkpoint"


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety train`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command("rl-safety train", main, argv, resume_hint=RESUME_HINT)


if __name__ == "__main__":
    sys.exit(cli())
