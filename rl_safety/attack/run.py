"""`rl-safety attack`: PGD on the text embeddings of concept prompts against a (possibly erased) model, judged by a
detector that no training reward uses; report.json, the adversarial embeddings and report.html.

The attack success rate (ASR) is the share of images sampled under the adversarial embeddings that show the
concept; `clean_rate` is the same prompts, seeds and initial noise without the attack.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checks import check_output_folder
from ..command import loading, run_command
from ..concept import check_concept_files, fill_target_concept
from ..model_config import ModelArguments
from ..outputs import atomic_write_text, cache_key, cached_tensors
from ..pipelines import LORA_WEIGHT_NAME, PromptEncoder, adapters_disabled, load_adapter, load_pipeline
from ..prompts import read_prompt_file
from ..recipe_parser import ConfigError, RecipeParser
from ..report import write_report
from ..resources import resolve_path, tried
from .config import AttackConfig
from .objectives import attack_loss
from .pgd import pgd

REPORT_NAME = "report.json"
CACHE_DIR = "cache"
EMBEDDINGS_NAME = "adversarial_embeddings.safetensors"
METRICS = (
    ("attack_success_rate", "attacked", "share of images under the adversarial embeddings that show the concept"),
    ("clean_rate", "clean", "the same prompts, seeds and noise without the attack"),
)


@torch.no_grad()
def concept_latents(
    pipe: StableDiffusionPipeline, prompts: Sequence[str], num_images: int, seed: int, steps: int, guidance: float
) -> torch.Tensor:
    """(P, K, C, h, w) final latents of K images per prompt drawn by `pipe` as it is (call it on the base model)."""
    from ..evaluation.generate import generate

    seeds = [seed * 1000 + k for k in range(num_images)]
    latents = generate(pipe, prompts, seeds, steps, guidance, 0.0, output_type="latent")
    return latents.view(num_images, len(prompts), *latents.shape[1:]).transpose(0, 1).contiguous()


def attack_embeddings(
    unet: torch.nn.Module,
    scheduler,
    clean: torch.Tensor,
    latents: torch.Tensor,
    *,
    objective: str,
    epsilon: float,
    step_size: float,
    num_steps: int,
    generator: torch.Generator,
    base_unet_context: Callable = contextlib.nullcontext,
    clamp_to_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial text embeddings (P, L, D) for `unet` as it is (with its adapter), and each prompt's last loss.

    The UNet's own parameters get no gradient: only the embeddings are optimised."""
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        loss = attack_loss(objective, unet, scheduler, latents, clean, generator, base_unet_context)
        return pgd(loss, clean, epsilon, step_size, num_steps, generator, clamp_to_range)
    finally:
        for param, flag in zip(unet.parameters(), flags):
            param.requires_grad_(flag)


def concept_detector(config: AttackConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, 3, H, W) in [0, 1] → (B,) bool: the image shows the concept, by a judge no training reward uses."""
    if config.detector == "nudenet":
        from rl_safety.rewards.nudity import NudityPenalty

        penalty = NudityPenalty(classes=config.nudenet_classes, threshold=config.nudenet_threshold, mode="any")
        return lambda images: penalty(images, [""] * len(images)) < 0
    from ..toyworld.classifier import load_classifier
    from ..toyworld.data import LABELS, concept_head
    from ..toyworld.quality import judge_attributes

    head = concept_head(config.target_concept)
    index = LABELS[head].index(config.target_concept)
    if not (Path(config.judge_classifier) / "config.json").is_file():
        raise ConfigError(
            f"judge_classifier={config.judge_classifier!r}: no classifier folder (config.json + weights)"
        )
    with loading("judge_classifier", config.judge_classifier):
        judge = load_classifier(config.judge_classifier)
    return lambda images: judge_attributes(images, judge)[head] == index


def _rate(shows: torch.Tensor) -> dict:
    return {"value": shows.float().mean().item(), "n": len(shows)}


def resolve_paths(config: AttackConfig) -> None:
    """Prompts and models as given, or the shipped ones (`rl_safety/resources.py`): a recipe works from any folder."""
    config.prompts = resolve_path(config.prompts, "file")
    config.pretrained_model_name_or_path = resolve_path(config.pretrained_model_name_or_path, "dir")
    config.judge_classifier = resolve_path(config.judge_classifier, "dir")


def unit_key(config: AttackConfig, prompts: Sequence[str], adapter: str) -> str:
    """What decides one model's attack: the protocol, the prompts and the adapter file's bytes."""
    settings = [protocol(config, len(prompts)), list(prompts), config.batch_size, config.torch_dtype]
    return cache_key(Path(adapter) / LORA_WEIGHT_NAME if adapter else None, settings)


def attack_model(
    pipe: StableDiffusionPipeline, prompts: list[str], clean: torch.Tensor, latents: torch.Tensor, config: AttackConfig
) -> dict[str, torch.Tensor]:
    """One model (the pipeline with its current adapter): the adversarial embeddings, each prompt's last loss, and
    the images sampled without and with the attack."""
    from ..evaluation.generate import generate

    generator = torch.Generator().manual_seed(config.attack_seed)
    adversarial, losses = attack_embeddings(
        pipe.unet,
        pipe.scheduler,
        clean,
        latents.to(pipe.device),
        objective=config.objective,
        epsilon=config.epsilon,
        step_size=config.pgd_step_size,
        num_steps=config.pgd_num_step,
        generator=generator,
        base_unet_context=lambda: adapters_disabled(pipe.unet),
        clamp_to_range=config.clamp_to_range,
    )
    sample = dict(
        seeds=config.seeds,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        eta=config.eta,
        batch_size=config.batch_size,
    )
    return {
        "adversarial": adversarial,
        "losses": losses,
        "clean_images": generate(pipe, prompts, **sample),
        "attacked_images": generate(pipe, prompts, prompt_embeds=adversarial, **sample),
    }


def run_attack(config: AttackConfig, include_base: bool = False) -> dict:
    """Attack every model of `config`; write report.json, the embeddings and report.html; return the report.

    The base model is attacked when there is no adapter, or with `include_base` (a benchmark's `attack`). Each
    model's result is kept in output_dir/cache as soon as it is done, so an interrupted run continues with the next
    model."""
    output_dir = Path(config.output_dir)
    if (output_dir / REPORT_NAME).exists() and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir={str(output_dir)!r} holds a report; pass --overwrite_output_dir to replace it")
    try:
        check_output_folder(config.output_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    resolve_paths(config)
    path = Path(config.prompts)
    if not path.is_file():
        raise ConfigError(f"prompts={config.prompts!r}: no such prompt file{tried(config.prompts)}")
    prompts = read_prompt_file(path)[0][: config.max_prompts]
    if not prompts:
        raise ConfigError(f"prompts={config.prompts!r}: holds no prompts")
    from ..evaluation.toyworld import model_names

    models = model_names(config.adapter)  # the evaluation's names, so `rl-safety compare` joins the two reports
    if config.adapter and not include_base:
        models.pop("base")
    try:
        detector = concept_detector(config)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    with loading("pretrained_model_name_or_path", config.pretrained_model_name_or_path):
        pipe = load_pipeline(ModelArguments(config.pretrained_model_name_or_path, torch_dtype=config.torch_dtype))
    pipe.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clean = PromptEncoder(pipe.tokenizer, pipe.text_encoder)(prompts).float()
    latents = concept_latents(
        pipe, prompts, config.num_concept_images, config.attack_seed, config.num_inference_steps, config.guidance_scale
    )
    report = {"target_concept": config.target_concept, "protocol": protocol(config, len(prompts)), "models": {}}
    grids, embeddings = {}, {}
    for index, (name, adapter) in enumerate(tqdm(models.items(), desc="attacked models")):
        peft_name = f"adapter_{index}"
        if adapter:
            load_adapter(pipe, adapter, peft_name)
        path = output_dir / CACHE_DIR / f"attack-{unit_key(config, prompts, adapter)}.safetensors"
        unit = cached_tensors(path, functools.partial(attack_model, pipe, prompts, clean, latents, config))
        adversarial, losses = unit["adversarial"], unit["losses"]
        clean_images, attacked_images = unit["clean_images"], unit["attacked_images"]
        clean_shows, attacked_shows = detector(clean_images).cpu(), detector(attacked_images).cpu()
        per_prompt_clean = clean_shows.float().view(len(config.seeds), -1).mean(0)
        per_prompt_attacked = attacked_shows.float().view(len(config.seeds), -1).mean(0)
        report["models"][name] = {
            "attack_success_rate": _rate(attacked_shows),
            "clean_rate": _rate(clean_shows),
            "num_prompts": len(prompts),
            "adapter": adapter or None,
            "per_prompt": [
                {"prompt": p, "clean_rate": c.item(), "attacked_rate": a.item(), "attack_loss": loss.item()}
                for p, c, a, loss in zip(prompts, per_prompt_clean, per_prompt_attacked, losses.cpu())
            ],
        }
        grids[name] = {"clean": clean_images, "attacked": attacked_images}
        embeddings[name] = adversarial
        if adapter:
            pipe.delete_adapters(peft_name)
    first = report["models"][next(iter(models))]
    report.update({key: first[key] for key in ("attack_success_rate", "clean_rate", "num_prompts")})
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".{EMBEDDINGS_NAME}.tmp"
    save_file(
        embeddings, str(tmp), metadata={"prompts": json.dumps(prompts), "protocol": json.dumps(report["protocol"])}
    )
    tmp.replace(output_dir / EMBEDDINGS_NAME)
    write_report(output_dir, report, METRICS, grids, {"clean": prompts, "attacked": prompts}, {}, config.grid_prompts)
    atomic_write_text(output_dir / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report


def protocol(config: AttackConfig, num_prompts: int) -> dict:
    """Everything that decides the numbers, written into the report."""
    detector = {"name": config.detector}
    if config.detector == "nudenet":
        detector.update(threshold=config.nudenet_threshold, classes=config.nudenet_classes or "exposed", unit="image")
    else:
        detector.update(colour="pixels (exact)", shape=config.judge_classifier)
    return {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "prompts": config.prompts,
        "num_prompts": num_prompts,
        "objective": config.objective,
        "epsilon": config.epsilon,
        "pgd_num_step": config.pgd_num_step,
        "pgd_step_size": config.pgd_step_size,
        "clamp_to_range": config.clamp_to_range,
        "num_concept_images": config.num_concept_images,
        "attack_seed": config.attack_seed,
        "seeds": list(config.seeds),
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "eta": config.eta,
        "detector": detector,
    }


def parse_args(argv: list[str] | None = None) -> AttackConfig:
    (config,) = RecipeParser((AttackConfig,), prog="rl-safety attack").parse(argv)
    try:
        check_concept_files([config.prompts], config.target_concept, "prompts")
        config.prompts = fill_target_concept(config.prompts, config.target_concept, "prompts")
        config.output_dir = fill_target_concept(config.output_dir, config.target_concept, "output_dir")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    resolve_paths(config)
    return config


def format_table(report: dict) -> str:
    lines = [f"{'model':<30} {'clean_rate':>10} {'attack_success_rate':>20}"]
    for name, entry in report["models"].items():
        lines.append(
            f"{name:<30} {entry['clean_rate']['value']:>10.3f} {entry['attack_success_rate']['value']:>20.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`rl-safety attack --config recipes/toyworld/attack.yaml [--adapter DIR ...]`."""
    config = parse_args(argv)
    report = run_attack(config)
    print(format_table(report))
    print(f"report: {Path(config.output_dir) / REPORT_NAME} and report.html")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety attack`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command("rl-safety attack", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
