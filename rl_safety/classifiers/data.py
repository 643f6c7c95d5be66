"""Image classification data for `rl-safety classifier`: an .npz file, an image folder, a `datasets` id or the toy
world, all returned as uint8 (N, C, H, W) tensors with integer labels, split into training and evaluation sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ConfigError):
    """A data source that cannot be read as labelled images (reported as one line)."""


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,) or (N, heads)


@dataclass
class ImageData:
    train: Split
    eval: Split
    class_names: dict[str | None, list[str]]  # head (None for single-head data) -> class names in index order
    source: str

    @property
    def heads(self) -> list[str | None]:
        return list(self.class_names)

    @property
    def channels(self) -> int:
        return self.train.x.shape[1]


def _check_labels(x: np.ndarray, y: np.ndarray, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype != np.uint8:
        raise DataError(f"{where}: x must be uint8 images (N×H×W×C), got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{where}: x must have shape N×H×W×C, got {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()


def _load_npz(path: Path) -> tuple[Split, Split | None, list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = dict(archive.items())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    if "x" not in files or "y" not in files:
        raise DataError(f"{path}: an .npz needs arrays 'x' (uint8 N×H×W×C) and 'y' (labels); found {sorted(files)}")
    train = Split(*_check_labels(files["x"], files["y"], str(path)))
    test = None
    if "x_test" in files and "y_test" in files:
        test = Split(*_check_labels(files["x_test"], files["y_test"], f"{path} (x_test)"))
    names = [str(n) for n in files["class_names"]] if "class_names" in files else None
    return train, test, names


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGBA" if "A" in image.mode or image.mode == "P" else "RGB").convert("RGB")
        return np.asarray(image)


def _load_folder(root: Path, image_size: int | None) -> tuple[Split, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: an image folder needs one sub-folder per class")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                array = _read_image(file)
                images.append(_resize(_as_nchw(array), image_size) if image_size else _as_nchw(array))
                labels.append(label)
    if not images:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class sub-folders")
    return Split(_stack(images, str(root)), torch.tensor(labels).long()), classes


def _as_nchw(array: np.ndarray) -> torch.Tensor:
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)[None]  # PIL's arrays are read-only


def _stack(images: list[torch.Tensor], where: str) -> torch.Tensor:
    channels = max(i.shape[1] for i in images)
    images = [i.expand(-1, channels, -1, -1) if i.shape[1] == 1 else i for i in images]  # grey among colour
    shapes = {tuple(i.shape[1:]) for i in images}
    if len(shapes) > 1:
        raise DataError(f"{where}: images have different sizes {sorted(shapes)[:3]}; set image_size to resize them")
    return torch.cat(images)


def _load_hf(name: str, image_size: int | None) -> tuple[Split, Split | None, list[str] | None]:
    import datasets

    try:
        dataset = datasets.load_dataset(name)
    except Exception as err:  # Hub, file and format errors differ by backend: report them alike, on one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{name}: cannot load as a `datasets` id or path ({first})") from err
    if "train" not in dataset:
        raise DataError(f"{name}: no 'train' split (found {', '.join(dataset)})")
    features = dataset["train"].features
    image_col = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    image_col = image_col or next((c for c in ("image", "img") if c in features), None)
    label_col = label_col or next((c for c in ("label", "labels", "fine_label") if c in features), None)
    if image_col is None or label_col is None:
        raise DataError(f"{name}: needs an image column and a label column; found {', '.join(features)}")
    names = features[label_col].names if isinstance(features[label_col], datasets.ClassLabel) else None

    def convert(split) -> Split:
        images = [
            _as_nchw(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)) for im in split[image_col]
        ]
        if image_size:
            images = [_resize(i, image_size) for i in images]
        return Split(_stack(images, name), torch.tensor(split[label_col]).long())

    return convert(dataset["train"]), convert(dataset["test"]) if "test" in dataset else None, names


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _toyworld(spec: str, seed: int) -> tuple[Split, Split, dict[str | None, list[str]]]:
    from rl_safety.toyworld.data import LABELS, make_dataset

    count = spec.partition(":")[2]
    try:
        num = int(count) if count else 10000
    except ValueError as err:
        raise DataError(f"data={spec!r}: expected toyworld or toyworld:NUM_IMAGES") from err

    def make(n: int, s: int) -> Split:
        data = make_dataset(n, seed=s)
        x = (data["images"] * 255).round().clamp(0, 255).to(torch.uint8)
        return Split(x, torch.stack([data["colour"], data["shape"]], dim=1).long())

    # The evaluation images come from another seed, like the shipped classifiers' held-out sets.
    return make(num, seed), make(max(num // 5, 200), seed + 1000), {h: list(v) for h, v in LABELS.items()}


def _load_source(source: str, image_size: int | None) -> tuple[Split, Split | None, list[str] | None]:
    path = Path(source).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{source}: no such .npz file")
        return _load_npz(path)
    if path.is_dir() and not (path / "dataset_dict.json").exists() and not any(path.glob("*.parquet")):
        if (path / "train").is_dir() and (path / "test").is_dir():
            train, names = _load_folder(path / "train", image_size)
            test, test_names = _load_folder(path / "test", image_size)
            if test_names != names:
                raise DataError(f"{source}: train/ and test/ have different class folders")
            return train, test, names
        train, names = _load_folder(path, image_size)
        return train, None, names
    if source.startswith((".", "/", "~")) and not path.exists():
        raise DataError(f"{source}: no such file or folder")
    return _load_hf(source, image_size)


def load_data(
    source: str, eval_source: str | None = None, eval_split: float = 0.2, image_size: int | None = None, seed: int = 0
) -> ImageData:
    """Training and evaluation images from `source` (see `ClassifierConfig.data`); bad input raises `DataError`."""
    if source.split(":")[0] == "toyworld":
        train, held_out, names = _toyworld(source, seed)
        if image_size:
            train, held_out = (
                Split(_resize(train.x, image_size), train.y),
                Split(_resize(held_out.x, image_size), held_out.y),
            )
        return ImageData(train, held_out, names, source)
    train, test, names = _load_source(source, image_size)
    if image_size:
        train = Split(_resize(train.x, image_size), train.y)
        test = None if test is None else Split(_resize(test.x, image_size), test.y)
    if eval_source is not None:
        test, _, _ = _load_source(eval_source, image_size)
        if image_size:
            test = Split(_resize(test.x, image_size), test.y)
    if test is None:
        # Hold out a seeded random fraction: the same split for every method trained with the same seed.
        order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))
        cut = max(1, int(round(eval_split * len(order))))
        test, train = (
            Split(train.x[order[:cut]], train.y[order[:cut]]),
            Split(train.x[order[cut:]], train.y[order[cut:]]),
        )
    if test.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"evaluation images are {tuple(test.x.shape[1:])}, training images {tuple(train.x.shape[1:])}")
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    if names is None or len(names) < num_classes:
        names = [str(i) for i in range(num_classes)]
    if len(train.y) < 2:
        raise DataError(f"{source}: need at least 2 training images")
    return ImageData(train, test, {None: list(names)}, source)
