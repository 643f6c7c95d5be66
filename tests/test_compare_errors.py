"""`rl-safety compare` on bad input: exit status 2, one line naming the argument or file, and neither compare.md nor
compare.json written (nor the output folder created).

Each case writes its inputs into a folder beside two reports that compare cleanly (checked first) and runs the real
entry point; the whole folder must be the same afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl_safety.cli import main

from .conftest import REPO

PREFIX = "rl-safety compare: error: "


def metric(value):
    return {"value": value, "n": 10, "seeds": [1000]}


def eval_report(**changes) -> dict:
    models = {"base": {"target_rate": metric(1.0)}, "grpo-red": {"target_rate": metric(0.05)}}
    return {"target_concept": "red", "settings": {}, "models": models, **changes}


def attack_report(**changes) -> dict:
    models = {"grpo-red": {"attack_success_rate": metric(0.75), "clean_rate": metric(0.05)}}
    return {"target_concept": "red", "protocol": {"epsilon": 0.5}, "models": models, **changes}


def benchmark_report(models=None, **changes) -> dict:
    """A real-model benchmark's report.json (`rl-safety eval` with metrics): plain numbers, no target_concept."""
    protocol = {
        "pretrained_model_name_or_path": "CompVis/stable-diffusion-v1-4",
        "adapters": [],
        "baselines": {"sld": {"concept": "nudity", "sld_preset": "medium"}},
        "checkpoints": [],
        "prompt_source": "file",
        "prompts": "prompts/nudity.txt",
        "categories": None,
        "num_prompts": 3,
        "seeds": [1, 2],
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "eta": 0.0,
        "metrics": {"nudity": {"preset": "i2p", "threshold": 0.6}},
        "attack": {"epsilon": 0.1},
        **changes,
    }
    models = {"base": {"nudity/rate": 0.4, "attack_success_rate": 0.9}} if models is None else models
    return {"protocol": protocol, "models": models}


def two_benchmarks(**changes):
    """A case: compare a benchmark report and one whose protocol has `changes` (its models otherwise the same)."""
    return lambda root: [
        put(root, "b1.json", benchmark_report()),
        put(root, "b2.json", benchmark_report(**changes)),
        *OUT,
    ]


def put(root: Path, name: str, content) -> str:
    """Write `content` (a dict or list as JSON, text, bytes; None: a folder) to root/name; return its path."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def good(tmp_path) -> tuple[str, str]:
    """A run folder with its evaluation, and an attack folder: they compare cleanly."""
    put(tmp_path, "run/eval/report.json", eval_report())
    put(tmp_path, "attack/report.json", attack_report())
    return str(tmp_path / "run"), str(tmp_path / "attack")


def test_the_good_reports_compare(good, tmp_path, capsys):
    """The baseline the cases break: both reports in one table, both files written; a second compare needs the flag."""
    out = tmp_path / "out"
    assert main(["compare", *good, "--output_dir", str(out)]) == 0
    assert "| grpo-red | 0.050 | 0.750 |" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]
    assert main(["compare", *good, "--output_dir", str(out), "--overwrite_output_dir"]) == 0
    assert main(["compare", "--output_dir", str(out), good[1], "--overwrite-output-dir", good[0]]) == 0  # any order


OUT = ["--output_dir", "OUT"]  # OUT: root/out, which no case may create


def alone(name: str, content):
    """A case: compare only `content`, written to root/name."""
    return lambda root: [put(root, name, content), *OUT]


def models(value, report=eval_report):
    """A case: compare one report whose models are `value`."""
    return alone("m.json", report(models=value))


def beside(argument: str, name: str, content):
    """A case: compare root/argument (one of the good ones) and `content`, written to root/name."""
    return lambda root: [str(root / argument), put(root, name, content), *OUT]


def output(name: str, content, *flags: str, output_dir: str = "o"):
    """A case: compare the good run into root/output_dir, after writing `content` to root/name."""

    def build(root: Path) -> list[str]:
        put(root, name, content)
        return [str(root / "run"), *flags, "--output_dir", str(root / output_dir)]

    return build


def training_run(root: Path) -> list[str]:
    put(root, "fresh/config.yaml", "trainer: grpo\n")  # trained, not evaluated
    return [str(root / "fresh"), *OUT]


# (id, build(root) → the arguments after `compare`, expected text in the message); root holds the good reports.
CASES = [
    # what an argument names
    ("missing", lambda r: [str(r / "nope"), *OUT], "nope': no such file or folder"),
    ("empty-folder", alone("empty", None), "empty': holds no report.json nor eval/report.json"),
    ("run-not-evaluated", training_run, "fresh': a training run without eval/report.json; evaluate it first"),
    ("empty-argument", lambda r: ["", *OUT], "'': empty; name a run folder, an eval or attack folder"),
    ("not-json", alone("bad.json", "{not json"), "bad.json': not a readable JSON report (Expecting"),
    ("binary", alone("image.png", b"\x89PNG\xff\x00"), "image.png': not a readable JSON report ('utf-8' codec"),
    ("metrics-jsonl", alone("m.jsonl", '{"step": 1}\n{"step": 2}\n'), "m.jsonl': not a readable JSON report (Extra"),
    ("yaml", alone("config.yaml", "trainer: grpo\n"), "config.yaml': not a readable JSON report"),
    ("json-list", alone("list.json", [1, 2]), "list.json': not an rl_safety report, no 'models'"),
    ("no-models", alone("runs.json", {"runs": []}), "runs.json': not an rl_safety report"),
    ("classifier", alone("c/report.json", {"clean_accuracy": 0.9}), "report.json': a classifier report"),
    # what a report holds
    ("no-kind", alone("k.json", {"target_concept": "red", "models": {}}), "k.json': neither an evaluation"),
    ("two-kinds", alone("k.json", eval_report(protocol={})), "k.json': both an evaluation ('settings') and an attack"),
    ("no-concept", alone("c.json", eval_report(target_concept=None)), "c.json': target_concept=None; expected"),
    ("concept-number", alone("c.json", eval_report(target_concept=5)), "c.json': target_concept=5; expected"),
    ("models-list", models([]), "m.json': models=[]; expected one entry per model"),
    ("models-empty", models({}), "m.json': models={}; expected"),
    ("model-number", models({"a": 3}), "m.json': models['a']=3; expected"),
    ("model-unnamed", models({" ": {}}), "models[' ']={}; expected a named model's"),
    ("metric-number", models({"a": {"target_rate": 0.5}}), "models['a'].target_rate=0.5; expected {\"value\": a"),
    ("metric-text", models({"a": {"clip_score": metric("high")}}), "models['a'].clip_score={'value': 'high'"),
    ("metric-bool", models({"a": {"target_rate": metric(True)}}), "models['a'].target_rate={'value': True"),
    ("metric-no-value", models({"a": {"target_rate": {"n": 3}}}), "models['a'].target_rate={'n': 3}; expected"),
    ("attack-metric", models({"a": {"attack_success_rate": "x"}}, attack_report), "attack_success_rate='x'; expected"),
    ("attack-clean-rate", models({"a": {"clean_rate": [0.1]}}, attack_report), "models['a'].clean_rate=[0.1]; expect"),
    # reports that do not go together
    ("two-concepts", beside("run", "blue.json", eval_report(target_concept="blue")), "erase different concepts: "),
    ("base-differs", beside("run", "b.json", eval_report(models={"base": {"target_rate": metric(0.5)}})),
     "model 'base': target_rate is 1.0 in"),
    ("base-missing", beside("run", "b.json", eval_report(models={"base": {"target_rate": metric(None)}})),
     "model 'base': target_rate is 1.0 in"),
    ("attack-differs", beside("attack", "a.json", attack_report(models={"grpo-red": {"clean_rate": metric(0.5)}})),
     "model 'grpo-red': attack_clean_rate is 0.05 in"),
    # benchmark reports (`rl-safety eval` with metrics): their rows, mixing them, their protocols
    ("bench-value-text", alone("b.json", benchmark_report({"base": {"nudity/rate": "x"}})),
     "b.json': models['base']['nudity/rate']='x'; expected a number or null"),
    ("bench-value-bool", alone("b.json", benchmark_report({"base": {"nudity/rate": True}})), "=True; expected a num"),
    ("bench-value-dict", alone("b.json", benchmark_report({"base": {"nudity/rate": metric(0.4)}})),
     "models['base']['nudity/rate']={'value': 0.4"),
    ("bench-models-empty", alone("b.json", benchmark_report({})), "b.json': models={}; expected one entry per model"),
    ("bench-model-list", alone("b.json", benchmark_report({"base": [0.4]})), "models['base']=[0.4]; expected a named"),
    ("bench-and-settings", alone("b.json", benchmark_report() | {"settings": {}}),
     "b.json': both a benchmark ('protocol' with 'metrics') and a toy-world evaluation ('settings')"),
    ("bench-metrics-list", alone("b.json", benchmark_report(metrics=["nudity"])), "protocol.metrics=['nudity']; exp"),
    ("toy-then-bench", beside("run", "b.json", benchmark_report()),
     "b.json' is a real-model benchmark report but '"),
    ("bench-then-toy", lambda r: [put(r, "b.json", benchmark_report()), str(r / "attack"), *OUT],
     "attack/report.json' is a toy-world report but '"),
    ("bench-prompts", two_benchmarks(prompts="prompts/other.txt"),
     "the benchmarks differ in protocol.prompts: 'prompts/other.txt' in '"),
    ("bench-seeds", two_benchmarks(seeds=[1]), "differ in protocol.seeds: [1] in '"),
    ("bench-model", two_benchmarks(pretrained_model_name_or_path="other/sd"), "differ in protocol.pretrained_model"),
    ("bench-steps", two_benchmarks(num_inference_steps=20), "differ in protocol.num_inference_steps: 20 in"),
    ("bench-field-absent", two_benchmarks(torch_dtype="float16"), "protocol.torch_dtype: 'float16' in '"),
    ("bench-metric-protocol", two_benchmarks(metrics={"nudity": {"preset": "unlearndiffatk", "threshold": 0.45}}),
     "differ in protocol.metrics.nudity.preset: 'unlearndiffatk' in '"),
    ("bench-baseline-protocol", two_benchmarks(baselines={"sld": {"concept": "nudity", "sld_preset": "max"}}),
     "differ in protocol.baselines.sld.sld_preset: 'max' in '"),
    ("bench-attack-protocol", two_benchmarks(attack={"epsilon": 0.2}), "differ in protocol.attack.epsilon: 0.2 in '"),
    ("bench-base-differs", lambda r: [put(r, "b1.json", benchmark_report()),
                                      put(r, "b2.json", benchmark_report({"base": {"nudity/rate": 0.5}})), *OUT],
     "model 'base': nudity/rate is 0.4 in"),
    ("given-twice", lambda r: [str(r / "attack"), str(r / "attack/report.json"), *OUT], "the same report as"),
    ("run-and-its-eval", lambda r: [str(r / "run"), str(r / "run/eval"), *OUT], "(given twice)"),
    # the command line
    ("no-inputs", lambda r: [], "the following arguments are required: RUN_OR_REPORT"),
    ("only-flags", lambda r: [*OUT], "the following arguments are required: RUN_OR_REPORT"),
    ("unknown-flag", lambda r: [str(r / "run"), "--outdir", "x"], "unknown argument '--outdir'; did you mean"),
    ("unknown-flag-value", lambda r: [str(r / "run"), "--format=csv"], "unknown argument '--format' (valid: --output"),
    ("overwrite-with-value", lambda r: [str(r / "run"), "--overwrite_output_dir=no", *OUT], "takes no value"),
    ("output-no-value", lambda r: [str(r / "run"), "--output_dir"], "argument --output_dir/--output-dir: expected"),
    # where the table goes
    ("output-empty", lambda r: [str(r / "run"), "--output_dir", ""], "output_dir='': empty; name a folder"),
    ("output-is-a-file", lambda r: [str(r / "run"), "--output_dir", put(r, "f", "x")], "f' is a file, not a folder"),
    ("output-under-a-file", output("o", "x", output_dir="o/sub"), "o/sub': '"),
    ("holds-compare-md", output("o/compare.md", "old"), "holds compare.md from an earlier compare; pass --overwrite"),
    ("holds-compare-json", output("o/compare.json", "{}"), "holds compare.json from an earlier compare"),
    ("compare-md-folder", output("o/compare.md", None, "--overwrite_output_dir"), "compare.md is a folder; remove"),
]  # fmt: skip


@pytest.mark.parametrize("build, expected", [pytest.param(b, e, id=name) for name, b, e in CASES])
def test_bad_compare_input_is_one_line_and_writes_nothing(good, tmp_path, capsys, build, expected):
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in build(tmp_path)]
    before = tree(tmp_path)
    code = main(["compare", *argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (captured.out, err)
    assert err.startswith(PREFIX) and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert captured.out == ""
    assert tree(tmp_path) == before  # no compare.md, no compare.json, no output folder, no temporary file


def test_a_write_that_fails_halfway_leaves_neither_file(good, tmp_path, capsys, monkeypatch):
    """The second rename fails (disk full): the first file is taken back and the folder made for them removed."""
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    before = tree(tmp_path)
    assert main(["compare", *good, "--output_dir", str(tmp_path / "new/out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(PREFIX + "output_dir=") and "cannot write (" in err and "No space left" in err, err
    assert len(calls) == 2 and tree(tmp_path) == before


def test_console_script_reports_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rl_safety.cli",
            "compare",
            str(tmp_path / "nope"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{PREFIX}{str(tmp_path / 'nope')!r}: no such file or folder"
    assert list(tmp_path.iterdir()) == []
