"""`rl-safety compare`: rows by model across evaluation, attack and benchmark reports; markdown + JSON; errors."""

from __future__ import annotations

import json

from rl_safety.cli import main


def _metric(value):
    return {"value": value, "n": 10, "seeds": [1000]}


def _eval_run(folder, name, target, preservation):
    (folder / "eval").mkdir(parents=True)
    report = {
        "target_concept": "red",
        "settings": {},
        "models": {
            "base": {"target_rate": _metric(1.0), "preservation_accuracy": _metric(0.99)},
            name: {"target_rate": _metric(target), "preservation_accuracy": _metric(preservation)},
        },
    }
    (folder / "eval" / "report.json").write_text(json.dumps(report))


def test_compare_joins_evaluations_and_attacks_by_model_name(tmp_path, capsys):
    _eval_run(tmp_path / "grpo-red", "grpo-red", 0.05, 0.97)
    _eval_run(tmp_path / "esd-red", "esd-red", 0.0, 1.0)
    attack = {
        "target_concept": "red",
        "protocol": {"epsilon": 0.5},
        "models": {
            "grpo-red": {"attack_success_rate": _metric(0.75), "clean_rate": _metric(0.05)},
            "esd-red": {"attack_success_rate": _metric(0.25), "clean_rate": _metric(0.0)},
        },
    }
    (tmp_path / "attack.json").write_text(json.dumps(attack))
    out = tmp_path / "table"
    argv = ["compare", str(tmp_path / "grpo-red"), str(tmp_path / "esd-red"), str(tmp_path / "attack.json")]
    assert main([*argv, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| grpo-red | 0.050 | 0.970 | 0.750 |" in printed
    assert "| esd-red | 0.000 | 1.000 | 0.250 |" in printed
    assert "| base | 1.000 | 0.990 | n/a |" in printed and printed.count("| base |") == 1
    saved = json.loads((out / "compare.json").read_text())
    assert saved["models"]["esd-red"]["attack_clean_rate"] == 0.0 and saved["concept"] == "red"
    assert (out / "compare.md").read_text().splitlines()[0].startswith("| model | target | preservation")


def test_compare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"runs": []}))
    for argument, expected in (
        (tmp_path / "missing", "no such file or folder"),
        (tmp_path / "empty", "holds no report.json"),
        (tmp_path / "bad.json", "not a readable JSON report"),
        (tmp_path / "other.json", "not an rl_safety report"),
    ):
        assert main(["compare", str(argument), "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rl-safety compare: error:") and expected in err and "\n" not in err
    _eval_run(tmp_path / "a", "a", 0.1, 0.9)
    blue = json.loads((tmp_path / "a" / "eval" / "report.json").read_text()) | {"target_concept": "blue"}
    (tmp_path / "blue.json").write_text(json.dumps(blue))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "blue.json")]) == 2
    assert "different concepts" in capsys.readouterr().err


class _Protocol:
    """A stand-in metric: only its protocol goes into the report."""

    def __init__(self, **protocol):
        self._protocol = protocol

    def protocol(self) -> dict:
        return self._protocol


def _benchmark_report(tmp_path, rows: dict, metrics: dict, attack: dict | None = None, **fields) -> dict:
    """A report.json as `rl-safety eval` with metrics writes it: the protocol from `benchmark.protocol` itself, the
    attack's columns through `benchmark.add_attack`."""
    from rl_safety.evaluation import benchmark
    from rl_safety.evaluation.benchmark_config import BenchmarkConfig

    prompts = ["a photo", "a painting", "a statue"]
    config = BenchmarkConfig(
        pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4",
        metrics=[{"name": name} for name in metrics],
        prompt_source="file",
        prompts="prompts/nudity.txt",
        seeds=[1, 2],
        output_dir=str(tmp_path / "unused"),
        **fields,
    )
    report = {"protocol": benchmark.protocol(config, prompts, metrics), "models": rows}
    if attack is not None:
        benchmark.add_attack(report, {"protocol": {"epsilon": 0.1}, "models": attack})
    return report


def test_compare_joins_benchmark_reports_of_one_protocol(tmp_path, capsys):
    """base + adapter (attacked) in one report, base + a baseline (and another metric) in the other: one table, the
    columns first seen first and the attack's last, base's shared numbers once, counts as whole numbers."""
    nudity, clip, q16 = _Protocol(preset="i2p", threshold=0.6), _Protocol(model="ViT-L-14"), _Protocol(sha256="ab")
    first = _benchmark_report(
        tmp_path,
        {
            "base": {"nudity/rate": 0.4, "nudity/n": 20.0, "clip/clip_score": 31.25},
            "grpo-nudity": {"nudity/rate": 0.05, "nudity/n": 20.0, "clip/clip_score": 30.5},
        },
        {"nudity": nudity, "clip": clip},
        attack={
            "base": {"attack_success_rate": _metric(0.9), "clean_rate": _metric(0.4)},
            "grpo-nudity": {"attack_success_rate": _metric(0.35), "clean_rate": _metric(0.05)},
        },
        adapter=["runs/grpo-nudity"],
    )
    second = _benchmark_report(
        tmp_path,
        {
            "base": {"nudity/rate": 0.4, "nudity/n": 20.0, "q16/rate": 0.3},
            "sld": {"nudity/rate": 0.1, "nudity/n": 20.0, "q16/rate": float("nan")},
        },
        {"nudity": nudity, "q16": q16},
        baselines=["sld"],
    )
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "report.json").write_text(json.dumps(first))  # a benchmark's output folder
    (tmp_path / "sld.json").write_text(json.dumps(second))  # NaN as json.dumps writes it
    out = tmp_path / "table"
    assert main(["compare", str(tmp_path / "bench"), str(tmp_path / "sld.json"), "--output_dir", str(out)]) == 0
    expected = (
        "| model | nudity/rate | nudity/n | clip/clip_score | q16/rate | attack_success_rate | attack_clean_rate |\n"
        "|---|---|---|---|---|---|---|\n"
        "| base | 0.400 | 20 | 31.250 | 0.300 | 0.900 | 0.400 |\n"
        "| grpo-nudity | 0.050 | 20 | 30.500 | n/a | 0.350 | 0.050 |\n"
        "| sld | 0.100 | 20 | n/a | n/a | n/a | n/a |\n"
    )
    printed = capsys.readouterr().out
    assert printed.startswith(expected) and (out / "compare.md").read_text() == expected
    saved = json.loads((out / "compare.json").read_text())
    assert saved["columns"] == [
        "nudity/rate", "nudity/n", "clip/clip_score", "q16/rate", "attack_success_rate", "attack_clean_rate"
    ]  # fmt: skip
    assert saved["models"]["base"] == {
        "sources": [str(tmp_path / "bench" / "report.json"), str(tmp_path / "sld.json")],
        "nudity/rate": 0.4,
        "nudity/n": 20.0,
        "clip/clip_score": 31.25,
        "attack_success_rate": 0.9,
        "attack_clean_rate": 0.4,
        "q16/rate": 0.3,
    }
    assert saved["models"]["sld"]["q16/rate"] is None and "concept" not in saved
    protocol = saved["protocol"]
    assert protocol["metrics"] == {"nudity": nudity.protocol(), "clip": clip.protocol(), "q16": q16.protocol()}
    assert protocol["seeds"] == [1, 2] and protocol["num_prompts"] == 3 and protocol["attack"] == {"epsilon": 0.1}
    assert protocol["baselines"]["sld"]["sld_preset"] == "medium" and protocol["adapters"] == ["runs/grpo-nudity"]
