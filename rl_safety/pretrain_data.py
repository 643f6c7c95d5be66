"""Image–caption pairs for ReFL's pre-training regulariser, from a `datasets` id, a local folder or file, or the
toy world's generator. `batch(index)` is a function of the index alone, so a resumed run sees the same pairs."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class PretrainData:
    """Batches of (images in [-1, 1] of shape (B, 3, resolution, resolution), captions).

    Args:
        source: 'toyworld', a `datasets` Hub id, a local image folder (imagefolder layout: images plus a metadata
            .jsonl/.csv with `file_name` and the caption column), or a .csv/.json/.jsonl/.parquet file whose image
            column holds paths relative to the file.
        resolution: output side in pixels (resize the shorter side, center crop).
        exclude_concept: with 'toyworld', a colour or shape the generated images never show (the erased concept).
    """

    def __init__(
        self,
        source: str,
        resolution: int,
        seed: int = 0,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "caption",
        exclude_concept: str | None = None,
    ):
        self.source, self.resolution, self.seed = source, resolution, seed
        self.image_column, self.caption_column = image_column, caption_column
        self.exclude_concept = exclude_concept
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resolution, antialias=True),
                v2.CenterCrop(resolution),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )
        self.dataset = None if source == "toyworld" else self._load(source, split)
        self.root = Path(source).parent if Path(source).suffix in FILE_FORMATS else None

    def _load(self, source: str, split: str):
        from datasets import load_dataset

        path = Path(source).expanduser()
        if path.is_dir():
            dataset = load_dataset("imagefolder", data_dir=str(path), split="train")
        elif path.suffix in FILE_FORMATS:
            if not path.is_file():
                raise ValueError(f"pretrain_dataset={source!r}: no such file")
            dataset = load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            dataset = load_dataset(source, split=split)
        columns = (("pretrain_image_column", self.image_column), ("pretrain_caption_column", self.caption_column))
        for role, column in columns:
            if column not in dataset.column_names:
                raise ValueError(
                    f"{role}={column!r}: not a column of pretrain_dataset={source!r} (columns: "
                    f"{', '.join(dataset.column_names)})"
                )
        if len(dataset) == 0:
            raise ValueError(f"pretrain_dataset={source!r}: holds no rows")
        return dataset

    def _image(self, value) -> torch.Tensor:
        if isinstance(value, str):
            value = Image.open(self.root / value if self.root else value)
        return self.transform(value.convert("RGB"))

    def batch(self, size: int, index: int) -> tuple[torch.Tensor, list[str]]:
        """The `index`-th batch of `size` pairs, drawn with replacement from a generator seeded by (seed, index)."""
        seed = self.seed * 1_000_003 + index
        if self.dataset is None:
            from .toyworld.data import COLOURS, make_dataset

            excluded = (self.exclude_concept,) if self.exclude_concept else ()
            if excluded and excluded[0] in COLOURS:
                data = make_dataset(size, seed=seed, exclude_colours=excluded)
            else:
                data = make_dataset(size, seed=seed, exclude_shapes=excluded)
            images = torch.nn.functional.interpolate(data["images"], size=self.resolution, mode="bilinear")
            return images * 2 - 1, data["captions"]
        rows = torch.randint(len(self.dataset), (size,), generator=torch.Generator().manual_seed(seed)).tolist()
        picked = [self.dataset[i] for i in rows]
        images = torch.stack([self._image(row[self.image_column]) for row in picked])
        return images * 2 - 1, [str(row[self.caption_column]) for row in picked]
