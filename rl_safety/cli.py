"""`rl-safety <command> ...`: one entry point for every job."""

from __future__ import annotations

import sys

USAGE = """usage: rl-safety <command> [args]

commands:
  train          train a LoRA adapter with diffusion GRPO from a recipe (--config recipes/....yaml)
  classifier     train a (robust) image classifier: DyART, PGD-AT, TRADES or standard; AutoAttack report
  attack         PGD on text embeddings against a model or adapter: attack success rate, report.json + html
  compare        one table across runs, evaluation, attack and benchmark reports (markdown + JSON)
  eval           evaluate erasure in the toy world: base and adapters, report.json + report.html
  push           upload a run to the Hugging Face Hub (adapter, model card, recipe, report); --dry-run to check
  score          score image files with a reward (--reward NAME --prompt TEXT IMAGE...)
  toyworld       build the toy world's models and prompt sets (classifier, pretrain, clip, prompts, quality)
  tiny-pipeline  write a tiny random Stable Diffusion pipeline (offline tests, smoke runs, benchmarks)

`rl-safety <command> --help` describes each command."""


def tiny_pipeline_main(argv: list[str] | None = None) -> int:
    """`rl-safety tiny-pipeline OUTPUT_DIR`: every argument is checked before the pipeline is built."""
    from pathlib import Path

    from .checks import check_fields, check_output_folder, check_seed
    from .command import ArgumentParser
    from .errors import ConfigError

    parser = ArgumentParser(prog="rl-safety tiny-pipeline", description="Write a tiny random SD pipeline.")
    parser.add_argument("output_dir", help="folder to create (must not exist unless --exist_ok)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--resolution", type=int, default=32, help="native image size in pixels (a multiple of 8)")
    parser.add_argument("--exist_ok", action="store_true", help="succeed without writing if the folder exists")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        check_seed(args.seed)
        check_fields(
            args,
            (args.resolution >= 8, "resolution", "must be ≥ 8"),
            (args.resolution % 8 == 0, "resolution", "must be a multiple of 8 (the VAE and the UNet halve it)"),
            (args.output_dir.strip() != "", "output_dir", "must name a folder"),
        )
        if not output_dir.is_dir():
            check_output_folder(output_dir)  # not a file, and creatable here
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if output_dir.is_dir():
        if not args.exist_ok:
            raise ConfigError(
                f"output_dir={args.output_dir!r}: exists; remove it, choose another folder, or pass --exist_ok to "
                "keep it"
            )
        if not (output_dir / "model_index.json").is_file():
            raise ConfigError(
                f"output_dir={args.output_dir!r}: exists but is not a pipeline folder (no model_index.json); remove "
                "it or choose another folder"
            )
        print(f"kept {args.output_dir}")
        return 0

    from .tiny_pipeline import save_tiny_pipeline

    save_tiny_pipeline(output_dir, seed=args.seed, resolution=args.resolution)
    print(f"wrote {args.output_dir}")
    return 0


def tiny_pipeline(argv: list[str] | None = None) -> int:
    """`rl-safety tiny-pipeline`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    from .command import run_command

    return run_command("rl-safety tiny-pipeline", tiny_pipeline_main, argv)


def lists_metrics(argv: list[str]) -> bool:
    """Whether `--config` names a real-model benchmark recipe (one with `metrics:`) rather than the toy world's."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return False
    import yaml

    from .resources import resolve_recipe

    try:
        with open(resolve_recipe(argv[argv.index("--config") + 1]), encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError):
        return False  # the toy evaluation's parser reports it in one line
    return isinstance(recipe, dict) and "metrics" in recipe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import cli

        return cli(rest)
    if command == "classifier":
        from .classifiers.cli import cli as classifier

        return classifier(rest)
    if command == "attack":
        from .attack.run import cli as attack

        return attack(rest)
    if command == "compare":
        from .compare import cli as compare

        return compare(rest)
    if command == "eval":
        if lists_metrics(rest):
            from .evaluation.benchmark import cli as benchmark

            return benchmark(rest)
        from .evaluation.toyworld import cli as evaluate

        return evaluate(rest)
    if command == "push":
        from .hub import cli as push

        return push(rest)
    if command == "score":
        from .score import cli as score

        return score(rest)
    if command == "toyworld":
        from .toyworld.cli import cli as toyworld

        return toyworld(rest)
    if command == "tiny-pipeline":
        return tiny_pipeline(rest)
    valid = "train, classifier, attack, compare, eval, push, score, toyworld, tiny-pipeline"
    print(f"rl-safety: error: unknown command {command!r}; valid commands: {valid}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
