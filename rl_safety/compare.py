"""`rl-safety compare RUN_OR_REPORT...`: one table across runs, evaluation, attack and benchmark reports.

A run folder contributes its evaluation (`eval/report.json`): the base model and its adapter. An evaluation or attack
output folder, or a report.json, contributes its models. Rows are models by name; an attack report fills the attack
columns of the rows with the same name (models are named by their folder in both). Prints markdown; writes
OUTPUT_DIR/compare.md and compare.json.

Real-model benchmark reports (`rl-safety eval` with a recipe listing `metrics`, or its output folder) compare with
each other: rows are models by name, columns every `<metric>/<key>` present (first seen first, the attack's last).
Their protocols must agree (see `check_protocol`); a benchmark and a toy-world report together are refused.

Every report is read and checked, and the output folder too, before anything is written: a failed compare leaves
neither file, and an earlier compare's files are replaced only with --overwrite_output_dir.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .command import ArgumentParser, first_line, run_command
from .errors import ConfigError

COLUMNS = (
    ("target_rate", "target"),
    ("synonym_target_rate", "synonym"),
    ("unsafe_fidelity", "unsafe fidelity"),
    ("preservation_accuracy", "preservation"),
    ("clip_score", "CLIP score"),
    ("reward_classifier_target_rate", "reward clf. target"),
    ("attack_success_rate", "attack success"),
)
ATTACK_METRICS = {"attack_success_rate": "attack_success_rate", "clean_rate": "attack_clean_rate"}  # report → row
EVAL_METRICS = {key: key for key, _ in COLUMNS if key not in ATTACK_METRICS}
OUTPUT_FILES = ("compare.md", "compare.json")
RUN_FILES = ("config.yaml", "pytorch_lora_weights.safetensors")  # what marks a training run folder
REPORT_SHAPE = '{"target_concept": ..., "settings" or "protocol": ..., "models": {name: {metric: {"value": ...}}}}'
BENCHMARK_SHAPE = '{"protocol": {..., "metrics": {...}}, "models": {name: {"<metric>/<key>": number}}}'
BENCHMARK_ATTACK_COLUMNS = ("attack_success_rate", "attack_clean_rate")  # benchmark.ATTACK_COLUMNS' values: last
# Protocol fields that list the models a benchmark ran rather than how it measured them: two reports may differ there
# (and so may `baselines` and `metrics`, checked entry by entry in `check_protocol`).
BENCHMARK_MODEL_FIELDS = ("adapters", "checkpoints")


class CompareError(ConfigError):
    """An argument that is neither a run, an evaluation, an attack folder nor a report."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_report(argument: str) -> Path:
    """The report.json an argument names: the file itself, a run's eval/report.json or a folder's report.json."""
    if not argument.strip():
        raise CompareError(f"{argument!r}: empty; name a run folder, an eval or attack folder, or a report.json")
    path = Path(argument)
    for candidate in (path, path / "eval" / "report.json", path / "report.json"):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise CompareError(f"{argument!r}: no such file or folder")
    if path.is_dir() and any((path / name).is_file() for name in RUN_FILES):
        raise CompareError(
            f"{argument!r}: a training run without eval/report.json; evaluate it first "
            f"(`rl-safety eval --config recipes/toyworld/eval.yaml --adapter {argument} --output_dir {argument}/eval`)"
        )
    raise CompareError(f"{argument!r}: holds no report.json nor eval/report.json (a run, eval or attack folder)")


def _value(entry: Any, where: str) -> float | None:
    """A metric's value: `{"value": number or null, ...}`; NaN and infinities are shown as n/a."""
    value = entry.get("value") if isinstance(entry, dict) else None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not isinstance(entry, dict) or "value" not in entry or not (value is None or number):
        raise CompareError(f'{where}={_short(entry)}; expected {{"value": a number or null, ...}}')
    return float(value) if number and math.isfinite(value) else None


def _same(a: float | None, b: float | None) -> bool:
    """Equal up to float noise (a clip_score's mean on another machine), or both missing."""
    return a is b is None or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))


def is_benchmark(report: Any) -> bool:
    """A real-model benchmark's report: a protocol listing its metrics, and no erased concept (toy-world reports
    always name one)."""
    protocol = report.get("protocol") if isinstance(report, dict) else None
    return isinstance(protocol, dict) and "metrics" in protocol and "target_concept" not in report


def read_benchmark(path: Path, report: dict) -> dict:
    """A benchmark report.json, checked: `{"kind": "benchmark", "protocol": ..., "models": {name: {key: value}}}`,
    each value a number or None (null, NaN and infinities are shown as n/a)."""
    protocol, models = report["protocol"], report.get("models")
    if "settings" in report:
        raise CompareError(
            f"{str(path)!r}: both a benchmark ('protocol' with 'metrics') and a toy-world evaluation ('settings'); "
            f"expected {BENCHMARK_SHAPE}"
        )
    if not isinstance(protocol["metrics"], dict):
        raise CompareError(
            f"{str(path)!r}: protocol.metrics={_short(protocol['metrics'])}; expected {{metric: its protocol}}"
        )
    if not isinstance(models, dict) or not models:
        raise CompareError(f"{str(path)!r}: models={_short(models)}; expected one entry per model: {BENCHMARK_SHAPE}")
    rows = {}
    for name, metrics in models.items():
        where = f"{str(path)!r}: models[{name!r}]"
        if not name.strip() or not isinstance(metrics, dict):
            raise CompareError(f'{where}={_short(metrics)}; expected a named model\'s {{"<metric>/<key>": number}}')
        row = {}
        for key, value in metrics.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (value is None or number):
                raise CompareError(f"{where}[{key!r}]={_short(value)}; expected a number or null")
            row[key] = float(value) if number and math.isfinite(value) else None
        rows[name] = row
    return {"kind": "benchmark", "protocol": protocol, "models": rows}


def read_report(path: Path) -> dict:
    """A report.json, checked: its kind (evaluation or attack), its concept and every metric the table shows, as
    `{"kind": "toyworld", "concept": ..., "models": {name: {row key: value}}}`; a benchmark's as `read_benchmark`."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"{str(path)!r}: not a readable JSON report ({first_line(err)})") from err
    if not isinstance(report, dict) or "models" not in report:
        what = (
            "a classifier report (`rl-safety classifier`)"
            if isinstance(report, dict) and "clean_accuracy" in report
            else "not an rl_safety report"
        )
        raise CompareError(
            f"{str(path)!r}: {what}, no 'models'; compare takes `rl-safety eval` and `rl-safety attack` reports"
        )
    if is_benchmark(report):
        return read_benchmark(path, report)
    models, concept = report["models"], report.get("target_concept")
    if ("settings" in report) == ("protocol" in report):
        which = "both" if "settings" in report else "neither"
        raise CompareError(
            f"{str(path)!r}: {which} an evaluation ('settings') {'and' if which == 'both' else 'nor'} an attack "
            f"report ('protocol'); expected {REPORT_SHAPE}"
        )
    if not isinstance(concept, str) or not concept:
        raise CompareError(f"{str(path)!r}: target_concept={_short(concept)}; expected the erased concept's name")
    if not isinstance(models, dict) or not models:
        raise CompareError(f"{str(path)!r}: models={_short(models)}; expected one entry per model: {REPORT_SHAPE}")
    metrics_of = ATTACK_METRICS if "protocol" in report else EVAL_METRICS
    rows = {}
    for name, metrics in models.items():
        where = f"{str(path)!r}: models[{name!r}]"
        if not name.strip() or not isinstance(metrics, dict):
            raise CompareError(f'{where}={_short(metrics)}; expected a named model\'s {{metric: {{"value": ...}}}}')
        rows[name] = {
            row_key: _value(metrics[key], f"{where}.{key}") for key, row_key in metrics_of.items() if key in metrics
        }
    return {"kind": "toyworld", "concept": concept, "models": rows}


class _Absent:
    """A protocol field one report lacks (an older or newer `rl-safety eval`): it differs from any value."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def _difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any] | None:
    """The first place two protocol values differ, as (dotted path, a's, b's), or None when they agree."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            found = _difference(a.get(key, ABSENT), b.get(key, ABSENT), f"{where}.{key}")
            if found:
                return found
        return None
    if a is ABSENT or b is ABSENT:
        return None if a is b else (where, a, b)
    return None if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) else (where, a, b)


def check_protocol(protocol: dict, first: dict, path: Path, origins: dict[str, str]) -> dict:
    """`first` (the protocol the table holds so far) joined with the benchmark `path`'s `protocol`, or a one-line
    refusal naming the first field they disagree on and the report each value came from (`origins`: field or
    `field.name` → report, updated here).

    Why refuse rather than show two groups: a column is read down its rows, and the base model's row is shared by
    every report; numbers measured on other prompts, seeds, sampling settings, checkpoint or metric settings would sit
    in one column (or give `base` two values) and invite a comparison the numbers cannot support. Two benchmarks of
    one protocol differ only in the models they ran (adapters, checkpoints, baselines) and in the metrics they
    measured, so those may differ: a metric, baseline or attack present in both must have the same protocol in both,
    one present in one report only adds its column or row. Reports of another protocol are compared separately.
    """
    origins.setdefault("", str(path))  # the first report: where a field absent from all before came from
    joined = dict(first)
    for field in dict.fromkeys([*first, *protocol]):
        mine, theirs = first.get(field, ABSENT), protocol.get(field, ABSENT)
        if field in BENCHMARK_MODEL_FIELDS:  # the table lists every report's models
            lists = [value for value in (mine, theirs) if isinstance(value, list)]
            joined[field] = list(dict.fromkeys(item for value in lists for item in value))
            continue
        if field in ("metrics", "baselines"):  # by name: each in both must agree, the others join
            mine, theirs = (value if isinstance(value, dict) else {} for value in (mine, theirs))
            for name in theirs:
                where = f"{field}.{name}"
                if name in mine:
                    _refuse_if_different(mine[name], theirs[name], where, path, origins.get(where, origins[""]))
                origins.setdefault(where, str(path))
            joined[field] = {**mine, **theirs}
        elif field == "attack" and (mine is ABSENT or theirs is ABSENT):  # one report attacked: its columns join
            joined[field] = theirs if mine is ABSENT else mine
            origins.setdefault(field, str(path))
        else:
            _refuse_if_different(mine, theirs, field, path, origins.get(field, origins[""]))
            origins.setdefault(field, str(path))
    return joined


def _refuse_if_different(mine: Any, theirs: Any, field: str, path: Path, origin: str) -> None:
    found = _difference(mine, theirs, f"protocol.{field}")
    if found:
        where, mine, theirs = found
        raise CompareError(
            f"the benchmarks differ in {where}: {_short(theirs, 40)} in {str(path)!r}, {_short(mine, 40)} in "
            f"{origin!r}; one table holds reports of one protocol (same model, prompts, seeds, sampling and metric "
            "settings), so compare them separately"
        )


def _kind_name(kind: str) -> str:
    return "a real-model benchmark report" if kind == "benchmark" else "a toy-world report"


def collect(arguments: list[str]) -> tuple[dict[str, dict], dict]:
    """{model name: {metric: value, "sources": [...]}} in the order first seen, and what the reports share: toy-world
    reports `{"concept": ...}`, benchmarks `{"protocol": ...}`. A model that two reports give
    different values for is refused: one row cannot hold both."""
    rows: dict[str, dict] = {}
    concepts: list[str] = []
    shared: dict = {}
    seen: dict[Path, str] = {}  # resolved report → the argument that named it
    first = ""  # the first report, named when a later one has another concept
    kind = ""  # the first report's kind: toy-world and benchmark reports are not mixed
    origin: dict[tuple[str, str], str] = {}  # (model, metric) → the report its value came from
    protocol_origin: dict[str, str] = {}  # a benchmark protocol's field → the report it came from
    for argument in arguments:
        path = find_report(argument)
        if path.resolve() in seen:
            raise CompareError(f"{argument!r}: the same report as {seen[path.resolve()]!r} (given twice)")
        seen[path.resolve()] = argument
        report = read_report(path)
        if kind and report["kind"] != kind:
            # Toy-world rates (a colour or shape judged on the toy world's images) and a real model's metrics share
            # no column nor model: one table of both would only put two tables side by side.
            raise CompareError(
                f"{str(path)!r} is {_kind_name(report['kind'])} but {first!r} is {_kind_name(kind)}; "
                "compare toy-world reports and real-model benchmark reports (`rl-safety eval` with metrics) separately"
            )
        kind = report["kind"]
        if kind == "benchmark":
            shared["protocol"] = check_protocol(
                report["protocol"], shared.get("protocol", report["protocol"]), path, protocol_origin
            )
        else:
            if concepts and report["concept"] != concepts[0]:
                raise CompareError(
                    f"the reports erase different concepts: {str(path)!r} erases {report['concept']!r}, "
                    f"{first!r} erases {concepts[0]!r}; compare reports of one concept"
                )
            concepts.append(report["concept"])
        first = first or str(path)
        for name, metrics in report["models"].items():
            row = rows.setdefault(name, {"sources": []})
            for key, value in metrics.items():
                if key in row and not _same(row[key], value):
                    raise CompareError(
                        f"model {name!r}: {key} is {row[key]} in {origin[name, key]!r} but {value} in "
                        f"{str(path)!r}; one row cannot hold both (reports made with different settings?)"
                    )
                row[key], origin[name, key] = value, str(path)
            row["sources"].append(str(path))
    if kind == "toyworld":
        shared = {"concept": concepts[0]}
    return rows, shared


def benchmark_columns(rows: dict[str, dict]) -> list[str]:
    """Every metric key of the rows, first seen first, the attack's columns last."""
    keys = dict.fromkeys(key for row in rows.values() for key in row if key != "sources")
    return [key for key in keys if key not in BENCHMARK_ATTACK_COLUMNS] + [
        key for key in BENCHMARK_ATTACK_COLUMNS if key in keys
    ]


def _is_count(key: str) -> bool:
    """A sample or detection count (`nudity/n`, `fid/n_reference`, `nudity/count/<CLASS>`): shown as a whole number."""
    parts = key.split("/")
    return parts[-1] == "n" or parts[-1].startswith("n_") or "count" in parts[1:-1]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown(rows: dict[str, dict], benchmark: bool = False) -> str:
    """The table: toy-world reports in COLUMNS' order and labels, benchmarks every metric key as it is named."""
    if benchmark:
        shown = [(key, _cell(key)) for key in benchmark_columns(rows)]
    else:
        shown = [(key, label) for key, label in COLUMNS if any(key in row for row in rows.values())]
    lines = ["| model | " + " | ".join(label for _, label in shown) + " |", "|---|" + "---|" * len(shown)]
    for name, row in rows.items():
        cells = [
            "n/a" if row.get(key) is None else f"{row[key]:.0f}" if benchmark and _is_count(key) else f"{row[key]:.3f}"
            for key, _ in shown
        ]
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_output_dir(output_dir: str, overwrite: bool) -> Path:
    """The folder compare.md and compare.json go to: a folder (or one to create under a folder), holding neither
    file unless `overwrite`."""
    if not output_dir.strip():
        raise CompareError(f"output_dir={output_dir!r}: empty; name a folder (default runs/compare)")
    out = Path(output_dir)
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "" if existing == out else f": {str(existing)!r}"
        raise CompareError(f"output_dir={output_dir!r}{where} is a file, not a folder; name a folder")
    for name in OUTPUT_FILES if existing == out else ():
        target = out / name
        if target.is_dir():
            raise CompareError(f"output_dir={output_dir!r}: {name} is a folder; remove it or name another output_dir")
        if target.exists() and not overwrite:
            raise CompareError(
                f"output_dir={output_dir!r} holds {name} from an earlier compare; pass --overwrite_output_dir to "
                "replace it or name another output_dir"
            )
    return out


def write_outputs(out: Path, files: dict[str, str]) -> None:
    """Write every file or none: each is written to a temporary file first, then all are renamed into place; on
    failure the temporary files, the files already renamed and the folders created here are removed."""
    created = next((p for p in reversed((out, *out.parents)) if not p.exists()), None)
    temporary: dict[str, Path] = {}
    placed: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            temporary[name] = Path(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        for name, tmp in temporary.items():
            os.replace(tmp, out / name)
            placed.append(out / name)
    except BaseException:
        for path in [*temporary.values(), *placed]:
            path.unlink(missing_ok=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """`rl-safety compare RUN_OR_REPORT... [--output_dir DIR] [--overwrite_output_dir]`."""
    parser = ArgumentParser(prog="rl-safety compare", description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", metavar="RUN_OR_REPORT")
    parser.add_argument(
        "--output_dir", "--output-dir", default="runs/compare", help="where compare.md and compare.json go"
    )
    parser.add_argument(
        "--overwrite_output_dir",
        "--overwrite-output-dir",
        action="store_true",
        help="replace compare.md and compare.json of an earlier compare in output_dir",
    )
    args = parser.parse_args_strictly(argv, intermixed=True)
    out = check_output_dir(args.output_dir, args.overwrite_output_dir)
    rows, shared = collect(args.reports)
    benchmark = "protocol" in shared
    table = markdown(rows, benchmark)
    if benchmark:
        content = {"protocol": shared["protocol"], "columns": benchmark_columns(rows), "models": rows}
    else:
        content = {"concept": shared["concept"], "models": rows}
    summary = json.dumps(content, indent=2) + "\n"
    try:
        write_outputs(out, {"compare.json": summary, "compare.md": table})
    except OSError as err:
        raise CompareError(f"output_dir={args.output_dir!r}: cannot write ({first_line(err)})") from err
    print(table, end="")
    print(f"written: {out / 'compare.md'} and compare.json")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety compare`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command("rl-safety compare", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
