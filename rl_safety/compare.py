"""`rl-safety compare RUN_OR_REPORT...`: one table across runs, evaluation reports and attack reports.

A run folder contributes its evaluation (`eval/report.json`): the base model and its adapter. An evaluation or attack
output folder, or a report.json, contributes its models. Rows are models by name; an attack report fills the attack
columns of the rows with the same name (models are named by their folder in both). Prints markdown; writes
OUTPUT_DIR/compare.md and compare.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .command import ArgumentParser, run_command
from .errors import ConfigError
from .outputs import atomic_write_text

COLUMNS = (
    ("target_rate", "target"),
    ("synonym_target_rate", "synonym"),
    ("unsafe_fidelity", "unsafe fidelity"),
    ("preservation_accuracy", "preservation"),
    ("clip_score", "CLIP score"),
    ("reward_classifier_target_rate", "reward clf. target"),
    ("attack_success_rate", "attack success"),
)


class CompareError(ConfigError):
    """An argument that is neither a run, an evaluation, an attack folder nor a report."""


def find_report(argument: str) -> Path:
    path = Path(argument)
    for candidate in (path, path / "eval" / "report.json", path / "report.json"):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise CompareError(f"{argument!r}: no such file or folder")
    raise CompareError(f"{argument!r}: holds no report.json nor eval/report.json (a run, eval or attack folder)")


def read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"{str(path)!r}: not a readable JSON report ({type(err).__name__})") from err
    if not isinstance(report, dict) or not isinstance(report.get("models"), dict):
        raise CompareError(f"{str(path)!r}: not an rl_safety report (no 'models')")
    return report


def collect(arguments: list[str]) -> tuple[dict[str, dict], list[str]]:
    """{model name: {metric: value, "source": ...}} in the order first seen, and the concepts seen."""
    rows: dict[str, dict] = {}
    concepts = []
    for argument in arguments:
        path = find_report(argument)
        report = read_report(path)
        concepts.append(report.get("target_concept"))
        is_attack = "protocol" in report
        for name, metrics in report["models"].items():
            row = rows.setdefault(name, {"sources": []})
            row["sources"].append(str(path))
            for key, _ in COLUMNS:
                entry = metrics.get(key)
                value = entry.get("value") if isinstance(entry, dict) else None
                if value is not None and (is_attack == (key == "attack_success_rate")):
                    row.setdefault(key, value)
            if is_attack:
                row.setdefault("attack_clean_rate", metrics.get("clean_rate", {}).get("value"))
    return rows, concepts


def markdown(rows: dict[str, dict]) -> str:
    shown = [(key, label) for key, label in COLUMNS if any(key in row for row in rows.values())]
    lines = ["| model | " + " | ".join(label for _, label in shown) + " |", "|---|" + "---|" * len(shown)]
    for name, row in rows.items():
        cells = ["n/a" if row.get(key) is None else f"{row[key]:.3f}" for key, _ in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`rl-safety compare RUN_OR_REPORT... [--output_dir DIR]`."""
    parser = ArgumentParser(prog="rl-safety compare", description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", metavar="RUN_OR_REPORT")
    parser.add_argument("--output_dir", default="runs/compare", help="where compare.md and compare.json go")
    args = parser.parse_args(argv)
    rows, concepts = collect(args.reports)
    if len(set(concepts)) > 1:
        raise CompareError(f"the reports erase different concepts: {sorted(set(map(str, concepts)))}")
    table = markdown(rows)
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.md", table)
        atomic_write_text(out / "compare.json", json.dumps({"concept": concepts[0], "models": rows}, indent=2) + "\n")
    except OSError as err:
        raise CompareError(f"output_dir={args.output_dir!r}: {err.strerror}") from err
    print(table, end="")
    print(f"written: {out / 'compare.md'} and compare.json")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety compare`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command("rl-safety compare", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
