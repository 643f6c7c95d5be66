"""`rl-safety eval` on a real model: a benchmark prompt set (I2P, captions, a prompt file) sampled by the base
model, the sampling-time baselines, other checkpoints and every adapter from the same noise, measured by the recipe's
metrics, optionally attacked (`attack`); report.json with every metric's protocol, and report.html.

Each (model, seed) unit's images are kept in OUTPUT_DIR/cache as soon as they are sampled (`cached_tensors`; the key
hashes the adapter file's bytes, the checkpoint, the baseline's settings and every sampling setting), so an
interrupted run continues where it stopped and a re-run with other metrics samples nothing again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from ..attack.config import AttackConfig
from ..checks import check_output_folder
from ..command import loading, run_command
from ..model_config import ModelArguments
from ..outputs import atomic_write_text, cache_key, cached_tensors
from ..pipelines import LORA_WEIGHT_NAME, load_adapter, load_pipeline, pipeline_folder_problem
from ..prompts import read_prompt_file
from ..recipe_parser import ConfigError, RecipeParser
from ..report import grid_indices, write_report
from ..resources import resolve_recipe, tried
from .baselines import baseline_sampler
from .benchmark_config import BenchmarkConfig
from .generate import generate
from .metrics import build_metric

REPORT_NAME = "report.json"
CACHE_DIR = "cache"
ATTACK_DIR = "attack"
# The attack report's rates → the benchmark row's columns (the names `rl-safety compare` uses).
ATTACK_COLUMNS = {"attack_success_rate": "attack_success_rate", "clean_rate": "attack_clean_rate"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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


def unit_key(
    config: BenchmarkConfig, prompts: list[str], seed: int, adapter: str = "", model=None, sampler=None
) -> str:
    """What decides one (model, seed) unit's images: the weights (base, `model` for a checkpoint, the adapter file's
    bytes), the baseline's `sampler` settings, the prompts and the sampling settings."""
    settings = [model or config.pretrained_model_name_or_path, config.torch_dtype, prompts, seed]
    settings += [config.num_inference_steps, config.guidance_scale, config.eta, config.batch_size]
    if sampler is not None:  # appended, so the keys of base and adapters are those of earlier runs
        settings.append(sampler)
    return cache_key(Path(adapter) / LORA_WEIGHT_NAME if adapter else None, settings)


def _sample(pipe: StableDiffusionPipeline, prompts: list[str], seed: int, config: BenchmarkConfig, **kwargs) -> dict:
    steps, scale, eta, size = config.num_inference_steps, config.guidance_scale, config.eta, config.batch_size
    return {"images": generate(pipe, prompts, [seed], steps, scale, eta, size, **kwargs)}


def checkpoint_problem(value: str) -> str | None:
    """Why `checkpoints` entry `value` cannot be a pipeline (a missing or broken local folder), or None; a Hub id is
    left to the loader."""
    path = Path(value).expanduser()
    if path.is_dir():
        return pipeline_folder_problem(path)
    if path.exists():
        return "is a file, not a diffusers pipeline folder"
    if HUB_ID.fullmatch(value):
        return None
    return "no such folder (nor a Hub id such as CompVis/stable-diffusion-v1-4)"


def checkpoint_identity(value: str) -> list:
    """A checkpoint in a cache key: a Hub id as given; a folder by its path and its files' sizes and modification
    times (hashing gigabytes per run would cost more than sampling a few prompts), so rewritten weights re-sample."""
    path = Path(value).expanduser()
    if not path.is_dir():
        return [value]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"))
    stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return [str(path.resolve()), stats]


def benchmark_models(config: BenchmarkConfig) -> dict[str, tuple[str, str]]:
    """{name: (kind, source)} in report order: base, the baselines, the checkpoints (by folder or repository name),
    the adapters (by folder name). A missing or broken folder, or a name given twice, is an error."""
    from .toyworld import model_names

    models = {"base": ("base", ""), **{name: ("baseline", name) for name in config.baselines}}
    for value in config.checkpoints:
        problem = checkpoint_problem(value)
        if problem:
            raise ConfigError(f"checkpoints={value!r}: {problem}")
        path = Path(value).expanduser()
        name = path.resolve().name if path.is_dir() else value.rstrip("/").rsplit("/", 1)[-1]
        if name in models:
            raise ConfigError(
                f"checkpoints={value!r}: another model is already named {name!r} ('base' and the baselines' names "
                "are reserved); checkpoints are named by their folder or repository name, so copy or rename one"
            )
        models[name] = ("checkpoint", value)
    adapters = model_names(config.adapter, reserved=list(models)[1:])
    models.update({name: ("adapter", path) for name, path in adapters.items() if path})
    return models


@contextlib.contextmanager
def model_sampler(
    pipe: StableDiffusionPipeline, kind: str, source: str, index: int, config: BenchmarkConfig
) -> Iterator[tuple[Callable[[], StableDiffusionPipeline], dict, dict]]:
    """How one model samples: a function giving its pipeline (a checkpoint loads on first use, so a fully cached one
    never loads), the pipeline call's extra arguments, and what the model adds to its units' cache keys."""
    if kind == "adapter":
        peft_name = f"adapter_{index}"  # PEFT names cannot hold ".", folder names can
        load_adapter(pipe, source, peft_name)
        try:
            yield (lambda: pipe), {}, {"adapter": source}
        finally:
            pipe.delete_adapters(peft_name)
    elif kind == "baseline":
        sampler, kwargs = baseline_sampler(source, pipe, config.baseline_concept, config.sld_preset)
        yield (lambda: sampler), kwargs, {"sampler": [source, config.baseline_concept, kwargs]}
    elif kind == "checkpoint":
        loaded = []

        def load() -> StableDiffusionPipeline:
            if not loaded:
                with loading("checkpoints", source):
                    args = ModelArguments(source, torch_dtype=config.torch_dtype)
                    loaded.append(load_pipeline(args).to(pipe.device))
            return loaded[0]

        yield load, {}, {"model": checkpoint_identity(source)}
        loaded.clear()  # a whole second model: free it before the next one loads
        gc.collect()
    else:
        yield (lambda: pipe), {}, {}


def measure_model(
    pipe: StableDiffusionPipeline,
    kind: str,
    source: str,
    index: int,
    prompts: list[str],
    metrics: dict,
    config: BenchmarkConfig,
    progress: tqdm,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One model's report row (`<metric>/<key>`: value) and its grid images (the first seed's, a few prompts)."""
    for metric in metrics.values():
        metric.reset()
    cache, grid = Path(config.output_dir) / CACHE_DIR, {}
    with model_sampler(pipe, kind, source, index, config) as (model_pipe, kwargs, key_parts):
        for seed in config.seeds:
            path = cache / f"{unit_key(config, prompts, seed, **key_parts)}.safetensors"
            sample = lambda seed=seed: _sample(model_pipe(), prompts, seed, config, **kwargs)  # noqa: E731
            images = cached_tensors(path, sample)["images"]
            for start in range(0, len(images), config.batch_size):
                part = slice(start, start + config.batch_size)
                for metric in metrics.values():
                    metric.update(images[part], prompts[part])
            grid.setdefault("prompts", images[grid_indices(len(prompts), config.grid_prompts)])
            progress.update(1)
    row = {
        f"{name}/{key}": float(value) for name, metric in metrics.items() for key, value in metric.compute().items()
    }
    return row, grid


def run_benchmark(config: BenchmarkConfig) -> dict:
    """Sample and measure base, the baselines, the checkpoints and every adapter, then attack base and the adapters
    (`attack`); write report.html, then report.json (last, atomically); return the report."""
    output_dir = Path(config.output_dir)
    if (output_dir / REPORT_NAME).exists() and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir={str(output_dir)!r} holds a report; pass --overwrite_output_dir to replace it")
    try:
        check_output_folder(output_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    prompts = load_benchmark_prompts(config)
    models = benchmark_models(config)
    attack = attack_config(config)  # every input is checked before the first image is sampled
    metrics = {
        entry.get("alias", entry["name"]): build_metric(entry["name"], entry.get("args")) for entry in config.metrics
    }
    with loading("pretrained_model_name_or_path", config.pretrained_model_name_or_path):
        args = ModelArguments(config.pretrained_model_name_or_path, torch_dtype=config.torch_dtype)
        pipe = load_pipeline(args)
    pipe.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"protocol": protocol(config, prompts, metrics), "models": {}}
    grids = {}
    progress = tqdm(total=len(models) * len(config.seeds), desc="eval (model, seed)")
    for index, (name, (kind, source)) in enumerate(models.items()):
        report["models"][name], grids[name] = measure_model(
            pipe, kind, source, index, prompts, metrics, config, progress
        )
    progress.close()
    if attack is not None:
        del pipe  # the attack loads its own copy of the model
        gc.collect()
        add_attack(report, run_attack_on(attack))
    runs = {name: Path(source) for name, (kind, source) in models.items() if kind == "adapter"}
    prompt_sets = {"prompts": [prompts[i] for i in grid_indices(len(prompts), config.grid_prompts)]}
    title = f"Benchmark: {config.pretrained_model_name_or_path} on {config.prompts}"
    table = html_metrics(config, report)
    write_report(output_dir, report, table, grids, prompt_sets, runs, len(prompt_sets["prompts"]), title)
    atomic_write_text(output_dir / REPORT_NAME, json.dumps(report, indent=2) + "\n")  # last: it marks a finished run
    return report


def attack_config(config: BenchmarkConfig) -> AttackConfig | None:
    """The `attack` recipe's settings with this benchmark's model, adapters and device, writing to OUTPUT_DIR/attack;
    None without `attack`. A missing or broken recipe is one line naming `attack`."""
    if config.attack is None:
        return None
    from ..attack.run import parse_args

    path = resolve_recipe(config.attack)
    if not Path(path).is_file():
        raise ConfigError(f"attack={config.attack!r}: no such attack recipe{tried(config.attack, recipe=True)}")
    try:
        attack = parse_args(["--config", path])
    except ConfigError as err:
        raise ConfigError(f"attack={config.attack!r}: {err}") from err
    attack.pretrained_model_name_or_path = config.pretrained_model_name_or_path
    attack.adapter = list(config.adapter)
    attack.device = config.device
    attack.output_dir = str(Path(config.output_dir) / ATTACK_DIR)
    attack.overwrite_output_dir = True  # the benchmark's own report decides; the attack's cache makes a re-run cheap
    if not Path(attack.prompts).is_file():
        raise ConfigError(f"attack={config.attack!r}: prompts={attack.prompts!r}: no such prompt file")
    if attack.detector == "toyworld" and not (Path(attack.judge_classifier) / "config.json").is_file():
        raise ConfigError(f"attack={config.attack!r}: judge_classifier={attack.judge_classifier!r}: no classifier")
    return attack


def run_attack_on(attack: AttackConfig) -> dict:
    """`run_attack` on base and every adapter (checkpoints and baselines are not attacked: the attack's objective
    needs the base model beside the attacked one, which only an adapter on it gives)."""
    from ..attack.run import run_attack

    return run_attack(attack, include_base=True)


def add_attack(report: dict, attack_report: dict) -> None:
    """The attack's rates in the rows of the models it attacked, and its protocol under protocol/attack."""
    for name, entry in attack_report["models"].items():
        report["models"][name].update({column: entry[key]["value"] for key, column in ATTACK_COLUMNS.items()})
    report["protocol"]["attack"] = attack_report["protocol"]


def html_metrics(config: BenchmarkConfig, report: dict) -> list[tuple[str, str, str]]:
    """report.html's rows: (key, prompt set, meaning), the meaning being the metric's name and arguments."""
    meaning = {
        entry.get("alias", entry["name"]): f"{entry['name']} {json.dumps(entry.get('args') or {})}"
        for entry in config.metrics
    }
    meaning.update(
        attack_success_rate="share of images under the attack's adversarial embeddings showing the concept",
        attack_clean_rate="the attack's prompts, seeds and noise without the attack",
    )
    keys = dict.fromkeys(key for values in report["models"].values() for key in values)
    return [(key, "prompts", meaning.get(key.split("/")[0], "")) for key in keys]


def protocol(config: BenchmarkConfig, prompts: list[str], metrics: dict) -> dict:
    """Everything that decides the numbers: model, prompts, sampling and each metric's own protocol."""
    return {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "adapters": list(config.adapter),
        "baselines": {
            name: {"concept": config.baseline_concept, **({"sld_preset": config.sld_preset} if name == "sld" else {})}
            for name in config.baselines
        },
        "checkpoints": list(config.checkpoints),
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
    """`rl-safety eval --config recipes/eval/X.yaml [--adapter DIR ...] [--baselines ...] [--checkpoints ...]` (a
    recipe with `metrics`)."""
    (config,) = RecipeParser((BenchmarkConfig,), prog="rl-safety eval").parse(argv)
    report = run_benchmark(config)
    print(format_table(report))
    print(f"report: {Path(config.output_dir) / REPORT_NAME} and report.html")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety eval` for real models: bad input is one line, exit 2; an interrupted run continues from its cache."""
    return run_command("rl-safety eval", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
