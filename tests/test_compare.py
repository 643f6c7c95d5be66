"""`rl-safety compare`: rows by model across evaluation and attack reports, markdown + JSON, one-line errors."""

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
