"""Publishing a run to the Hugging Face Hub.

rl-safety push OUTPUT_DIR --repo-id user/name [--private] [--dry-run [--overwrite]] [--token TOKEN]

`stage_upload` builds the folder that is uploaded (copies only: the run folder is never changed): the adapter in
diffusers format, a model card regenerated from the run (with the evaluation table when `eval/report.json` exists),
the resolved recipe and the evaluation report. `push` validates, stages and uploads it with `huggingface_hub`; recipes
with `push_to_hub: true` and `hub_model_id` reach the same `push` at the end of `rl-safety train`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import MISSING, dataclass, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub import errors as hub_errors

from .command import ArgumentParser, first_line, run_command
from .outputs import CONFIG_NAME, METRICS_NAME, _plain, model_card
from .pipelines import LORA_WEIGHT_NAME, lora_file_problem
from .recipe_parser import ConfigError

HUB_UPLOAD_DIR = "hub_upload"  # where --dry-run writes the folder, inside OUTPUT_DIR
EVAL_FILES = ("eval/report.json", "eval/report.html")
# The Hub's rules (huggingface_hub's validate_repo_id), ASCII only: each part 1-96 characters, not starting or ending
# with '-' or '.'; and a namespace, always: a name alone would land in the token owner's namespace.
REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"^{REPO_PART}/{REPO_PART}$")
# What an upload can fail with: HTTP status errors (HfHubHTTPError is also an OSError), the HTTP library's transport
# errors (huggingface_hub's `errors.HTTPError` is httpx's or httpx2's base class, whichever that release uses), file
# errors and the client's own checks (ValueError, e.g. card metadata the server refuses).
UPLOAD_ERRORS = (OSError, ValueError, hub_errors.HTTPError)
FROM_TRAIN = "push a folder written by `rl-safety train`"


def check_repo_id(repo_id: str | None, flag: str = "--repo-id") -> str:
    """`user/name` (or `org/name`) with the Hub's characters; anything else is a one-line `ConfigError`."""
    value = (repo_id or "").strip()
    if not REPO_ID.match(value) or "--" in value or ".." in value or value.endswith(".git"):
        raise ConfigError(
            f"{flag}={repo_id!r}: expected user/name (or org/name): each part 1-96 letters, digits, '-', '_' or '.', "
            "not starting or ending with '-' or '.', no '--' or '..', not ending in '.git'"
        )
    return value


def check_token(token: str | None) -> None:
    """An explicit token is one word; its value is never printed (it is a secret)."""
    if token is not None and (not token.strip() or any(char.isspace() for char in token)):
        raise ConfigError(
            "--token: empty or holds whitespace; pass the token itself (hf_...), or leave --token out to use "
            "HF_TOKEN or the `hf auth login` token"
        )


def check_run(output_dir: str | Path) -> Path:
    """The run folder, if it holds what a push needs: a readable adapter and the resolved recipe."""
    name = str(output_dir)
    if not name.strip():
        raise ConfigError(f"OUTPUT_DIR={name!r}: empty; {FROM_TRAIN}")
    path = Path(output_dir)
    if not path.exists():
        raise ConfigError(f"OUTPUT_DIR={name!r}: no such folder")
    if not path.is_dir():
        raise ConfigError(f"OUTPUT_DIR={name!r}: a file, not a run folder; {FROM_TRAIN}")
    for file, what in ((LORA_WEIGHT_NAME, "adapter"), (CONFIG_NAME, "resolved recipe")):
        if not (path / file).is_file():
            raise ConfigError(f"OUTPUT_DIR={name!r} holds no {file} (the {what}); {FROM_TRAIN}")
    problem = lora_file_problem(path)
    if problem:
        raise ConfigError(f"OUTPUT_DIR={name!r}: {problem}; {FROM_TRAIN}")
    return path


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{str(path)!r}: not UTF-8 text ({first_line(err)})") from err
    except OSError as err:
        raise ConfigError(f"{str(path)!r}: cannot read ({first_line(err)})") from err


def _read_config(output_dir: Path) -> dict[str, Any]:
    """config.yaml, checked for what the card uses: the base model, the trainer and the rewards."""
    from .trainers import TRAINERS

    path = output_dir / CONFIG_NAME
    try:
        config = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise ConfigError(f"{str(path)!r}: does not parse as YAML ({where}{problem})") from err
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        raise ConfigError(
            f"{str(path)!r}: expected the resolved recipe (field: value lines), got {_short(config)}; {FROM_TRAIN}"
        )
    base = config.get("pretrained_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"{str(path)!r}: pretrained_model_name_or_path={_short(base)}; expected the base model the run was "
            "trained from (a Hub id or a folder)"
        )
    trainer = config.get("trainer")
    if trainer is not None and (not isinstance(trainer, str) or trainer not in TRAINERS):
        raise ConfigError(f"{str(path)!r}: trainer={_short(trainer)}; expected one of {', '.join(TRAINERS)}")
    rewards = config.get("rewards")
    if rewards is not None and (
        not isinstance(rewards, list)
        or not all(isinstance(entry, dict) and isinstance(entry.get("name"), str) for entry in rewards)
    ):
        raise ConfigError(
            f"{str(path)!r}: rewards={_short(rewards)}; expected a list of {{name: ..., weight: ..., args: ...}}"
        )
    return config


def _field_default(field) -> Any:
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None if field.default is MISSING else field.default


# Fields that TrainingArguments / the trainer rewrite whatever the recipe says (or that only tune the machine): they
# would show up as "changed" in every card. config.yaml still holds them.
CARD_SKIP = {
    "runtime",
    "accelerator_config",
    "debug",
    "disable_tqdm",
    "logging_dir",
    "report_to",
    "gradient_checkpointing",
    "activation_checkpointing",
}


def card_recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The card's recipe: the model and prompt fields, the rewards and every trainer field the run set away from its
    default (config.yaml, uploaded beside the card, holds all of them)."""
    from .model_config import ModelArguments
    from .prompt_config import PromptArguments
    from .trainers import TRAINERS

    always = {f.name for cls in (ModelArguments, PromptArguments) for f in fields(cls)} | {"rewards", "trainer"}
    config_class = TRAINERS.get(config.get("trainer"), TRAINERS["grpo"])[0]
    defaults = {f.name: _plain(_field_default(f)) for f in fields(config_class)}
    return {
        key: value
        for key, value in config.items()
        if key in always or (key not in CARD_SKIP and not key.endswith("_token") and defaults.get(key, value) != value)
    }


def _final_metrics(output_dir: Path) -> dict[str, Any]:
    """The last record of metrics.jsonl (the training summary), as the card written by `rl-safety train` shows it."""
    path = output_dir / METRICS_NAME
    if not path.is_file():
        return {}
    lines = [(number, line) for number, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
    if not lines:
        return {}
    number, line = lines[-1]
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        record = err
    if not isinstance(record, dict):
        what = first_line(record) if isinstance(record, Exception) else f"got {_short(record)}"
        raise ConfigError(
            f"{str(path)!r} line {number}: not a JSON object ({what}); the card's final metrics are this last line: "
            "finish the run (--resume_from_checkpoint last) or delete the line"
        )
    step = record.pop("step", None)
    return {**record, "step": step} if step is not None else record


def _read_evaluation(output_dir: Path) -> dict[str, Any] | None:
    """eval/report.json, when the run was evaluated: `{"models": {name: {metric: {"value": ...}}}}`."""
    path = output_dir / EVAL_FILES[0]
    if not path.exists():
        return None
    if not path.is_file():
        raise ConfigError(f"{str(path)!r}: not a file; remove it or rerun the evaluation")
    try:
        report = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{str(path)!r}: not valid JSON ({first_line(err)}); rerun the evaluation") from err
    models = report.get("models") if isinstance(report, dict) else None
    if not isinstance(models, dict) or not all(isinstance(metrics, dict) for metrics in models.values()):
        raise ConfigError(
            f"{str(path)!r}: not an evaluation report (expected {{models: {{name: {{metric: {{value: ...}}}}}}}}, "
            f"got {_short(report)}); rerun the evaluation (`rl-safety eval`)"
        )
    return report


@dataclass
class Run:
    """A run folder's files, read and checked: everything the upload and its model card are built from."""

    path: Path
    config: dict[str, Any]
    final_metrics: dict[str, Any]
    evaluation: dict[str, Any] | None


def read_run(output_dir: str | Path) -> Run:
    """Read and check every file a push uses; any problem is a one-line `ConfigError` naming the file."""
    path = check_run(output_dir)
    return Run(path, _read_config(path), _final_metrics(path), _read_evaluation(path))


def run_card(output_dir: str | Path | Run, repo_id: str | None = None) -> str:
    """The model card of a finished run, rebuilt from its files, with the evaluation table when it was evaluated."""
    from .trainers import TRAINERS

    run = output_dir if isinstance(output_dir, Run) else read_run(output_dir)
    config = run.config
    method = config.get("trainer") or "grpo"
    return model_card(
        config["pretrained_model_name_or_path"],
        card_recipe(config),
        config.get("rewards") or [],
        run.final_metrics,
        trainer_name=TRAINERS[method][1].__name__,
        method_tag=method,
        repo_id=repo_id,
        evaluation=run.evaluation,
        adapter_name=run.path.resolve().name,
    )


def _copy_run(run: Run, staging: Path, repo_id: str | None) -> Path:
    card = run_card(run, repo_id)  # before any copy: a file the card cannot use stops the staging here
    staging.mkdir(parents=True, exist_ok=True)
    for name in (LORA_WEIGHT_NAME, CONFIG_NAME, *EVAL_FILES):
        if (run.path / name).is_file():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run.path / name, staging / name)
    if (run.path / EVAL_FILES[1]).is_file() and (run.path / "eval/images").is_dir():
        shutil.copytree(run.path / "eval/images", staging / "eval/images", dirs_exist_ok=True)
    (staging / "README.md").write_text(card, encoding="utf-8")
    return staging


def stage_upload(output_dir: str | Path, staging_dir: str | Path, repo_id: str | None = None) -> Path:
    """Build the folder to upload in `staging_dir` (created; copies only, `output_dir` is left as it is):
    the adapter, README.md (the model card, regenerated), config.yaml and, when present, eval/report.json,
    eval/report.html and its eval/images/. Returns `staging_dir`."""
    return _copy_run(read_run(output_dir), Path(staging_dir), repo_id)


def _replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing the folder there; the old one is restored if the move fails."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old)  # a folder renames onto an empty folder
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_dry_run(run: Run, repo_id: str, overwrite: bool = False) -> Path:
    """Write OUTPUT_DIR/hub_upload/, the exact folder a push would upload, in one rename; nothing else changes."""
    target = run.path / HUB_UPLOAD_DIR
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ConfigError(f"{str(target)!r} exists (from an earlier --dry-run?); pass --overwrite to replace it")
        if target.is_symlink() or not target.is_dir():
            raise ConfigError(f"{str(target)!r}: not a folder written by --dry-run; move it away and rerun")
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{HUB_UPLOAD_DIR}.", dir=run.path))
        _copy_run(run, staging, repo_id)
        _replace_folder(staging, target)
    except OSError as err:
        raise ConfigError(f"--dry-run: cannot write {str(target)!r} ({first_line(err)})") from err
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def retry_command(output_dir: str | Path, repo_id: str, private: bool = False) -> str:
    return f"rl-safety push {output_dir} --repo-id {repo_id}" + (" --private" if private else "")


def push_failure(
    err: BaseException, output_dir: str | Path, repo_id: str, private: bool, endpoint: str
) -> ConfigError:
    """One line: what failed, what to do, the command to rerun; the run folder is untouched."""
    rerun = f"then rerun `{retry_command(output_dir, repo_id, private)}` ({output_dir} is unchanged)"
    namespace = repo_id.split("/")[0]
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(err, hub_errors.OfflineModeIsEnabled):
        return ConfigError(f"push failed (HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE, {rerun}")
    if status is not None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = getattr(response, "reason_phrase", "") or ""
        server = " ".join(str(getattr(err, "server_message", "") or "").split())
        what = f"{status} {reason}".strip() + (f": {server}" if server else "")
        advice = {
            401: "log in with `hf auth login` or pass --token",
            403: f"use a token that may write to {namespace!r} (`hf auth login` or --token)",
            404: f"check the namespace {namespace!r} of --repo-id and that the token can see it",
        }.get(
            status, "the Hub is busy or failing, wait a few minutes" if status == 429 or status >= 500 else "fix that"
        )
        return ConfigError(f"push failed ({what}): {advice}, {rerun}")
    if isinstance(err, hub_errors.HTTPError):  # transport: DNS, refused connection, timeout
        first = " ".join(str(err).split()) or type(err).__name__
        return ConfigError(
            f"push failed (cannot reach {endpoint}: {first}): check the network or HF_ENDPOINT, {rerun}"
        )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ConfigError(f"push failed ({type(err).__name__}: {first}): {rerun}")


def push(
    output_dir: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    overwrite: bool = False,
) -> str:
    """Upload a run folder to the Hub model repository `repo_id` (created if needed); return the repository's URL,
    or with `dry_run` the path of OUTPUT_DIR/hub_upload/, the exact folder that would be uploaded (an existing one
    is replaced only with `overwrite`).

    Every file is read and checked before the first request: a run the card cannot be built from uploads nothing.
    `endpoint` defaults to `HF_ENDPOINT`, read now (huggingface_hub reads it once, at import). Any failure is a
    one-line `ConfigError` saying what to retry; OUTPUT_DIR is never changed except by `dry_run`'s hub_upload/."""
    repo_id = check_repo_id(repo_id)
    check_token(token)
    run = read_run(output_dir)
    output_dir = run.path
    if dry_run:
        return str(write_dry_run(run, repo_id, overwrite))
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        token = token or get_token()
    except UPLOAD_ERRORS as err:  # e.g. an OIDC token exchange (HF_OIDC_RESOURCE) that failed
        raise push_failure(err, output_dir, repo_id, private, endpoint) from err
    if not token:
        raise ConfigError(
            f"push needs a Hugging Face token: log in with `hf auth login`, set HF_TOKEN or pass --token, then run "
            f"`{retry_command(output_dir, repo_id, private)}`"
        )
    with tempfile.TemporaryDirectory(prefix="rl-safety-hub-") as tmp:
        try:
            folder = _copy_run(run, Path(tmp) / "upload", repo_id)
        except OSError as err:
            raise ConfigError(
                f"push: cannot stage the upload in {tmp} ({first_line(err)}); free space or set TMPDIR"
            ) from err
        api = HfApi(endpoint=endpoint, token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload LoRA adapter trained with rl_safety ({output_dir.name})",
            )
        except UPLOAD_ERRORS as err:
            raise push_failure(err, output_dir, repo_id, private, endpoint) from err
    return str(url)


def main(argv: list[str] | None = None) -> int:
    """`rl-safety push OUTPUT_DIR --repo-id user/name [--private] [--dry-run [--overwrite]] [--token TOKEN]`."""
    parser = ArgumentParser(
        prog="rl-safety push",
        description="Upload a run (adapter, model card, resolved recipe, evaluation report) to the Hugging Face Hub.",
    )
    parser.add_argument("output_dir", help="the run folder written by `rl-safety train`")
    parser.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="user/name of the model repo")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--dry-run", "--dry_run", dest="dry_run", action="store_true", help="write OUTPUT_DIR/hub_upload/ only"
    )
    parser.add_argument("--overwrite", action="store_true", help="let --dry-run replace an existing hub_upload/")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    args = parser.parse_args_strictly(
        argv, stray="push takes one OUTPUT_DIR, and --private, --dry-run and --overwrite take no value"
    )
    result = push(
        args.output_dir, args.repo_id, args.private, args.dry_run, token=args.token, overwrite=args.overwrite
    )
    if not args.dry_run:
        print(f"pushed {args.output_dir} to {result}")
    print(result)  # the last line: the repository URL, or the dry-run folder
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety push`: bad input or a failed upload is one line on stderr and exit status 2."""
    return run_command("rl-safety push", main, argv)
