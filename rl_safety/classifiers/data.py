"""Image classification data for `rl-safety classifier`: an .npz file, an image folder, a `datasets` id or the toy
world, all returned as uint8 (N, C, H, W) tensors with integer labels, split into training and evaluation sets."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..command import first_line
from ..errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FORMS = "expected an .npz file, an image folder (one sub-folder per class), a `datasets` id or folder, or toyworld[:N]"


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
        raise DataError(f"{where}: labels must be >= 0, found {y.min()}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()


def _load_npz(path: Path, where: str) -> tuple[Split, Split | None, list[str] | None]:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{where}: not an .npz archive (numpy.savez writes one with arrays x and y)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = dict(archive.items())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{where}: not a readable .npz file ({first_line(err)})") from err
    if "x" not in files or "y" not in files:
        raise DataError(f"{where}: an .npz needs arrays 'x' (uint8 N×H×W×C) and 'y' (labels); found {sorted(files)}")
    train = Split(*_check_labels(files["x"], files["y"], where))
    test = None
    if ("x_test" in files) != ("y_test" in files):
        half = "x_test" if "x_test" in files else "y_test"
        raise DataError(f"{where}: has {half} without its pair; a test set needs both x_test and y_test")
    if "x_test" in files:
        test = Split(*_check_labels(files["x_test"], files["y_test"], f"{where} (x_test)"))
    names = [str(n) for n in files["class_names"]] if "class_names" in files else None
    return train, test, names


def _read_image(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGBA" if "A" in image.mode or image.mode == "P" else "RGB").convert("RGB")
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's decoders differ
        raise DataError(f"{where}: {path} is not a readable image ({first_line(err)})") from err


def _load_folder(root: Path, image_size: int | None, where: str) -> tuple[Split, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{where}: an image folder needs one sub-folder per class (at least 2)")
    images, labels, empty = [], [], []
    for label, name in enumerate(classes):
        files = [f for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            empty.append(name)
        for file in files:
            array = _as_nchw(_read_image(file, where))
            images.append(_resize(array, image_size) if image_size else array)
            labels.append(label)
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    if not images:
        raise DataError(f"{where}: no images ({suffixes}) in its class sub-folders")
    if empty:
        raise DataError(f"{where}: class folder(s) {', '.join(empty)} hold no images ({suffixes})")
    if len(classes) < 2:
        raise DataError(f"{where}: one class folder ({classes[0]}); a classifier needs at least 2 (one per class)")
    return Split(_stack(images, where), torch.tensor(labels).long()), classes


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


def _load_hf(
    name: str, image_size: int | None, where: str, image_column: str | None, label_column: str | None
) -> tuple[Split, Split | None, list[str] | None]:
    import datasets
    from PIL import Image

    # No progress bars: a data set that turns out unusable below must end in one line on stderr.
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(name)
    except Exception as err:  # Hub, file and format errors differ by backend: report them alike, on one line
        raise DataError(f"{where}: cannot load as a `datasets` id or path ({first_line(err)}); {FORMS}") from err
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    if "train" not in dataset:
        raise DataError(f"{where}: no 'train' split (found {', '.join(dataset)})")
    features = dataset["train"].features
    columns = ", ".join(features)
    for option, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in features:
            raise DataError(f"{option}={column!r}: not a column of {where}; its columns: {columns}")
    image_col = image_column or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label_col = label_column or next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    image_col = image_col or next((c for c in ("image", "img") if c in features), None)
    label_col = label_col or next((c for c in ("label", "labels", "fine_label") if c in features), None)
    if image_col is None or label_col is None:
        missing = "an image column (image_column)" if image_col is None else "a label column (label_column)"
        raise DataError(f"{where}: needs {missing}; its columns: {columns}")
    names = features[label_col].names if isinstance(features[label_col], datasets.ClassLabel) else None

    def convert(split, split_name: str) -> Split:
        labels = split[label_col]
        bad = next((v for v in labels if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise DataError(
                f"{where}: label column {label_col!r} ({split_name}) holds {bad!r}, not a class index >= 0; "
                f"set label_column to an integer column of {columns}"
            )
        images = []
        for im in split[image_col]:
            if not isinstance(im, Image.Image):
                raise DataError(
                    f"{where}: image column {image_col!r} holds {type(im).__name__} values, not images; set "
                    f"image_column to an image column of {columns}"
                )
            images.append(_as_nchw(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)))
        if image_size:
            images = [_resize(i, image_size) for i in images]
        if not images:
            raise DataError(f"{where}: its {split_name} split is empty")
        return Split(_stack(images, where), torch.tensor(labels).long())

    test = convert(dataset["test"], "test") if "test" in dataset else None
    return convert(dataset["train"], "train"), test, names


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _toyworld(spec: str, seed: int, where: str) -> tuple[Split, Split, dict[str | None, list[str]]]:
    from rl_safety.toyworld.data import LABELS, make_dataset

    count = spec.partition(":")[2]
    try:
        num = int(count) if count else 10000
    except ValueError:
        num = 0
    if num < 2:
        raise DataError(f"{where}: expected toyworld or toyworld:NUM_IMAGES with NUM_IMAGES >= 2")

    def make(n: int, s: int) -> Split:
        data = make_dataset(n, seed=s)
        x = (data["images"] * 255).round().clamp(0, 255).to(torch.uint8)
        return Split(x, torch.stack([data["colour"], data["shape"]], dim=1).long())

    # The evaluation images come from another seed, like the shipped classifiers' held-out sets.
    return make(num, seed), make(max(num // 5, 200), seed + 1000), {h: list(v) for h, v in LABELS.items()}


def _load_source(
    source: str, image_size: int | None, field: str, image_column: str | None = None, label_column: str | None = None
) -> tuple[Split, Split | None, list[str] | None]:
    where = f"{field}={source!r}"
    path = Path(source).expanduser()
    is_hf = path.is_dir() and ((path / "dataset_dict.json").exists() or any(path.glob("*.parquet")))
    is_hf = is_hf or not (path.exists() or source.startswith((".", "/", "~")) or path.suffix == ".npz")
    if not is_hf and (image_column or label_column):
        option = "image_column" if image_column else "label_column"
        raise DataError(f"{option} applies to `datasets` data; {where} is a file or image folder")
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{where}: no such .npz file")
        return _load_npz(path, where)
    if path.is_file():
        raise DataError(f"{where}: a file that is not an .npz; {FORMS}")
    if path.is_dir() and not is_hf:
        if (path / "train").is_dir() and (path / "test").is_dir():
            train, names = _load_folder(path / "train", image_size, f"{where} (train/)")
            test, test_names = _load_folder(path / "test", image_size, f"{where} (test/)")
            if test_names != names:
                raise DataError(f"{where}: train/ and test/ have different class folders")
            return train, test, names
        train, names = _load_folder(path, image_size, where)
        return train, None, names
    if not path.exists() and source.startswith((".", "/", "~")):
        raise DataError(f"{where}: no such file or folder")
    return _load_hf(source, image_size, where, image_column, label_column)


def load_data(
    source: str,
    eval_source: str | None = None,
    eval_split: float = 0.2,
    image_size: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageData:
    """Training and evaluation images from `source` (see `ClassifierConfig.data`); bad input raises `DataError`,
    naming the field (`data=...`, `eval_data=...`) and what is valid."""
    where = f"data={source!r}"
    if source.split(":")[0] == "toyworld":
        if eval_source is not None:
            raise DataError(
                f"eval_data={eval_source!r}: {where} brings its own evaluation images; leave eval_data unset"
            )
        if image_column or label_column:
            raise DataError(
                f"{'image_column' if image_column else 'label_column'} applies to `datasets` data, not {where}"
            )
        train, held_out, names = _toyworld(source, seed, where)
        if image_size:
            train, held_out = (
                Split(_resize(train.x, image_size), train.y),
                Split(_resize(held_out.x, image_size), held_out.y),
            )
        return ImageData(train, held_out, names, source)
    train, test, names = _load_source(source, image_size, "data", image_column, label_column)
    if image_size:
        train = Split(_resize(train.x, image_size), train.y)
        test = None if test is None else Split(_resize(test.x, image_size), test.y)
    if eval_source is not None:
        test, _, _ = _load_source(eval_source, image_size, "eval_data", image_column, label_column)
        if image_size:
            test = Split(_resize(test.x, image_size), test.y)
    if len(train.y) < 2:
        raise DataError(f"{where}: {len(train.y)} training image(s); need at least 2")
    classes = train.y.unique()
    if len(classes) < 2:
        raise DataError(
            f"{where}: every training image has label {int(classes[0])}; a classifier needs at least 2 classes"
        )
    if test is None:
        # Hold out a seeded random fraction: the same split for every method trained with the same seed.
        order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))
        cut = max(1, int(round(eval_split * len(order))))
        test, train = (
            Split(train.x[order[:cut]], train.y[order[:cut]]),
            Split(train.x[order[cut:]], train.y[order[cut:]]),
        )
    if len(test.y) == 0:
        raise DataError(f"{'eval_data=' + repr(eval_source) if eval_source else where}: no evaluation images")
    if test.x.shape[1:] != train.x.shape[1:]:
        eval_where = f"eval_data={eval_source!r}" if eval_source else f"{where} (its test set)"
        raise DataError(
            f"{eval_where}: evaluation images are {tuple(test.x.shape[1:])}, training images "
            f"{tuple(train.x.shape[1:])}; set image_size to resize both"
        )
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    if names is not None and len(names) < num_classes:
        raise DataError(f"{where}: class_names lists {len(names)} names but the labels go up to {num_classes - 1}")
    names = names or [str(i) for i in range(num_classes)]
    return ImageData(train, test, {None: list(names)}, source)
