"""`rl-safety push` and `push_to_hub: true`: huggingface_hub's real client against a local server playing the Hub."""

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rl_safety.cli import main as cli
from rl_safety.hub import HUB_UPLOAD_DIR, stage_upload
from rl_safety.pipelines import LORA_WEIGHT_NAME
from rl_safety.train import main as train
from tests.conftest import recipe_args

pytest.importorskip("pytest_httpserver")
from werkzeug import Response  # noqa: E402  (pytest-httpserver's server)

REPO_ID = "someone/erase-red"
REPORT = {
    "target_concept": "red",
    "models": {
        "base": {"target_rate": {"value": 0.875, "n": 8}, "clip_score": {"value": 21.5, "n": 8}},
        "run": {"target_rate": {"value": 0.125, "n": 8}, "clip_score": {"value": 20.25, "n": 8}},
    },
}


@pytest.fixture(scope="module")
def trained_run(tiny_sd_path, tmp_path_factory) -> Path:
    """A one-step run with a (fake) evaluation report and its HTML and images, as `rl-safety train` leaves them."""
    root = tmp_path_factory.mktemp("hub")
    prompts = root / "prompts.txt"
    prompts.write_text("# tag: safe\na red circle\na blue square\n")
    out = root / "run"
    assert train(recipe_args(tiny_sd_path, prompts, out, max_steps=1)) == 0
    (out / "eval/images").mkdir(parents=True)
    (out / "eval/report.json").write_text(json.dumps(REPORT, indent=2) + "\n")
    (out / "eval/report.html").write_text("<html><img src='images/run_unsafe.png'></html>\n")
    (out / "eval/images/run_unsafe.png").write_bytes(b"\x89PNG fake")
    return out


@pytest.fixture
def run_dir(trained_run, tmp_path) -> Path:
    """A private copy of the run (same folder name), so a test may change it."""
    return Path(shutil.copytree(trained_run, tmp_path / trained_run.name))


def tree_hash(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*"))
    }


class FakeHub:
    """The endpoints `HfApi.create_repo` and `upload_folder` call; every file answers "regular", so its bytes come
    inline (base64) in the NDJSON commit."""

    def __init__(self, server, fail: dict[str, int] | None = None):
        self.server, self.fail = server, fail or {}
        self.created: list[dict] = []
        self.commits: list[dict[str, bytes]] = []
        self.headers: list[dict] = []
        base = f"/api/models/{REPO_ID}"
        server.expect_request("/api/repos/create", method="POST").respond_with_handler(self.create)
        server.expect_request("/api/validate-yaml", method="POST").respond_with_json({"errors": [], "warnings": []})
        server.expect_request(f"{base}/preupload/main", method="POST").respond_with_handler(self.preupload)
        server.expect_request(f"{base}/commit/main", method="POST").respond_with_handler(self.commit)
        server.expect_request(f"{base}", method="GET").respond_with_handler(self.repo_info)

    def _failure(self, name):
        status = self.fail.get(name)
        if status is None:
            return None
        return Response(json.dumps({"error": "Invalid credentials in Authorization header"}), status=status)

    def create(self, request):
        self.headers.append(dict(request.headers))
        failure = self._failure("create")
        if failure is not None:
            return failure
        self.created.append(request.get_json())
        return Response(json.dumps({"url": self.server.url_for(f"/{REPO_ID}"), "name": REPO_ID, "id": "1"}))

    def repo_info(self, request):  # create_repo(exist_ok=True) asks after a 401/403, to see if the repo exists
        return self._failure("create") or Response(json.dumps({"id": REPO_ID, "sha": "0" * 40}))

    def preupload(self, request):
        failure = self._failure("preupload")
        if failure is not None:
            return failure
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in request.get_json()["files"]
        ]
        return Response(json.dumps({"files": files, "commitOid": "0" * 40}))

    def commit(self, request):
        failure = self._failure("commit")
        if failure is not None:
            return failure
        lines = [json.loads(line) for line in request.get_data().splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        assert all(line["key"] == "file" and line["value"]["encoding"] == "base64" for line in lines[1:])
        self.commits.append({line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]})
        url = self.server.url_for(f"/{REPO_ID}/commit/{'1' * 40}")
        return Response(json.dumps({"commitUrl": url, "commitOid": "1" * 40}))


@pytest.fixture
def hub(httpserver, monkeypatch):
    """A fake Hub at HF_ENDPOINT, online (the suite runs with HF_HUB_OFFLINE=1) and with a token."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def make(**fail):
        return FakeHub(httpserver, fail)

    yield make
    httpserver.check_assertions()  # no request reached an endpoint the fake Hub does not serve


def run(capsys, argv):
    code = cli(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


EXPECTED_FILES = {
    LORA_WEIGHT_NAME,
    "README.md",
    "config.yaml",
    "eval/report.json",
    "eval/report.html",
    "eval/images/run_unsafe.png",
}


def check_card(card: str, base: Path) -> None:
    assert f'from_pretrained("{base}")' in card and f'pipe.load_lora_weights("{REPO_ID}")' in card
    for tag in ("rl_safety", "grpo", "lora", "diffusers", "stable-diffusion", "text-to-image"):
        assert f"- {tag}\n" in card
    assert "| metric | base | adapter |" in card  # the run's folder name is the adapter's column in report.json
    assert "| `target_rate` | 0.875 | 0.125 |" in card and "| `clip_score` | 21.500 | 20.250 |" in card
    assert "jpeg_incompressibility" in card and "max_steps: 1" in card and "DiffusionGRPOTrainer" in card


def test_push_uploads_the_run(hub, run_dir, tiny_sd_path, capsys):
    fake = hub()
    before = tree_hash(run_dir)
    code, out, err = run(capsys, ["push", str(run_dir), "--repo-id", REPO_ID, "--private"])
    assert code == 0, err
    assert out.splitlines()[-1].endswith(f"/{REPO_ID}")
    assert fake.created == [{"name": "erase-red", "organization": "someone", "visibility": "private"}]
    assert fake.headers[0]["Authorization"] == "Bearer hf_test_token"
    (files,) = fake.commits
    assert set(files) == EXPECTED_FILES
    assert files[LORA_WEIGHT_NAME] == (run_dir / LORA_WEIGHT_NAME).read_bytes()
    assert files["config.yaml"] == (run_dir / "config.yaml").read_bytes()
    assert json.loads(files["eval/report.json"]) == REPORT
    check_card(files["README.md"].decode(), tiny_sd_path)
    assert tree_hash(run_dir) == before  # the run folder is untouched


def test_dry_run_folder_is_the_upload_and_reproduces_the_images(run_dir, tiny_sd_path, capsys):
    code, out, err = run(capsys, ["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run"])
    assert code == 0, err
    staged = Path(out.strip().splitlines()[-1])
    assert staged == run_dir / HUB_UPLOAD_DIR
    assert {str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()} == EXPECTED_FILES
    check_card((staged / "README.md").read_text(), tiny_sd_path)
    assert (
        stage_upload(run_dir, run_dir.parent / "again", REPO_ID).joinpath("README.md").read_bytes()
        == (staged / "README.md").read_bytes()
    )  # the dry run shows exactly what a push stages

    def images(adapter_dir):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        if adapter_dir is not None:
            pipe.load_lora_weights(adapter_dir)
        generator = torch.Generator().manual_seed(0)
        return pipe(["a red circle"], num_inference_steps=3, generator=generator, output_type="pt").images

    from_run, from_upload = images(run_dir), images(staged)
    torch.testing.assert_close(from_upload, from_run, rtol=0, atol=0)
    assert not torch.equal(from_run, images(None))  # the adapter changes the images, so the match means something


@pytest.mark.parametrize(
    "fail, expected",
    [
        ({"create": 401}, "push failed (401 Unauthorized"),
        ({"create": 500}, "push failed (500 Internal Server Error"),
        ({"commit": 403}, "push failed (403 Forbidden"),
    ],
)
def test_failed_push_is_one_line_and_leaves_the_run(hub, run_dir, capsys, fail, expected):
    hub(**fail)
    before = tree_hash(run_dir)
    code, out, err = run(capsys, ["push", str(run_dir), "--repo-id", REPO_ID])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("rl-safety push: error: ") and expected in err
    assert f"then rerun `rl-safety push {run_dir} --repo-id {REPO_ID}`" in err
    if 401 in fail.values():
        assert "hf auth login" in err and "--token" in err
    assert tree_hash(run_dir) == before


def test_unreachable_hub_and_missing_token(run_dir, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    before = tree_hash(run_dir)
    code, _, err = run(capsys, ["push", str(run_dir), "--repo-id", REPO_ID])
    assert code == 2 and len(err.splitlines()) == 1 and "cannot reach http://127.0.0.1:9" in err
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(run_dir / "no-token"))
    code, _, err = run(capsys, ["push", str(run_dir), "--repo-id", REPO_ID])
    assert code == 2 and "push needs a Hugging Face token: log in with `hf auth login`" in err
    assert tree_hash(run_dir) == before


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["push", str(run_dir), "--repo-id", "no-namespace"], "--repo-id='no-namespace': expected user/name"),
        (["push", str(run_dir), "--repo-id", "a/b/c"], "--repo-id='a/b/c': expected user/name"),
        (["push", str(tmp_path / "nope"), "--repo-id", REPO_ID], "no such folder"),
        (["push", str(tmp_path / "empty"), "--repo-id", REPO_ID], f"holds no {LORA_WEIGHT_NAME} (the adapter)"),
        (["push", str(run_dir)], "the following arguments are required: --repo-id"),
    ]
    for argv, expected in cases:
        code, out, err = run(capsys, argv)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert expected in err, (argv, err)
    assert not (tmp_path / "empty" / HUB_UPLOAD_DIR).exists()


def test_push_to_hub_recipe_pushes_once_at_the_end(hub, tiny_sd_path, prompt_file, tmp_path, capsys):
    fake = hub()
    out = tmp_path / "pushed"
    # save_steps=1: transformers.Trainer would push at that checkpoint and on save_model; only the final push may run
    argv = recipe_args(tiny_sd_path, prompt_file, out, max_steps=1, save_steps=1)
    assert train([*argv, "--push_to_hub", "true", "--hub_model_id", REPO_ID]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"pushed to {fake.server.url_for('/' + REPO_ID)}")
    assert len(fake.created) == 1 and len(fake.commits) == 1
    files = fake.commits[0]
    assert set(files) == {LORA_WEIGHT_NAME, "README.md", "config.yaml"}
    assert files[LORA_WEIGHT_NAME] == (out / LORA_WEIGHT_NAME).read_bytes()
    assert f'pipe.load_lora_weights("{REPO_ID}")' in files["README.md"].decode()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--push_to_hub", "true"], "push_to_hub=True: needs hub_model_id"),
        (["--push_to_hub", "true", "--hub_model_id", "bad id"], "hub_model_id='bad id': expected user/name"),
    ],
)
def test_push_to_hub_without_repo_fails_before_training(tiny_sd_path, prompt_file, tmp_path, capsys, extra, expected):
    out = tmp_path / "never"
    code = cli(["train", *recipe_args(tiny_sd_path, prompt_file, out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err
    assert not out.exists()
