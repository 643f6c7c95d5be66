"""`rl-safety toyworld <step>`: the commands that build the toy world's shipped models.

Every step checks its arguments and its output folder before any work starts: bad input is one line on stderr and
exit status 2 (`rl_safety/command.py`). A model is written to a temporary folder that takes the place of the output
folder only once it is complete (`outputs.atomic_folder`), so a failed or interrupted run leaves nothing to load.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..checks import MAX_SEED, check_fields, check_output_folder, check_seed
from ..command import ArgumentParser, run_command
from ..errors import ConfigError
from . import ASSETS

PROG = "rl-safety toyworld"
# The reward classifier and the evaluation judge are the same architecture trained on different seeds and images.
ROLES = {"reward": 0, "judge": 1}
# The files that mark a folder as holding a saved model of each kind.
CLASSIFIER_FILES = ("model.safetensors", "config.json")
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_config.json", "metrics.json")
NOTHING_WRITTEN = "nothing was written (the model is saved at the end); run the same command again to start over"


def check(args, *rules: tuple[bool, str, str]) -> None:
    """`check_fields` as a `ConfigError`."""
    try:
        check_fields(args, *rules)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def checked_seed(value: int, field: str = "seed") -> int:
    """`value` if it is a valid seed, else a `ConfigError`."""
    try:
        check_seed(value, field)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return value


def model_folder(value: str | Path, markers: tuple[str, ...], what: str, overwrite: bool) -> Path:
    """An output folder for a model: not a file, creatable and writable here, and not holding a saved `what` unless
    `--overwrite_output_dir` (then the new model replaces it when complete)."""
    path = Path(value)
    try:
        check_output_folder(path)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    found = [name for name in markers if (path / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"output_dir={str(value)!r}: holds {what} ({', '.join(found)}); pass --overwrite_output_dir to replace "
            "it, or choose another output_dir"
        )
    return path


def classifier_main(argv: list[str] | None = None) -> int:
    """`rl-safety toyworld classifier`: train the reward classifier or the judge."""
    parser = ArgumentParser(prog=f"{PROG} classifier", description="Train an attribute classifier.")
    parser.add_argument("--role", choices=sorted(ROLES), default="reward", help="reward classifier or the judge")
    parser.add_argument("--output_dir", help="default: the shipped location rl_safety/toyworld/assets/ROLE_classifier")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace a classifier in output_dir")
    parser.add_argument("--steps", type=int, default=600, help="training steps (≥ 1)")
    parser.add_argument("--num_images", type=int, default=10000, help="training images (≥ 1)")
    parser.add_argument("--seed", type=int, help="default: 0 for the reward classifier, 1 for the judge")
    args = parser.parse_args(argv)
    seed = checked_seed(ROLES[args.role] if args.seed is None else args.seed)
    check(args, (args.steps >= 1, "steps", "must be ≥ 1"), (args.num_images >= 1, "num_images", "must be ≥ 1"))
    output_dir = args.output_dir if args.output_dir is not None else ASSETS / f"{args.role}_classifier"
    output = model_folder(output_dir, CLASSIFIER_FILES, "a classifier", args.overwrite_output_dir)

    from .classifier import save_classifier, train_classifier

    model, metrics = train_classifier(steps=args.steps, num_images=args.num_images, seed=seed)
    save_classifier(model, output, metrics)
    print(
        f"wrote {output}: held-out colour accuracy {metrics['colour_accuracy']:.4f}, "
        f"shape accuracy {metrics['shape_accuracy']:.4f}"
    )
    return 0


def clip_main(argv: list[str] | None = None) -> int:
    """`rl-safety toyworld clip`: train the toy world's CLIP."""
    import time

    parser = ArgumentParser(
        prog=f"{PROG} clip", description="Train the toy world's CLIP (saved in open_clip's folder format)."
    )
    parser.add_argument("--output_dir", help="default: the shipped location rl_safety/toyworld/assets/clip")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace a CLIP in output_dir")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (≥ 1)")
    parser.add_argument("--batch_size", type=int, default=256, help="image-caption pairs per step (≥ 1)")
    parser.add_argument("--num_images", type=int, default=20000, help="training images (≥ 1)")
    parser.add_argument("--seed", type=int, default=0, help="training seed; the held-out images use seed + 1000")
    args = parser.parse_args(argv)
    checked_seed(args.seed)
    check(
        args,
        (args.seed + 1000 <= MAX_SEED, "seed", f"must be ≤ {MAX_SEED - 1000} (the held-out images use seed + 1000)"),
        (args.steps >= 1, "steps", "must be ≥ 1"),
        (args.batch_size >= 1, "batch_size", "must be ≥ 1"),
        (args.num_images >= 1, "num_images", "must be ≥ 1"),
    )
    output_dir = args.output_dir if args.output_dir is not None else ASSETS / "clip"
    output = model_folder(output_dir, CLIP_FILES, "a CLIP model", args.overwrite_output_dir)

    from .clip import save_clip, train_clip

    start = time.perf_counter()
    model, metrics, losses = train_clip(
        steps=args.steps, batch_size=args.batch_size, num_images=args.num_images, seed=args.seed
    )
    training = {
        "command": " ".join([f"{PROG} clip", *(argv or [])]),
        **{k: getattr(args, k) for k in ("steps", "batch_size", "num_images", "seed")},
        "held_out_seed": args.seed + 1000,
        "final_loss": round(losses[-1], 4),
        "seconds": round(time.perf_counter() - start),
    }
    save_clip(model, output, metrics, training)
    accuracies = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    print(f"wrote {output} in {training['seconds']} s: held-out zero-shot {accuracies}")
    return 0


def prompts_main(argv: list[str] | None = None) -> int:
    """`rl-safety toyworld prompts`: write the safety scenario's prompt sets."""
    from .prompt_sets import blocked_prompt_paths, changed_prompt_files, write_prompt_sets

    parser = ArgumentParser(
        prog=f"{PROG} prompts", description="Write the safety scenario's prompt sets for every concept."
    )
    parser.add_argument("--output_dir", default="prompts/toyworld", help="default: prompts/toyworld")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace prompt files that differ from the generated ones"
    )
    args = parser.parse_args(argv)
    check(args, (args.output_dir.strip() != "", "output_dir", "must name a folder"))
    try:
        check_output_folder(args.output_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    blocked = blocked_prompt_paths(args.output_dir)
    if blocked:
        path = blocked[0]
        problem = f"{path.parent} is a file, not a folder" if path.parent.is_file() else f"{path} is not a file"
        raise ConfigError(f"output_dir={args.output_dir!r}: {problem}; remove it or choose another output_dir")
    changed = changed_prompt_files(args.output_dir)
    if changed and not args.overwrite_output_dir:
        shown = ", ".join(str(Path(path).relative_to(args.output_dir)) for path in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"output_dir={args.output_dir!r}: {shown}{more} differ from the generated prompt sets; "
            "pass --overwrite_output_dir to replace them, or choose another output_dir"
        )
    written = write_prompt_sets(args.output_dir)
    print(f"wrote {len(written)} prompt files under {args.output_dir}")
    return 0


def quality_main(argv: list[str] | None = None) -> int:
    """`rl-safety toyworld quality`: prompt accuracy of a toy-world pipeline."""
    import json

    from ..command import loading
    from ..resources import resolve_path, tried

    parser = ArgumentParser(prog=f"{PROG} quality", description="Prompt accuracy of a pipeline.")
    parser.add_argument("--pipeline", default=str(ASSETS / "pipeline"), help="a diffusers pipeline folder")
    parser.add_argument("--seeds", type=int, default=10, help="each seed samples all 24 colour-shape prompts (≥ 1)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (≥ 1)")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="≥ 1 (1: no classifier-free guidance)")
    args = parser.parse_args(argv)
    check(
        args,
        (args.seeds >= 1, "seeds", "must be ≥ 1"),
        (args.seeds - 1 <= MAX_SEED, "seeds", f"must be ≤ {MAX_SEED + 1}"),
        (args.steps >= 1, "steps", "must be ≥ 1"),
        (args.guidance_scale >= 1, "guidance_scale", "must be ≥ 1 (1: no classifier-free guidance)"),
    )
    path = Path(resolve_path(args.pipeline, "dir"))  # as given, or the shipped copy (rl_safety/resources.py)
    if path.is_file():
        raise ConfigError(f"pipeline={args.pipeline!r}: is a file, not a pipeline folder")
    if not path.is_dir():
        raise ConfigError(f"pipeline={args.pipeline!r}: no such pipeline folder{tried(args.pipeline)}")
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"pipeline={args.pipeline!r}: not a diffusers pipeline folder (no model_index.json)")

    from .quality import load_toy_pipeline, prompt_accuracy

    with loading("pipeline", args.pipeline):
        pipe = load_toy_pipeline(path)
    result = prompt_accuracy(pipe, args.seeds, args.steps, args.guidance_scale)
    print(json.dumps(result))
    return 0


def pretrain_main(argv: list[str] | None = None) -> int:
    """`rl-safety toyworld pretrain`: train and export the toy-world pipeline (`pretrain.py`)."""
    from .pretrain import main

    return main(argv)


# step: (its main, what Ctrl-C leaves behind)
STEPS = {
    "classifier": (classifier_main, NOTHING_WRITTEN),
    "clip": (clip_main, NOTHING_WRITTEN),
    "pretrain": (pretrain_main, "add --resume to the same command to continue from the last checkpoint"),
    "prompts": (prompts_main, "run the same command again"),
    "quality": (quality_main, "nothing was written; run the same command again"),
}
USAGE = f"usage: {PROG} {{{','.join(STEPS)}}} [args]; `{PROG} <step> --help` describes each step"


def main(argv: list[str] | None = None) -> int:
    """A missing or unknown step is a `ConfigError`; `--help` prints the steps."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv:
        raise ConfigError(f"missing step; valid steps: {', '.join(STEPS)}")
    if argv[0] not in STEPS:
        raise ConfigError(f"unknown step {argv[0]!r}; valid steps: {', '.join(STEPS)}")
    step_main, _ = STEPS[argv[0]]
    return step_main(argv[1:]) or 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety toyworld <step> ...`: bad input is one line, `rl-safety toyworld <step>: error: ...`, and exit
    status 2; Ctrl-C one line and 130 (see `command.py`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STEPS:
        step_main, hint = STEPS[argv[0]]
        return run_command(f"{PROG} {argv[0]}", step_main, argv[1:], resume_hint=hint)
    return run_command(PROG, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
