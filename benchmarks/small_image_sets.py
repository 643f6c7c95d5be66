"""Write the small offline image sets the DyART acceptance numbers in README.md were measured on.

python benchmarks/small_image_sets.py /tmp/dyart-data
  digits16.npz    scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes), upscaled ×2 to 16×16 grey
  toyshapes.npz   toy-world images of another seed (3,000 at 32 px, colour), labelled by shape (4 classes)
  stripes.npz     synthetic 12×12 grey images: a faint horizontal or vertical grating in noise (2 classes)
Each file holds x (uint8, N×H×W×C) and y (int64 labels), the form `rl-safety classifier --data` reads.
scikit-learn is needed for digits only (`pip install scikit-learn`); nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def digits16() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no network

    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)  # 0..16 ink levels to 0..255
    images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]
    return images, digits.target.astype(np.int64)


def toyshapes(num: int = 3000, seed: int = 4242) -> tuple[np.ndarray, np.ndarray]:
    from rl_safety.toyworld.data import make_dataset

    data = make_dataset(num, seed=seed)
    images = (data["images"] * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, data["shape"].numpy().astype(np.int64)


def stripes(num: int = 2000, size: int = 12, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, num)
    phase = rng.uniform(0, 2 * np.pi, num)
    grid = np.arange(size)
    wave = np.sin(grid[None, :] * np.pi / 2 + phase[:, None])  # (N, size)
    pattern = np.where(labels[:, None, None] == 0, wave[:, None, :], wave[:, :, None])  # vertical or horizontal
    images = 0.5 + 0.15 * pattern + rng.normal(0, 0.12, (num, size, size))
    return (images.clip(0, 1) * 255).round().astype(np.uint8)[..., None], labels.astype(np.int64)


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("digits16", digits16), ("toyshapes", toyshapes), ("stripes", stripes)):
        x, y = make()
        np.savez_compressed(out / f"{name}.npz", x=x, y=y)
        print(f"{out / name}.npz: x {x.shape} {x.dtype}, y {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dyart-data")
