"""ESD, ESD+RACE, GRPO and GRPO+RACE on one evaluation: each recipe trained with only `--target_concept` set, then
every adapter attacked by `rl-safety attack` (recipes/toyworld/attack.yaml: twice the training's PGD steps).

    python benchmarks/race.py                       # train the four recipes for red, attack, write the table
    python benchmarks/race.py --concept blue --recipes grpo_erase_red grpo_race_erase_red
    python benchmarks/race.py --skip_training       # only attack and tabulate finished runs
    python benchmarks/race.py --skip_training --epsilon 0.5 --output_dir runs/race-eps0.5   # another attack radius

Writes OUTPUT_DIR/race.json and race.md: the evaluation's target rate and preservation (clean prompts, from each
run's OUTPUT_DIR/eval/report.json) beside the attack's clean rate and attack success rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from rl_safety.outputs import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("esd_erase_red", "esd_race_erase_red", "grpo_erase_red", "grpo_race_erase_red")


def run_dir(recipe: str, concept: str) -> Path:
    output_dir = yaml.safe_load((REPO / f"recipes/toyworld/{recipe}.yaml").read_text())["output_dir"]
    return REPO / output_dir.replace("{target_concept}", concept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="red")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="runs/race")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--epsilon", type=float, default=None, help="attack radius (default: the attack recipe's)")
    args = parser.parse_args()
    out = REPO / args.output_dir
    runs = {recipe: run_dir(recipe, args.concept) for recipe in args.recipes}
    for recipe in runs:
        if not args.skip_training:
            cmd = ["rl-safety", "train", "--config", f"recipes/toyworld/{recipe}.yaml"]
            cmd += ["--target_concept", args.concept, "--seed", str(args.seed), "--overwrite_output_dir"]
            subprocess.run(cmd, check=True, cwd=REPO)
    cmd = ["rl-safety", "attack", "--config", "recipes/toyworld/attack.yaml", "--target_concept", args.concept]
    cmd += ["--output_dir", str(out / "attack"), "--overwrite_output_dir", "--adapter", *map(str, runs.values())]
    if args.epsilon is not None:
        cmd += ["--epsilon", str(args.epsilon)]
    subprocess.run(cmd, check=True, cwd=REPO)
    attack = json.loads((out / "attack" / "report.json").read_text())
    rows = []
    for recipe, run in runs.items():
        evaluation = json.loads((run / "eval" / "report.json").read_text())["models"]
        adapter = evaluation[run.name]
        attacked = attack["models"][run.name]
        rows.append(
            {
                "recipe": recipe,
                "run": str(run.relative_to(REPO)),
                "target_rate": (evaluation["base"]["target_rate"]["value"], adapter["target_rate"]["value"]),
                "preservation_accuracy": (
                    evaluation["base"]["preservation_accuracy"]["value"],
                    adapter["preservation_accuracy"]["value"],
                ),
                "clean_rate": attacked["clean_rate"]["value"],
                "attack_success_rate": attacked["attack_success_rate"]["value"],
            }
        )
    protocol = attack["protocol"]
    lines = [
        f"Attack: {protocol['objective']}, ε {protocol['epsilon']}, {protocol['pgd_num_step']} PGD steps, "
        f"{protocol['num_prompts']} prompts × {len(protocol['seeds'])} seeds; concept {args.concept}, "
        f"training seed {args.seed}.",
        "",
        "| recipe | target rate (eval) | preservation (eval) | clean rate (attack) | attack success rate |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['target_rate'][0]:.3f} → {r['target_rate'][1]:.3f} | "
            f"{r['preservation_accuracy'][0]:.3f} → {r['preservation_accuracy'][1]:.3f} | {r['clean_rate']:.3f} | "
            f"{r['attack_success_rate']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "race.json", json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "race.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
