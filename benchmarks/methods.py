"""The toy world's table of erasure methods on ground truth: the sampling-time baselines (negative prompt, SLD) and
every trainer's recipe (GRPO, ReFL, ESD and the RACE variants), each trained with only `--target_concept` set,
evaluated on one evaluation (same prompts, seeds and noise for every model), attacked by one attack, and tabulated by
`rl-safety compare`.

    python benchmarks/methods.py                               # red, training seed 0 → runs/methods/compare.md
    python benchmarks/methods.py --concept blue --seed 1 --output_dir runs/methods-blue
    python benchmarks/methods.py --skip_training               # evaluate, attack and tabulate finished runs
    python benchmarks/methods.py --recipes grpo_erase_red refl_erase_red

Three commands do the work, each printed before it runs, so any step can be repeated by hand:
`rl-safety eval --baselines negative_prompt sld --adapter RUN...`, `rl-safety attack --adapter RUN...` (the attack
recipe: twice the adversarial training's PGD steps) and `rl-safety compare EVAL ATTACK`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("grpo_erase_red", "refl_erase_red", "esd_erase_red", "grpo_race_erase_red", "esd_race_erase_red")


def run_dir(recipe: str, concept: str) -> Path:
    output_dir = yaml.safe_load((REPO / f"recipes/toyworld/{recipe}.yaml").read_text())["output_dir"]
    return REPO / output_dir.replace("{target_concept}", concept)


def run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="red", help="any toy-world colour or shape")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0, help="training seed of every recipe")
    parser.add_argument("--output_dir", default="runs/methods")
    parser.add_argument("--skip_training", action="store_true", help="reuse the recipes' finished runs")
    args = parser.parse_args()
    out = REPO / args.output_dir
    runs = [str(run_dir(recipe, args.concept)) for recipe in args.recipes]
    concept = ["--target_concept", args.concept]
    if not args.skip_training:
        for recipe in args.recipes:
            cmd = ["rl-safety", "train", "--config", f"recipes/toyworld/{recipe}.yaml", *concept]
            run(cmd + ["--seed", str(args.seed), "--overwrite_output_dir"])
    # The base model's and every unchanged model's images come from the caches of earlier runs of this command.
    run(
        ["rl-safety", "eval", "--config", "recipes/toyworld/eval.yaml", *concept, "--baselines", "negative_prompt"]
        + ["sld", "--output_dir", str(out / "eval"), "--overwrite_output_dir", "--adapter", *runs]
    )
    run(
        ["rl-safety", "attack", "--config", "recipes/toyworld/attack.yaml", *concept]
        + ["--output_dir", str(out / "attack"), "--overwrite_output_dir", "--adapter", *runs]
    )
    run(
        ["rl-safety", "compare", str(out / "eval"), str(out / "attack"), "--output_dir", str(out)]
        + ["--overwrite_output_dir"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
