import importlib.util
import json

from tests.conftest import REPO


def test_grpo_step_benchmark_reports_split_and_ratio(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("grpo_step", REPO / "benchmarks" / "grpo_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--model",
            "tiny",
            "--iterations",
            "2",
            "--batch",
            "4",
            "--num_generations",
            "2",
            "--steps",
            "3",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    parts = result["sampling_s"] + result["reward_s"] + result["update_s"] + result["other_s"]
    assert abs(parts - result["iteration_s"]) < 1e-9
    assert result["bare_unet_s"] > 0 and result["overhead_ratio"] > 0
    assert result["num_train_timesteps"] == 3
    assert "overhead_ratio" in capsys.readouterr().out
