"""Publishing a run to the Hugging Face Hub.

rl-safety push OUTPUT_DIR --repo-id user/name [--private] [--dry-run] [--token TOKEN]

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
from dataclasses import MISSING, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub import errors as hub_errors

from .command import ArgumentParser, run_command
from .outputs import CONFIG_NAME, METRICS_NAME, _plain, model_card
from .pipelines import LORA_WEIGHT_NAME
from .recipe_parser import ConfigError

HUB_UPLOAD_DIR = "hub_upload"  # where --dry-run writes the folder, inside OUTPUT_DIR
EVAL_FILES = ("eval/report.json", "eval/report.html")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What an upload can fail with: HTTP status errors (HfHubHTTPError is also an OSError), the HTTP library's transport
# errors (huggingface_hub's `errors.HTTPError` is httpx's or httpx2's base class, whichever that release uses), file
# errors and the client's own checks (ValueError, e.g. card metadata the server refuses).
UPLOAD_ERRORS = (OSError, ValueError, hub_errors.HTTPError)


def check_repo_id(repo_id: str | None, flag: str = "--repo-id") -> str:
    """`user/name` (or `org/name`) with the Hub's characters; anything else is a one-line `ConfigError`."""
    value = (repo_id or "").strip()
    if not REPO_ID.match(value) or "--" in value or ".." in value or len(value.split("/")[1]) > 96:
        raise ConfigError(
            f"{flag}={repo_id!r}: expected user/name (or org/name): letters, digits, '-', '_', '.', no '--' or '..'"
        )
    return value


def check_run(output_dir: str | Path) -> Path:
    """The run folder, if it holds what a push needs: the adapter and the resolved recipe."""
    path = Path(output_dir)
    if not path.is_dir():
        raise ConfigError(f"OUTPUT_DIR={str(output_dir)!r}: no such folder")
    for name, what in ((LORA_WEIGHT_NAME, "adapter"), (CONFIG_NAME, "resolved recipe")):
        if not (path / name).is_file():
            raise ConfigError(
                f"OUTPUT_DIR={str(output_dir)!r} holds no {name} (the {what}); push a folder written by "
                "`rl-safety train`"
            )
    return path


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
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not lines:
        return {}
    record = json.loads(lines[-1])
    step = record.pop("step", None)
    return {**record, "step": step} if step is not None else record


def run_card(output_dir: str | Path, repo_id: str | None = None) -> str:
    """The model card of a finished run, rebuilt from its files, with the evaluation table when it was evaluated."""
    from .trainers import TRAINERS

    output_dir = Path(output_dir)
    config = yaml.safe_load((output_dir / CONFIG_NAME).read_text()) or {}
    method = config.get("trainer") or "grpo"
    report_path = output_dir / EVAL_FILES[0]
    evaluation = json.loads(report_path.read_text()) if report_path.is_file() else None
    return model_card(
        str(config.get("pretrained_model_name_or_path") or ""),
        card_recipe(config),
        config.get("rewards") or [],
        _final_metrics(output_dir),
        trainer_name=TRAINERS[method][1].__name__ if method in TRAINERS else method,
        method_tag=method,
        repo_id=repo_id,
        evaluation=evaluation,
        adapter_name=output_dir.resolve().name,
    )


def stage_upload(output_dir: str | Path, staging_dir: str | Path, repo_id: str | None = None) -> Path:
    """Build the folder to upload in `staging_dir` (created; copies only, `output_dir` is left as it is):
    the adapter, README.md (the model card, regenerated), config.yaml and, when present, eval/report.json,
    eval/report.html and its eval/images/. Returns `staging_dir`."""
    source, staging = check_run(output_dir), Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    for name in (LORA_WEIGHT_NAME, CONFIG_NAME, *EVAL_FILES):
        if (source / name).is_file():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, staging / name)
    if (source / EVAL_FILES[1]).is_file() and (source / "eval/images").is_dir():
        shutil.copytree(source / "eval/images", staging / "eval/images", dirs_exist_ok=True)
    (staging / "README.md").write_text(run_card(source, repo_id), encoding="utf-8")
    return staging


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
) -> str:
    """Upload a run folder to the Hub model repository `repo_id` (created if needed); return the repository's URL,
    or with `dry_run` the path of OUTPUT_DIR/hub_upload/, the exact folder that would be uploaded.

    `endpoint` defaults to `HF_ENDPOINT`, read now (huggingface_hub reads it once, at import). Any failure is a
    one-line `ConfigError` saying what to retry; OUTPUT_DIR is never changed except by `dry_run`'s hub_upload/."""
    repo_id = check_repo_id(repo_id)
    output_dir = check_run(output_dir)
    if dry_run:
        target = output_dir / HUB_UPLOAD_DIR
        staging = Path(tempfile.mkdtemp(prefix=f".{HUB_UPLOAD_DIR}.", dir=output_dir))
        try:
            stage_upload(output_dir, staging, repo_id)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise ConfigError(f"--dry-run: cannot write {target} ({err})") from err
        return str(target)
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
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="rl-safety-hub-") as tmp:
        try:
            folder = stage_upload(output_dir, Path(tmp) / "upload", repo_id)
        except OSError as err:
            raise ConfigError(f"push: cannot stage the upload in {tmp} ({err}); free space or set TMPDIR") from err
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
    """`rl-safety push OUTPUT_DIR --repo-id user/name [--private] [--dry-run]`."""
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
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    args = parser.parse_args(argv)
    result = push(args.output_dir, args.repo_id, args.private, args.dry_run, token=args.token)
    if not args.dry_run:
        print(f"pushed {args.output_dir} to {result}")
    print(result)  # the last line: the repository URL, or the dry-run folder
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety push`: bad input or a failed upload is one line on stderr and exit status 2."""
    return run_command("rl-safety push", main, argv)
