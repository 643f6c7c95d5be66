"""`rl-safety eval` on a real model: a benchmark prompt set (I2P, captions, a prompt file) sampled by the base
model and every adapter from the same noise, measured by the recipe's metrics; report.json with every metric's
protocol.

Each (model, seed) unit's images are kept in OUTPUT_DIR/cache as soon as they are sampled (`cached_tensors`; the key
hashes the adapter file's bytes and every sampling setting), so an interrupted run continues where it stopped and a
re-run with other metrics samples nothing again.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from ..checks import check_output_folder
from ..command import loading, run_command
from ..model_config import ModelArguments
from ..outputs import atomic_write_text, cache_key, cached_tensors
from ..pipelines import LORA_WEIGHT_NAME, load_adapter, load_pipeline
from ..prompts import read_prompt_file
from ..recipe_parser import ConfigError, RecipeParser
from .benchmark_config import BenchmarkConfig
from .generate import generate
from .metrics import build_metric

REPORT_NAME = "report.json"
CACHE_DIR = "cache"


def load_benchmark_prompts(config: BenchmarkConfig) -> list[str]:
    """The prompt set the recipe names, cut to `max_prompts`."""
    if config.prompt_source == "i2p":
        from .i2p import load_i2p

        prompts = [row.prompt for row in load_i2p(config.prompts, config.categories, config.hard_only)]
    elif config.prompt_source == "captions":
        from .coco import load_captions

        prompts = load_captions(config.prompts, config.max_prompts, config.prompt_seed)
    else:
        if not Path(config.prompts).is_file():
            raise ConfigError(f"prompts={config.prompts!r}: no such prompt file")
        prompts = read_prompt_file(config.prompts)[0]
    prompts = prompts[: config.max_prompts]
    if not prompts:
        raise ConfigError(f"prompts={config.prompts!r}: holds no prompts (prompt_source={config.prompt_source})")
    return prompts


def unit_key(config: BenchmarkConfig, adapter: str, prompts: list[str], seed: int) -> str:
    """What decides one (model, seed) unit's images."""
    settings = [config.pretrained_model_name_or_path, config.torch_dtype, prompts, seed, config.num_inference_steps]
    settings += [config.guidance_scale, config.eta, config.batch_size]
    return cache_key(Path(adapter) / LORA_WEIGHT_NAME if adapter else None, settings)


def _sample(pipe: StableDiffusionPipeline, prompts: list[str], seed: int, config: BenchmarkConfig) -> dict:
    steps, scale, eta, size = config.num_inference_steps, config.guidance_scale, config.eta, config.batch_size
    return {"images": generate(pipe, prompts, [seed], steps, scale, eta, size)}


def run_benchmark(config: BenchmarkConfig) -> dict:
    """Sample and measure base and every adapter; write report.json (last, atomically); return the report."""
    from .toyworld import model_names

    output_dir = Path(config.output_dir)
    if (output_dir / REPORT_NAME).exists() and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir={str(output_dir)!r} holds a report; pass --overwrite_output_dir to replace it")
    try:
        check_output_folder(output_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    prompts = load_benchmark_prompts(config)
    models = model_names(config.adapter)
    metrics = {
        entry.get("alias", entry["name"]): build_metric(entry["name"], entry.get("args")) for entry in config.metrics
    }
    with loading("pretrained_model_name_or_path", config.pretrained_model_name_or_path):
        args = ModelArguments(config.pretrained_model_name_or_path, torch_dtype=config.torch_dtype)
        pipe = load_pipeline(args)
    pipe.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"protocol": protocol(config, prompts, metrics), "models": {}}
    progress = tqdm(total=len(models) * len(config.seeds), desc="eval (model, seed)")
    for index, (name, adapter) in enumerate(models.items()):
        if adapter:
            load_adapter(pipe, adapter, f"adapter_{index}")
        for metric in metrics.values():
            metric.reset()
        for seed in config.seeds:
            path = output_dir / CACHE_DIR / f"{unit_key(config, adapter, prompts, seed)}.safetensors"
            images = cached_tensors(path, functools.partial(_sample, pipe, prompts, seed, config))["images"]
            for start in range(0, len(images), config.batch_size):
                part = slice(start, start + config.batch_size)
                for metric in metrics.values():
                    metric.update(images[part], prompts[part])
            progress.update(1)
        report["models"][name] = {
            f"{metric_name}/{key}": float(value)
            for metric_name, metric in metrics.items()
            for key, value in metric.compute().items()
        }
        if adapter:
            pipe.delete_adapters(f"adapter_{index}")
    progress.close()
    atomic_write_text(output_dir / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report


def protocol(config: BenchmarkConfig, prompts: list[str], metrics: dict) -> dict:
    """Everything that decides the numbers: model, prompts, sampling and each metric's own protocol."""
    return {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "adapters": list(config.adapter),
        "prompt_source": config.prompt_source,
        "prompts": config.prompts,
        "categories": config.categories if config.prompt_source == "i2p" else None,
        "num_prompts": len(prompts),
        "seeds": list(config.seeds),
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "eta": config.eta,
        "metrics": {name: getattr(metric, "protocol", dict)() for name, metric in metrics.items()},
    }


def format_table(report: dict) -> str:
    names = list(report["models"])
    keys = list(dict.fromkeys(key for values in report["models"].values() for key in values))
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for key in keys:
        cells = [f"{report['models'][n].get(key, float('nan')):>12.4g}" for n in names]
        lines.append(f"{key:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`rl-safety eval --config recipes/eval/X.yaml [--adapter DIR ...]` (a recipe with `metrics`)."""
    (config,) = RecipeParser((BenchmarkConfig,), prog="rl-safety eval").parse(argv)
    report = run_benchmark(config)
    print(format_table(report))
    print(f"report: {Path(config.output_dir) / REPORT_NAME}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety eval` for real models: bad input is one line, exit 2; an interrupted run continues from its cache."""
    return run_command("rl-safety eval", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
