"""Score image files with a reward from the shell.

    rl-safety score --reward NAME [--reward-args JSON] [--prompt TEXT | --prompts FILE] [--output FILE] IMAGE...

Prints a JSON list with one score per image, in argument order (folders expanded in sorted order); `--output` also
writes it to a file (atomically). `--prompts` gives one prompt per image, a line each in the images' order. A reward
that defines `score_files(prompt, paths)` is scored with its reference preprocessing (ImageReward: exactly the
original package's); any other gets the images as [0, 1] tensors, batched by size.

Everything is checked before the reward is built: the flags, the reward's JSON arguments, the output path, every
image (it decodes completely and is an 8-bit image) and the prompts. Bad input is one line and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rl_safety.rewards import RewardError, build_reward

from .checks import check_device, check_output_folder
from .command import ArgumentParser, loading, run_command
from .errors import ConfigError
from .resources import resolve_reward_paths, tried

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# 8-bit modes that convert to RGB faithfully. 16- and 32-bit ("I;16", "I", "F") would be clipped to 0..255.
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# What PIL raises on a file that is not a whole image of a format it knows: no format, truncated, bad chunk or
# header, or over its decompression-bomb limit.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ScoreError(ConfigError):
    """Bad input to `rl-safety score`."""


def expand_images(arguments: list[str]) -> list[Path]:
    """Image files named directly, plus the images inside each named folder (sorted)."""
    paths = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ScoreError(f"{argument}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise ScoreError(f"{argument}: not an image file or folder")
        else:
            raise ScoreError(f"{argument}: no such image file or folder")
    if not paths:
        raise ScoreError("no images given")
    return paths


def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image that decodes completely and has an 8-bit mode; a `ScoreError` naming it if not."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not in the middle of scoring
            mode, size = image.mode, image.size
    except DECODE_ERRORS as err:
        raise ScoreError(f"{path}: not a readable image ({' '.join(str(err).split()) or type(err).__name__})") from err
    if mode not in IMAGE_MODES:
        raise ScoreError(
            f"{path}: image mode {mode!r} is not supported (16-bit, 32-bit and float images would be clipped to "
            "8 bits); save it as 8-bit RGB, RGBA, L or P"
        )
    if 0 in size:
        raise ScoreError(f"{path}: image is empty ({size[0]}x{size[1]})")
    return size


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header."""
    try:
        with Image.open(path) as image:
            return image.size
    except DECODE_ERRORS as err:
        raise ScoreError(f"{path}: not a readable image ({err})") from err


def load_tensor(path: Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except DECODE_ERRORS as err:
        raise ScoreError(f"{path}: not a readable image ({err})") from err
    return torch.from_numpy(array).permute(2, 0, 1)


def read_prompts(value: str, count: int) -> list[str]:
    """`--prompts FILE`: one prompt a line ('#' lines are comments), exactly one per image."""
    from .prompts import read_prompt_file  # imports `datasets`: only when needed

    path = Path(value)
    if not path.is_file():
        what = "not a file" if path.exists() else "no such file"
        raise ScoreError(f"--prompts {value!r}: {what}{tried(value) if not path.exists() else ''}")
    try:
        prompts, _ = read_prompt_file(path)
    except OSError as err:
        raise ScoreError(f"--prompts {value!r}: cannot read ({err.strerror or err})") from err
    if not prompts:
        raise ScoreError(f"--prompts {value!r}: holds no prompts; give one a line, one per image")
    if len(prompts) != count:
        raise ScoreError(
            f"--prompts {value!r}: holds {len(prompts)} prompts for {count} images; give one per image, in the "
            "images' order"
        )
    return prompts


class _HeldRecords(logging.Handler):
    """Keeps the records no other handler takes, which Python would print through its last-resort handler."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:  # the walk `Logger.callHandlers` does, ourselves excluded
            if any(handler is not self for handler in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        self.records.append(record)


@contextlib.contextmanager
def held_log_records() -> Iterator[None]:
    """Around a reward's load: messages libraries log without a handler (open_clip logs a failed download on the
    root logger, then raises) are shown if the load succeeds and dropped if it fails, so that a failed load is the
    command's one line."""
    held = _HeldRecords()
    logging.root.addHandler(held)
    try:
        yield
    finally:
        logging.root.removeHandler(held)
    for record in held.records:
        if logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


def reward_label(reward) -> str:
    return getattr(reward, "__name__", type(reward).__name__)


@torch.no_grad()
def score_images(
    reward, prompts: str | list[str], paths: list[Path], batch_size: int = 64, device: str = "cpu"
) -> list[float]:
    """One score per path, for one prompt or one prompt per path. Images of equal size are batched together (each
    batch loaded when it is scored); no per-image model call."""
    prompts = [prompts] * len(paths) if isinstance(prompts, str) else list(prompts)
    if hasattr(reward, "score_files"):
        by_prompt = defaultdict(list)
        for index, prompt in enumerate(prompts):
            by_prompt[prompt].append(index)
        scores = [0.0] * len(paths)
        for prompt, indices in by_prompt.items():
            values = reward.score_files(prompt, [str(paths[i]) for i in indices])
            for i, value in zip(indices, values):
                scores[i] = float(value)
        return scores
    if isinstance(reward, torch.nn.Module):
        reward.to(device).eval()
    by_size = defaultdict(list)
    for index, path in enumerate(paths):
        by_size[image_size(path)].append(index)
    scores = torch.empty(len(paths))
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.stack([load_tensor(paths[i]) for i in chunk]).to(device)
            values = reward(batch, [prompts[i] for i in chunk], tags=["default"] * len(chunk), step=0)
            values = torch.as_tensor(values, dtype=torch.float32).cpu()
            if values.shape != (len(chunk),):
                raise RewardError(
                    f"reward {reward_label(reward)!r} returned shape {tuple(values.shape)} for {len(chunk)} images; "
                    f"expected ({len(chunk)},)"
                )
            scores[chunk] = values
    return scores.tolist()


def parse_args(argv: list[str] | None = None):
    """The flags, with every value checked; bad input is a `ScoreError`."""
    parser = ArgumentParser(prog="rl-safety score", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--reward", required=True, help="reward name (built-in, plugin, or package.module:attr)")
    parser.add_argument("--reward-args", default="{}", help="JSON object of the reward's constructor args")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="the prompt the images were generated from")
    prompt.add_argument("--prompts", help="a text file with one prompt per image, a line each, in the images' order")
    parser.add_argument("--output", help="also write the JSON list of scores to this file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per reward call (≥ 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ScoreError(f"--batch-size={args.batch_size}: must be ≥ 1")
    try:
        check_device(args.device, "--device")
    except ValueError as err:
        raise ScoreError(str(err)) from err
    if not args.reward.strip():
        raise ScoreError("--reward: empty; give a reward name, e.g. jpeg_compressibility")
    try:
        args.reward_args = json.loads(args.reward_args)
    except json.JSONDecodeError as err:
        raise ScoreError(f"--reward-args: not JSON ({err.msg} at character {err.pos})") from err
    if not isinstance(args.reward_args, dict):
        raise ScoreError("--reward-args: expected a JSON object, e.g. '{\"quality\": 90}'")
    if args.output is not None:
        check_output_file(args.output)
    return args


def check_output_file(value: str) -> None:
    """`--output`: a file path whose folder exists or can be created and written to, and not a folder itself."""
    path = Path(value)
    if not value.strip() or value.endswith(("/", "\\")) or path.is_dir():
        raise ScoreError(f"--output {value!r}: is a folder; name a file, e.g. scores.json")
    if path.parent.exists() and not path.parent.is_dir():
        raise ScoreError(f"--output {value!r}: {str(path.parent)!r} is a file, not a folder")
    try:
        check_output_folder(path.parent, "--output")
    except ValueError as err:  # "--output='<folder>': <reason>", said of the file given
        raise ScoreError(f"--output {value!r}: {str(err).split(': ', 1)[1]}") from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = expand_images(args.images)
    for path in paths:
        check_image(path)
    prompts = read_prompts(args.prompts, len(paths)) if args.prompts is not None else args.prompt
    (spec,) = resolve_reward_paths([{"name": args.reward, "args": args.reward_args}])  # shipped models, as in train
    with loading("--reward", args.reward), held_log_records():
        reward = build_reward(args.reward, spec["args"])
    if not callable(reward):
        raise ScoreError(f"--reward {args.reward!r}: names a {type(reward).__name__}, not a reward (a callable)")
    scores = score_images(reward, prompts, paths, args.batch_size, args.device)
    text = json.dumps(scores)
    if args.output is not None:
        from .outputs import atomic_write_text  # imports transformers: only when needed

        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety score`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command("rl-safety score", main, argv, resume_hint="nothing was written; run the same command again")


if __name__ == "__main__":
    sys.exit(cli())
