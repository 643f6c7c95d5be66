"""What a run leaves in its output_dir: atomic files, the resolved config, metrics.jsonl and the model card."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainerCallback

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
RUN_MARKERS = (CONFIG_NAME, METRICS_NAME, "pytorch_lora_weights.safetensors")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
