"""`rl-safety toyworld <step>`: the commands that build the toy world's shipped models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ASSETS

# The reward classifier and the evaluation judge are the same architecture trained on different seeds and images.
ROLES = {"reward": 0, "judge": 1}


def classifier(argv: list[str]) -> int:
    from .classifier import save_classifier, train_classifier

    parser = argparse.ArgumentParser(
        prog="rl-safety toyworld classifier", description="Train an attribute classifier."
    )
    parser.add_argument(
        "--role", choices=sorted(ROLES), default="reward", help="reward classifier or evaluation judge"
    )
    parser.add_argument("--output_dir", type=Path, help="default: the shipped location rl_safety/toyworld/assets/ROLE")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--num_images", type=int, default=10000)
    parser.add_argument("--seed", type=int, help="default: 0 for the reward classifier, 1 for the judge")
    args = parser.parse_args(argv)
    seed = ROLES[args.role] if args.seed is None else args.seed
    model, metrics = train_classifier(steps=args.steps, num_images=args.num_images, seed=seed)
    output = save_classifier(model, args.output_dir or ASSETS / f"{args.role}_classifier", metrics)
    print(
        f"wrote {output}: held-out colour accuracy {metrics['colour_accuracy']:.4f}, "
        f"shape accuracy {metrics['shape_accuracy']:.4f}"
    )
    return 0


def pretrain(argv: list[str]) -> int:
    from .pretrain import main as pretrain_main

    return pretrain_main(argv)


def quality(argv: list[str]) -> int:
    import json

    from .quality import load_toy_pipeline, prompt_accuracy

    parser = argparse.ArgumentParser(prog="rl-safety toyworld quality", description="Prompt accuracy of a pipeline.")
    parser.add_argument("--pipeline", type=Path, default=ASSETS / "pipeline")
    parser.add_argument("--seeds", type=int, default=10, help="each seed samples all 24 colour-shape prompts")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    args = parser.parse_args(argv)
    result = prompt_accuracy(load_toy_pipeline(args.pipeline), args.seeds, args.steps, args.guidance_scale)
    print(json.dumps(result))
    return 0


def main(argv: list[str]) -> int:
    commands = {"classifier": classifier, "pretrain": pretrain, "quality": quality}
    if not argv or argv[0] not in commands:
        print(f"usage: rl-safety toyworld {{{','.join(sorted(commands))}}} [args]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:]) or 0
