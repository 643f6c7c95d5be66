from rl_safety.config_reference import BEGIN, END, reference
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_configuration_reference_in_sync():
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == reference(), "run `python -m rl_safety.config_reference` and paste it into README.md"


def test_first_lines_are_the_two_commands():
    lines = README.splitlines()
    assert lines[0] == "```bash" and lines[3] == "```"
    assert lines[1].startswith("pip install -e . && ") and "rl-safety train --config recipes/" in lines[1]
    assert lines[2].startswith('pip install -e ".[test') and " && python -m pytest" in lines[2]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert "grep -m1 -E '^pip install -e \"\\.\\[test' README.md" in ci
