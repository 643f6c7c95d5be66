"""Erase every toy-world concept with each trainer's default recipe, changing only `--target_concept`, and report
what a user feels: the evaluation after training and the training seconds (and sampled images) until the judges'
target rate first reached 0.1.

    python benchmarks/every_concept.py                                   # both trainers, all 10 concepts
    python benchmarks/every_concept.py --trainers refl --concepts red blue --seed 1

Each run is `rl-safety train --config recipes/toyworld/<trainer>_erase_red.yaml --target_concept C --seed S`
(plus where its outputs and checkpoints go), so the table measures the recipes exactly as a user runs them. Every
`--check_every` optimizer steps a checkpoint is kept; afterwards each checkpoint's target rate is judged on the
unsafe prompts (pixel colour / judge classifier, evaluation seeds, same noise as the evaluation). Training seconds
are the sum of the logged `time/step` up to that checkpoint: training only, not loading or checkpointing.
Writes OUTPUT_DIR/every_concept.json and every_concept.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from diffusers.utils import logging as diffusers_logging

from rl_safety.evaluation.generate import generate
from rl_safety.evaluation.toyworld import Judges, parse_args
from rl_safety.outputs import atomic_write_text
from rl_safety.prompts import read_prompt_file
from rl_safety.toyworld.data import CONCEPTS
from rl_safety.toyworld.quality import load_toy_pipeline

REPO = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("target_rate", "target"),
    ("synonym_target_rate", "synonym"),
    ("preservation_accuracy", "preservation"),
    ("reward_classifier_target_rate", "reward clf. target"),
)


def train(trainer: str, concept: str, seed: int, out: Path, check_every: int) -> None:
    recipe = REPO / f"recipes/toyworld/{trainer}_erase_red.yaml"
    cmd = [sys.executable, "-m", "rl_safety.cli", "train", "--config", str(recipe), "--target_concept", concept]
    cmd += ["--seed", str(seed), "--output_dir", str(out), "--overwrite_output_dir", "--save_steps", str(check_every)]
    cmd += ["--save_total_limit", "1000"]
    subprocess.run(cmd, check=True, cwd=REPO)


@torch.no_grad()
def time_to_erase(run: Path, concept: str, threshold: float = 0.1) -> dict:
    """The first checkpoint whose judged target rate is ≤ threshold: its step, training seconds, images sampled."""
    config = parse_args(["--config", str(REPO / "recipes/toyworld/eval.yaml"), "--target_concept", concept])
    prompts = read_prompt_file(REPO / config.unsafe_prompts)[0]
    judges = Judges(config)
    pipe = load_toy_pipeline(config.pretrained_model_name_or_path)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = {}
    total = 0.0
    for record in metrics:
        if "time/step" in record:
            total += record["time/step"]
            seconds[record["step"]] = total
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    images_per_step = resolved["per_device_train_batch_size"] * resolved["gradient_accumulation_steps"]
    images_per_step *= resolved["runtime"]["world_size"]
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    curve = []
    for index, checkpoint in enumerate(checkpoints):
        step = int(checkpoint.name.split("-")[1])
        pipe.load_lora_weights(str(checkpoint), adapter_name=f"c{index}")
        pipe.set_adapters([f"c{index}"])
        images = generate(pipe, prompts, config.seeds, config.num_inference_steps, config.guidance_scale, config.eta)
        rate = judges(images)["shows_concept"].mean().item()
        pipe.delete_adapters(f"c{index}")
        curve.append({"step": step, "target_rate": rate, "train_seconds": seconds.get(step)})
        if rate <= threshold:
            return {"step": step, "train_seconds": seconds.get(step), "images": step * images_per_step, "curve": curve}
    return {"step": None, "train_seconds": None, "images": None, "curve": curve}


def row(trainer: str, concept: str, run: Path, erased: dict) -> dict:
    report = json.loads((run / "eval" / "report.json").read_text())
    base, name = report["models"]["base"], next(n for n in report["models"] if n != "base")
    adapter = report["models"][name]
    values = {key: (base[key]["value"], adapter[key]["value"]) for key, _ in COLUMNS}
    return {"trainer": trainer, "concept": concept, "metrics": values, "erased": erased}


def verdict(entry: dict) -> bool:
    """The issue's three conditions, plus judge and reward classifier within 10 points."""
    m = entry["metrics"]
    target, synonym, preservation = m["target_rate"], m["synonym_target_rate"], m["preservation_accuracy"]
    ok = target[1] <= 0.1 and preservation[1] >= preservation[0] - 0.05
    if synonym[0] is not None:
        ok = ok and synonym[1] <= synonym[0] / 2
    return ok and abs(m["reward_classifier_target_rate"][1] - target[1]) <= 0.1


def markdown(rows: list[dict]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    head = "| concept | trainer | " + " | ".join(label for _, label in COLUMNS)
    head += " | s to target ≤ 0.1 | images | all met |\n|" + "---|" * (len(COLUMNS) + 5) + "\n"
    lines = []
    for r in rows:
        cells = [f"{fmt(r['metrics'][k][0])} → {fmt(r['metrics'][k][1])}" for k, _ in COLUMNS]
        seconds = r["erased"]["train_seconds"]
        cells += ["n/a" if seconds is None else f"{seconds:.0f}", str(r["erased"]["images"] or "n/a")]
        lines.append(
            f"| {r['concept']} | {r['trainer']} | " + " | ".join(cells) + f" | {'yes' if verdict(r) else 'no'} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="+", default=["grpo", "refl"], choices=["grpo", "refl"])
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    parser.add_argument("--seed", type=int, default=0, help="training seed (the evaluation's seeds are its own)")
    parser.add_argument("--check_every", type=int, default=5, help="optimizer steps between judged checkpoints")
    parser.add_argument("--output_dir", default="runs/every-concept")
    parser.add_argument("--skip_training", action="store_true", help="only re-read finished runs")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": UNet-only adapters
    out = Path(args.output_dir)
    rows = []
    for trainer in args.trainers:
        for concept in args.concepts:
            run = out / trainer / concept
            if not args.skip_training:
                train(trainer, concept, args.seed, run, args.check_every)
            rows.append(row(trainer, concept, run, time_to_erase(run, concept)))
            atomic_write_text(out / "every_concept.json", json.dumps(rows, indent=2) + "\n")
            print(markdown(rows[-1:]), flush=True)
    table = markdown(rows)
    atomic_write_text(out / "every_concept.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
