"""Score image files with a reward from the shell.

    rl-safety score --reward NAME [--reward-args JSON] --prompt TEXT IMAGE_OR_FOLDER...

Prints a JSON list with one score per image, in argument order (folders expanded in sorted order). A reward that
defines `score_files(prompt, paths)` is scored with its reference preprocessing (ImageReward: exactly the original
package's); any other gets the images as [0, 1] tensors, batched by size.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rl_safety.rewards import build_reward

from .command import ArgumentParser, run_command
from .errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class ScoreError(ConfigError):
    """Bad input to `rl-safety score`."""


def expand_images(arguments: list[str]) -> list[Path]:
    """Image files named directly, plus the images inside each named folder (sorted)."""
    paths = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ScoreError(f"{argument}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise ScoreError(f"{argument}: no such image file or folder")
    if not paths:
        raise ScoreError("no images given")
    return paths


def load_tensor(path: Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    try:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    except OSError as err:
        raise ScoreError(f"{path}: not a readable image ({err})") from err
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def score_images(reward, prompt: str, paths: list[Path], batch_size: int = 64, device: str = "cpu") -> list[float]:
    """One score per path. Images of equal size are batched together; no per-image model call."""
    if hasattr(reward, "score_files"):
        return [float(s) for s in reward.score_files(prompt, [str(p) for p in paths])]
    if isinstance(reward, torch.nn.Module):
        reward.to(device).eval()
    images = [load_tensor(p) for p in paths]
    by_size = defaultdict(list)
    for index, image in enumerate(images):
        by_size[tuple(image.shape)].append(index)
    scores = torch.empty(len(paths))
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.stack([images[i] for i in chunk]).to(device)
            values = reward(batch, [prompt] * len(chunk), tags=["default"] * len(chunk), step=0)
            scores[chunk] = torch.as_tensor(values, dtype=torch.float32).cpu()
    return scores.tolist()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="rl-safety score", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--reward", required=True, help="reward name (built-in, plugin, or package.module:attr)")
    parser.add_argument("--reward-args", default="{}", help="JSON object of the reward's constructor args")
    parser.add_argument("--prompt", default="", help="the prompt the images were generated from")
    parser.add_argument("--batch-size", type=int, default=64, help="images per reward call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)
    try:
        reward_args = json.loads(args.reward_args)
    except json.JSONDecodeError as err:
        raise ScoreError(f"--reward-args: not JSON ({err.msg})") from err
    if not isinstance(reward_args, dict):
        raise ScoreError("--reward-args: expected a JSON object, e.g. '{\"quality\": 90}'")
    paths = expand_images(args.images)
    reward = build_reward(args.reward, reward_args)
    scores = score_images(reward, args.prompt, paths, args.batch_size, args.device)
    print(json.dumps(scores))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`rl-safety score`: bad input is one line on stderr and exit status 2 (see `command.py`)."""
    return run_command("rl-safety score", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
