"""What a run leaves in its output_dir: atomic files, the resolved config, metrics.jsonl and the model card."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
RUN_MARKERS = (CONFIG_NAME, METRICS_NAME, "pytorch_lora_weights.safetensors")


def cached_tensors(path: str | Path, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`compute()`'s tensors, kept in `path` (written atomically, so a file there is always whole): a run that was
    interrupted loads the units it finished instead of computing them again. The caller puts everything that
    decides the tensors into the file name."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in compute().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return tensors


def cache_key(weights: str | Path | None, settings: Any) -> str:
    """The name of a cached unit: a hash of the weights file's bytes (None for a base model) and of `settings`
    (JSON), so a changed adapter or setting gets a new key and a cache never serves stale results."""
    digest = hashlib.sha256(file_digest(weights) if weights else b"")
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def file_digest(path: str | Path) -> bytes:
    """A file's sha256, read once per (path, modification time, size): an adapter is hashed once, not per unit."""
    stat = Path(path).stat()
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it into place: readers never see half a file. The
    temporary name ends in `.tmp`, so a search for `*.safetensors` or `*.png` never picks up a leftover."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside `path` to write a whole result into (a model, a pipeline). When the block ends it
    takes the place of `path` (an old folder there is moved aside, then removed); when the block fails it is removed.
    So `path` holds the old result or the new one, never half of one, and a failed run leaves nothing a later run
    could load. Its name starts with "." and ends in ".tmp"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        # mkdtemp makes the folder private, and safetensors its files: results are for everyone to read.
        for item in [tmp, *tmp.rglob("*")]:
            item.chmod(item.stat().st_mode | (0o555 if item.is_dir() else 0o444))
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def holds_previous_run(output_dir: str | Path) -> bool:
    """True if `output_dir` already holds a run's files or checkpoints."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return False
    return any((output_dir / name).exists() for name in RUN_MARKERS) or any(output_dir.glob("checkpoint-*"))


def _plain(value: Any) -> Any:
    """YAML-safe version of a config value (enums to their value, tuples to lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)  # also turns str subclasses (e.g. torch's version string) into plain str


def config_dict(*configs: Any) -> dict[str, Any]:
    """All fields of the given dataclasses, flat, as a recipe would spell them (later configs win on a clash)."""
    out: dict[str, Any] = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else asdict(config)
        names = {f.name for f in fields(config)} if is_dataclass(config) else set(values)
        out.update({k: _plain(v) for k, v in values.items() if k in names})
    return out


def write_resolved_config(path: str | Path, configs: tuple, runtime: Mapping[str, Any]) -> None:
    """Save the fully resolved recipe (every field, defaults included) plus a `runtime:` block describing the run."""
    data = config_dict(*configs)
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    text = yaml.safe_dump(data, sort_keys=True)
    text += yaml.safe_dump({"runtime": _plain(dict(runtime))}, sort_keys=True)
    atomic_write_text(path, text)


def _finite(logs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in logs.items()}


class MetricsFileCallback(TrainerCallback):
    """Appends every log event to `output_dir/metrics.jsonl` (one JSON object a line), on the main process only."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **_finite(logs)}
        with open(Path(args.output_dir) / METRICS_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def evaluation_table(report: Mapping[str, Any], adapter_name: str | None = None) -> str:
    """report.json's metrics as a markdown table, one column per model (`adapter_name`'s column is headed
    "adapter"); rows in the report's order, values as `rl-safety eval` prints them."""
    models = report.get("models") or {}
    metrics: list[str] = []
    for values in models.values():
        metrics += [m for m, v in values.items() if m not in metrics and (isinstance(v, Mapping) and "value" in v)]

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float | int) and not isinstance(value, bool) else "n/a"

    header = ["metric"] + ["adapter" if name == adapter_name else name for name in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in metrics:
        entries = [models[name].get(metric) for name in models]
        cells = [cell(entry.get("value") if isinstance(entry, Mapping) else None) for entry in entries]
        lines.append(f"| `{metric}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _hub_id(name: str) -> bool:
    """Whether `name` can be the card's `base_model`: the Hub refuses a card whose base_model is not a model id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_card(
    base_model: str,
    recipe: Mapping[str, Any],
    rewards: list[Mapping[str, Any]],
    final_metrics: Mapping[str, Any],
    trainer_name: str = "DiffusionGRPOTrainer",
    method_tag: str = "grpo",
    repo_id: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
    adapter_name: str | None = None,
) -> str:
    """A Hub model card (README.md) naming the base model, the recipe, the rewards and the final metrics; with
    `repo_id` the loading snippet names that repository, with `evaluation` (report.json) it holds the table."""
    card_data = ModelCardData(
        base_model=base_model if _hub_id(base_model) and not Path(base_model).exists() else None,
        library_name="diffusers",
        tags=["rl_safety", method_tag, "lora", "diffusers", "stable-diffusion", "text-to-image"],
        license="apache-2.0",
    )
    reward_lines = (
        "\n".join(
            f"| `{r.get('alias', r['name'])}` | {r.get('weight', 1.0)} "
            f"| `{json.dumps(r.get('args', {}), default=str)}` |"
            for r in rewards
        )
        or "| none (this method trains without rewards) | | |"
    )
    metric_lines = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in final_metrics.items() if isinstance(v, float | int))
    evaluation_section = ""
    if evaluation:
        concept = evaluation.get("target_concept")
        about = f" (target concept: `{concept}`)" if concept else ""
        evaluation_section = f"""
## Evaluation

From `eval/report.json`{about}: `base` is the model without the adapter.

{evaluation_table(evaluation, adapter_name)}
"""
    content = f"""---
{card_data.to_yaml()}
---

# LoRA adapter trained with rl_safety ({trainer_name})

Base model: `{base_model}`. Load it with diffusers:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
pipe.load_lora_weights("{repo_id or "<this repository or folder>"}")
```

## Rewards

| reward | weight | args |
|---|---|---|
{reward_lines}

## Final metrics

| metric | value |
|---|---|
{metric_lines}
{evaluation_section}
## Recipe

`config.yaml` beside this card holds the fully resolved recipe.

```yaml
{yaml.safe_dump(_plain(dict(recipe)), sort_keys=True).strip()}
```
"""
    return ModelCard(content).content


def write_model_card(output_dir: str | Path, *args: Any, **kwargs: Any) -> None:
    """`model_card(...)` written atomically to `output_dir/README.md`."""
    atomic_write_text(Path(output_dir) / "README.md", model_card(*args, **kwargs))
