"""`rl-safety push` on bad input: exit status 2, one line naming the field or file, nothing written, nothing uploaded.

Each case breaks one thing in a run folder that pushes cleanly (checked first), then runs the real entry point twice:
with --dry-run (nothing may appear in the folder) and as an upload through a recording stand-in for `HfApi` (no
call may reach it: every check comes before the first request). No test reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import rl_safety.hub
from rl_safety.cli import main
from rl_safety.hub import HUB_UPLOAD_DIR
from rl_safety.outputs import model_card
from rl_safety.pipelines import LORA_WEIGHT_NAME

from .conftest import REPO

REPO_ID = "someone/erase-red"
PREFIX = "rl-safety push: error: "
CONFIG = {
    "pretrained_model_name_or_path": "someone/tiny-sd",
    "trainer": "grpo",
    "rewards": [{"name": "jpeg_incompressibility", "weight": 1.0}],
    "max_steps": 1,
}
REPORT = {
    "target_concept": "red",
    "settings": {},
    "models": {"base": {"target_rate": {"value": 0.875, "n": 8}}, "run": {"target_rate": {"value": 0.125, "n": 8}}},
}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """What `rl-safety train` leaves (a stand-in adapter: push reads its header, not its weights), evaluated."""
    run = tmp_path_factory.mktemp("push") / "run"
    (run / "eval/images").mkdir(parents=True)
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(run / LORA_WEIGHT_NAME))
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 1, "train_runtime": 2.0}\n')
    (run / "eval/report.json").write_text(json.dumps(REPORT))
    (run / "eval/report.html").write_text("<html></html>\n")
    (run / "eval/images/run.png").write_bytes(b"\x89PNG fake")
    return run


@pytest.fixture
def run_dir(good_run, tmp_path) -> Path:
    return Path(shutil.copytree(good_run, tmp_path / "run"))


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records every call, sends nothing."""

    calls: list[tuple] = []

    def __init__(self, **kwargs):
        self.calls.append(("HfApi", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No socket may connect; `HfApi` records instead of uploading; a token is set, so upload mode gets past it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test reached for the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(rl_safety.hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` (hidden ones too) with its content's hash: what a failed push may not change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_the_good_run_dry_runs_and_uploads(run_dir, capsys):
    """The baseline every case breaks: it passes, so each failure below comes from the one thing a case changes."""
    code, out, err = run_cli(capsys, ["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run"])
    assert code == 0, err
    staged = run_dir / HUB_UPLOAD_DIR
    assert out.strip().splitlines()[-1] == str(staged)
    names = {str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()}
    assert names == {LORA_WEIGHT_NAME, "README.md", "config.yaml", "eval/report.json", "eval/report.html"} | {
        "eval/images/run.png"
    }
    assert (
        "| metric | base | adapter |\n|---|---|---|\n| `target_rate` | 0.875 | 0.125 |"
        in (staged / "README.md").read_text()
    )
    (staged / "README.md").write_text("stale")
    assert run_cli(capsys, ["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run", "--overwrite"])[0] == 0
    assert (staged / "README.md").read_text() != "stale"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no staging folder left beside it
    assert RecordingHfApi.calls == []  # a dry run never builds a client

    shutil.rmtree(staged)
    code, out, err = run_cli(capsys, ["push", str(run_dir), "--repo-id", REPO_ID, "--private"])
    assert code == 0, err
    assert [call[0] for call in RecordingHfApi.calls] == ["HfApi", "create_repo", "upload_folder"]
    assert RecordingHfApi.calls[-1][2] == sorted(names)


def write(relative: str, content: str | bytes | None):
    """A case's setup: replace `relative` in the run folder with `content` (None: a folder)."""

    def setup(run: Path, monkeypatch) -> None:
        path = run / relative
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def remove(relative: str):
    def setup(run: Path, monkeypatch) -> None:
        (run / relative).unlink()

    return setup


def config(**changes):
    return write("config.yaml", yaml.safe_dump({k: v for k, v in {**CONFIG, **changes}.items() if v != "DROP"}))


def report(value):
    return write("eval/report.json", json.dumps(value))


def no_lora_tensors(run: Path, monkeypatch) -> None:
    save_file({"conv.weight": torch.zeros(2)}, str(run / LORA_WEIGHT_NAME))


def no_token(run: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(run.parent / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(run.parent / "no-tokens"))


def symlink_upload(run: Path, monkeypatch) -> None:
    (run / HUB_UPLOAD_DIR).symlink_to(run / "eval")


DRY, UPLOAD = "dry-run", "upload"
BOTH = (DRY, UPLOAD)
RUN = "RUN"  # in argv: the run folder
DEFAULT = [RUN, "--repo-id", REPO_ID]
A_RUN = "push a folder written by `rl-safety train`"
NOT_DRY_RUN_FOLDER = "hub_upload': not a folder written by --dry-run; move it away"

# (id, argv with RUN for the run folder, setup, expected text in the message, modes)
CASES = [
    # the run folder
    ("missing-folder", ["RUN/missing", "--repo-id", REPO_ID], None, "OUTPUT_DIR='RUN/missing': no such folder", BOTH),
    ("file-not-folder", ["RUN/config.yaml", "--repo-id", REPO_ID], None, "a file, not a run folder", BOTH),
    ("empty-output-dir", ["", "--repo-id", REPO_ID], None, f"OUTPUT_DIR='': empty; {A_RUN}", BOTH),
    ("no-adapter", DEFAULT, remove(LORA_WEIGHT_NAME), f"holds no {LORA_WEIGHT_NAME} (the adapter)", BOTH),
    ("adapter-is-a-folder", DEFAULT, write(LORA_WEIGHT_NAME, None), f"holds no {LORA_WEIGHT_NAME}", BOTH),
    ("adapter-truncated", DEFAULT, write(LORA_WEIGHT_NAME, b"\x10\0\0\0\0\0\0\0{}"), "not a readable", BOTH),
    ("adapter-empty", DEFAULT, write(LORA_WEIGHT_NAME, b""), "is not a readable safetensors file", BOTH),
    ("adapter-text", DEFAULT, write(LORA_WEIGHT_NAME, "weights"), "is not a readable safetensors file", BOTH),
    ("adapter-not-lora", DEFAULT, no_lora_tensors, "holds no LoRA tensors (keys such as ['conv.weight'])", BOTH),
    # config.yaml
    ("no-config", DEFAULT, remove("config.yaml"), "holds no config.yaml (the resolved recipe)", BOTH),
    ("config-not-yaml", DEFAULT, write("config.yaml", "a: [1,\n"), "config.yaml': does not parse as YAML (line", BOTH),
    ("config-tab", DEFAULT, write("config.yaml", "a:\n\t- 1\n"), "config.yaml': does not parse as YAML", BOTH),
    ("config-python-tag", DEFAULT, write("config.yaml", "a: !!python/name:os.system\n"), "could not determine", BOTH),
    ("config-list", DEFAULT, write("config.yaml", "- 1\n- 2\n"), "expected the resolved recipe (field: value", BOTH),
    ("config-empty", DEFAULT, write("config.yaml", ""), "(field: value lines), got None", BOTH),
    ("config-number-keys", DEFAULT, write("config.yaml", "1: a\n"), "expected the resolved recipe", BOTH),
    ("config-binary", DEFAULT, write("config.yaml", b"\xff\xfe\x00"), "config.yaml': not UTF-8 text", BOTH),
    ("config-folder", DEFAULT, write("config.yaml", None), "holds no config.yaml", BOTH),
    ("config-no-base-model", DEFAULT, config(pretrained_model_name_or_path="DROP"), "or_path=None; expected", BOTH),
    ("config-base-model-list", DEFAULT, config(pretrained_model_name_or_path=["a"]), "or_path=['a']; expected", BOTH),
    ("config-unknown-trainer", DEFAULT, config(trainer="dpo"), "trainer='dpo'; expected one of grpo, refl, esd", BOTH),
    ("config-trainer-list", DEFAULT, config(trainer=["grpo"]), "trainer=['grpo']; expected one of", BOTH),
    ("config-rewards-number", DEFAULT, config(rewards=3), "rewards=3; expected a list of {name: ...", BOTH),
    ("config-reward-no-name", DEFAULT, config(rewards=[{"weight": 1}]), "rewards=[{'weight': 1}]; expected", BOTH),
    ("config-reward-string", DEFAULT, config(rewards=["jpeg"]), "rewards=['jpeg']; expected", BOTH),
    # metrics.jsonl
    ("metrics-torn", DEFAULT, write("metrics.jsonl", '{"step": 1}\n{"step'), "jsonl' line 2: not a JSON", BOTH),
    ("metrics-list", DEFAULT, write("metrics.jsonl", "[1, 2]\n"), "line 1: not a JSON object (got [1, 2])", BOTH),
    ("metrics-binary", DEFAULT, write("metrics.jsonl", b"\xff\xfe"), "metrics.jsonl': not UTF-8 text", BOTH),
    # eval/report.json
    ("report-not-json", DEFAULT, write("eval/report.json", "{oops"), "report.json': not valid JSON (Expecting", BOTH),
    ("report-list", DEFAULT, report([1]), "report.json': not an evaluation report (expected {models:", BOTH),
    ("report-no-models", DEFAULT, report({"runs": []}), "not an evaluation report", BOTH),
    ("report-models-list", DEFAULT, report({"models": [1]}), "got {'models': [1]}", BOTH),
    ("report-model-number", DEFAULT, report({"models": {"base": 3}}), "got {'models': {'base': 3}}", BOTH),
    ("report-folder", DEFAULT, write("eval/report.json", None), "report.json': not a file", BOTH),
    ("report-binary", DEFAULT, write("eval/report.json", b"\x89PNG\xff"), "report.json': not UTF-8 text", BOTH),
    # --repo-id
    ("repo-three-parts", [RUN, "--repo-id", "a/b/c"], None, "--repo-id='a/b/c': expected user/name", BOTH),
    ("repo-empty", [RUN, "--repo-id", ""], None, "--repo-id='': expected user/name", BOTH),
    ("repo-spaces", [RUN, "--repo-id", "some one/erase"], None, "--repo-id='some one/erase': expected", BOTH),
    ("repo-too-long", [RUN, "--repo-id", "a/" + "x" * 97], None, "each part 1-96 letters", BOTH),
    ("repo-no-namespace", [RUN, "--repo-id", "erase-red"], None, "--repo-id='erase-red': expected user/name", BOTH),
    ("repo-double-dash", [RUN, "--repo-id", "a/b--c"], None, "no '--' or '..'", BOTH),
    ("repo-dot-git", [RUN, "--repo-id", "a/b.git"], None, "not ending in '.git'", BOTH),
    ("repo-ends-with-dot", [RUN, "--repo-id", "a/b."], None, "not starting or ending with '-' or '.'", BOTH),
    ("repo-non-ascii", [RUN, "--repo-id", "jörg/model"], None, "--repo-id='jörg/model': expected", BOTH),
    ("repo-starts-with-dash", [RUN, "--repo-id=-a/b"], None, "--repo-id='-a/b': expected", BOTH),
    ("repo-missing", [RUN], None, "the following arguments are required: --repo-id", BOTH),
    ("repo-no-value", [RUN, "--repo-id"], None, "argument --repo-id/--repo_id: expected one argument", BOTH),
    # flags
    ("private-with-value", [*DEFAULT, "--private=yes"], None, "--private takes no value (got '--private=yes')", BOTH),
    ("dry-run-with-value", [*DEFAULT, "--dry-run=false"], None, "--dry-run takes no value", BOTH),
    ("private-false", [*DEFAULT, "--private", "false"], None, "unexpected argument 'false': push takes one", BOTH),
    ("two-run-folders", [*DEFAULT, "RUN/eval"], None, "unexpected argument 'RUN/eval'", BOTH),
    ("unknown-flag", [*DEFAULT, "--privte"], None, "unknown argument '--privte'; did you mean '--private'?", BOTH),
    ("unknown-flag-value", [*DEFAULT, "--branch=dev"], None, "unknown argument '--branch' (valid: --repo-id,", BOTH),
    ("no-output-dir", ["--repo-id", REPO_ID], None, "the following arguments are required: output_dir", BOTH),
    ("token-empty", [*DEFAULT, "--token", ""], None, "--token: empty or holds whitespace", BOTH),
    ("token-spaces", [*DEFAULT, "--token", "hf_abc def"], None, "--token: empty or holds whitespace", BOTH),
    # outputs
    ("hub-upload-exists", DEFAULT, write("hub_upload/README.md", "mine"), "hub_upload' exists (from an", (DRY,)),
    ("hub-upload-is-a-file", [*DEFAULT, "--overwrite"], write(HUB_UPLOAD_DIR, "mine"), NOT_DRY_RUN_FOLDER, (DRY,)),
    ("hub-upload-is-a-link", [*DEFAULT, "--overwrite"], symlink_upload, NOT_DRY_RUN_FOLDER, (DRY,)),
    ("no-token", DEFAULT, no_token, "push needs a Hugging Face token: log in with `hf auth login`", (UPLOAD,)),
]  # fmt: skip
PARAMS = [
    pytest.param(argv, setup, expected, mode, id=f"{name}-{mode}")
    for name, argv, setup, expected, modes in CASES
    for mode in modes
]


@pytest.mark.parametrize("argv, setup, expected, mode", PARAMS)
def test_bad_push_input_is_one_line_and_changes_nothing(run_dir, capsys, monkeypatch, argv, setup, expected, mode):
    if setup is not None:
        setup(run_dir, monkeypatch)
    before = tree(run_dir.parent)
    argv = [arg.replace(RUN, str(run_dir)) for arg in argv] + (["--dry-run"] if mode == DRY else [])
    code, out, err = run_cli(capsys, ["push", *argv])
    assert code == 2, (out, err)
    assert err.startswith(PREFIX) and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected.replace(RUN, str(run_dir)) in err, err
    assert "hf_abc" not in err  # a token is never echoed
    assert tree(run_dir.parent) == before  # no hub_upload/, no staging folder, nothing changed
    assert RecordingHfApi.calls == []  # nothing uploaded, no repository created, not even a client built


def test_a_dry_run_that_fails_while_copying_leaves_the_previous_folder(run_dir, capsys, monkeypatch):
    """An error in the middle of staging (disk full): no half folder, and the earlier hub_upload/ is kept."""
    assert main(["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run"]) == 0
    before = tree(run_dir.parent)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", disk_full)
    code, _, err = run_cli(capsys, ["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run", "--overwrite"])
    assert code == 2 and err.startswith(PREFIX + "--dry-run: cannot write") and "No space left" in err, err
    assert tree(run_dir.parent) == before


@pytest.mark.parametrize(
    "base, metadata",
    [("CompVis/stable-diffusion-v1-4", True), ("gpt2", True), ("runs/toyworld/pipeline", False), ("/abs/m", False)],
)
def test_card_names_a_base_model_only_when_the_hub_accepts_it(base, metadata):
    """The Hub refuses a card whose base_model is no model id (the upload would fail after the repo is created)."""
    card = model_card(base, {}, [], {})
    assert (f"base_model: {base}" in card) == metadata
    assert f'from_pretrained("{base}")' in card


def test_console_script_reports_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rl_safety.cli", "push", str(tmp_path / "nope"), "--repo-id", REPO_ID, "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{PREFIX}OUTPUT_DIR={str(tmp_path / 'nope')!r}: no such folder"
    assert list(tmp_path.iterdir()) == []
