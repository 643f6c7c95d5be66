"""Write the small offline image sets the DyART acceptance numbers in README.md were measured on.

python benchmarks/small_image_sets.py /tmp/dyart-data
  digits16.npz    scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes), upscaled ×2 to 16×16 grey
  toyshapes.npz   toy-world images of another seed (3,000 at 32 px, colour), labelled by shape (4 classes)
  stripes.npz     synthetic 12×12 grey images: a faint horizontal or vertical grating in noise (2 classes)
  letters16.npz   10 capital letters drawn with Pillow's built-in font at random size, angle, offset and stroke,
                  16×16 grey with noise (2,000 images)
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


def letters16(num: int = 2000, size: int = 16, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    letters = "ACEFHKLPTX"  # no pair that a rotation of a few degrees turns into the other
    labels = rng.integers(0, len(letters), num)
    images = np.empty((num, size, size), dtype=np.float64)
    for i, label in enumerate(labels):
        # Drawn at 4× and downsampled, so strokes are anti-aliased like a scanned glyph.
        font = ImageFont.load_default(size=int(rng.integers(34, 50)))
        canvas = Image.new("L", (4 * size, 4 * size), 0)
        offset = 2 * size + rng.uniform(-6, 6, 2)
        ImageDraw.Draw(canvas).text(
            tuple(offset),
            letters[label],
            fill=255,
            font=font,
            anchor="mm",
            stroke_width=int(rng.integers(0, 3)),
            stroke_fill=255,
        )
        canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        images[i] = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float64) / 255
    images = images * rng.uniform(0.6, 1.0, (num, 1, 1)) + rng.normal(0, 0.05, images.shape)
    return (images.clip(0, 1) * 255).round().astype(np.uint8)[..., None], labels.astype(np.int64)


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"digits16": digits16, "toyshapes": toyshapes, "stripes": stripes, "letters16": letters16}
    for name, make in sets.items():
        x, y = make()
        np.savez_compressed(out / f"{name}.npz", x=x, y=y)
        print(f"{out / name}.npz: x {x.shape} {x.dtype}, y {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dyart-data")
