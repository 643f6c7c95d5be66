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


def clip(argv: list[str]) -> int:
    import time

    from .clip import save_clip, train_clip

    parser = argparse.ArgumentParser(
        prog="rl-safety toyworld clip", description="Train the toy world's CLIP (saved in open_clip's folder format)."
    )
    parser.add_argument("--output_dir", type=Path, help="default: the shipped location rl_safety/toyworld/assets/clip")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_images", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0, help="training seed; the held-out images use seed + 1000")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, metrics, losses = train_clip(
        steps=args.steps, batch_size=args.batch_size, num_images=args.num_images, seed=args.seed
    )
    training = {
        "command": " ".join(["rl-safety toyworld clip", *argv]),
        **{k: getattr(args, k) for k in ("steps", "batch_size", "num_images", "seed")},
        "held_out_seed": args.seed + 1000,
        "final_loss": round(losses[-1], 4),
        "seconds": round(time.perf_counter() - start),
    }
    output = save_clip(model, args.output_dir or ASSETS / "clip", metrics, training)
    accuracies = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    print(f"wrote {output} in {training['seconds']} s: held-out zero-shot {accuracies}")
    return 0


def pretrain(argv: list[str]) -> int:
    from .pretrain import main as pretrain_main

    return pretrain_main(argv)


def prompts(argv: list[str]) -> int:
    from .prompt_sets import write_prompt_sets

    parser = argparse.ArgumentParser(
        prog="rl-safety toyworld prompts", description="Write the safety scenario's prompt sets for every concept."
    )
    parser.add_argument("--output_dir", type=Path, default=Path("prompts/toyworld"), help="default: prompts/toyworld")
    args = parser.parse_args(argv)
    written = write_prompt_sets(args.output_dir)
    print(f"wrote {len(written)} prompt files under {args.output_dir}")
    return 0


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
    commands = {"classifier": classifier, "clip": clip, "pretrain": pretrain, "prompts": prompts, "quality": quality}
    if not argv or argv[0] not in commands:
        print(f"usage: rl-safety toyworld {{{','.join(sorted(commands))}}} [args]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:]) or 0
