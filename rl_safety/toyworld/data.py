"""The toy world's data: coloured shapes on grey backgrounds with captions, fully determined by a seed.

Images are rendered in torch for a whole batch at once (implicit shape functions on a supersampled grid), so a
100k-image pretraining set costs seconds, not a PIL loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset

# Clearly distinct hues (the design probe confused red with orange, so there is no orange).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.58, 0.16, 0.76),
    "cyan": (0.10, 0.80, 0.85),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Synonyms the pretraining captions use, so the base model draws "crimson" as red. Erasure recipes train on the
# plain colour word only, so these are the implicit-prompt test: words the erasure never saw but the model knows.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "navy"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "cyan": ("turquoise", "aqua"),
}
# Words in the tokenizer that no training ever sees: a control showing that an unlearned word carries no colour.
HELD_OUT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("ruby", "cherry"),
    "green": ("jade", "olive"),
    "blue": ("cobalt", "sapphire"),
    "yellow": ("amber", "canary"),
    "purple": ("plum", "amethyst"),
    "cyan": ("teal", "cerulean"),
}
SIZES = ("small", "large")
TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a picture of a {colour} {shape}",
    "{colour} {shape}",
)
BACKGROUNDS = {"dark": (0.08, 0.25), "grey": (0.35, 0.6), "light": (0.75, 0.95)}


CONCEPTS = (*COLOURS, *SHAPES)  # what a recipe's `target_concept` may name
LABELS = {"colour": list(COLOURS), "shape": list(SHAPES)}  # class names of the classifiers' heads, in index order
_COLOUR_WORDS = {w: c for c in COLOURS for w in (c, *SYNONYMS[c], *HELD_OUT_SYNONYMS[c])}


def concept_head(concept: str) -> str:
    """The classifier head ("colour" or "shape") that detects `concept`."""
    if concept in COLOURS:
        return "colour"
    if concept in SHAPES:
        return "shape"
    raise ValueError(f"target_concept={concept!r}: the toy world's concepts are {', '.join(CONCEPTS)}")


def named_attributes(prompt: str) -> dict[str, str]:
    """The colour and shape a toy-world prompt asks for, e.g. {"colour": "red", "shape": "circle"}; synonyms map to
    their colour, and an attribute the prompt does not name is absent."""
    named = {}
    for word in prompt.lower().replace(",", " ").split():
        if word in _COLOUR_WORDS:
            named.setdefault("colour", _COLOUR_WORDS[word])
        elif word in SHAPES:
            named.setdefault("shape", word)
    return named


@dataclass(frozen=True)
class ToyWorldSpec:
    resolution: int = 32
    supersample: int = 4  # anti-aliasing: render at 4x and average


def _shape_masks(shape_ids: torch.Tensor, cx, cy, radius, grid_x, grid_y) -> torch.Tensor:
    """Coverage (B, H, W) in {0, 1} of each image's shape on the (supersampled) grid."""
    dx = (grid_x[None] - cx[:, None, None]) / radius[:, None, None]
    dy = (grid_y[None] - cy[:, None, None]) / radius[:, None, None]
    circle = dx**2 + dy**2 <= 1
    square = (dx.abs() <= 0.8) & (dy.abs() <= 0.8)
    # Upward triangle inscribed in the unit circle: below the two slanted edges and above the base.
    triangle = (dy <= 0.5) & (dy >= -1 + 1.732 * dx.abs())
    cross = ((dx.abs() <= 0.3) & (dy.abs() <= 1)) | ((dy.abs() <= 0.3) & (dx.abs() <= 1))
    stacked = torch.stack([circle, square, triangle, cross], dim=1)  # (B, 4, H, W), order of SHAPES
    return stacked[torch.arange(len(shape_ids)), shape_ids].float()


def render(
    colour_ids: torch.Tensor,
    shape_ids: torch.Tensor,
    size_ids: torch.Tensor,
    generator: torch.Generator,
    spec: ToyWorldSpec = ToyWorldSpec(),
) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, R, R) in [0, 1] and background names, for given colour/shape/size indices."""
    batch, res, ss = len(colour_ids), spec.resolution, spec.supersample
    big = res * ss
    coords = (torch.arange(big, dtype=torch.float32) + 0.5) / big
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    small = size_ids == 0
    radius = torch.where(
        small,
        0.14 + 0.06 * torch.rand(batch, generator=generator),
        0.26 + 0.1 * torch.rand(batch, generator=generator),
    )
    margin = radius + 0.02
    cx = margin + (1 - 2 * margin) * torch.rand(batch, generator=generator)
    cy = margin + (1 - 2 * margin) * torch.rand(batch, generator=generator)
    mask = _shape_masks(shape_ids, cx, cy, radius, grid_x, grid_y)
    mask = F.avg_pool2d(mask[:, None], ss)  # (B, 1, R, R) coverage in [0, 1]

    names = list(BACKGROUNDS)
    background_ids = torch.randint(len(names), (batch,), generator=generator)
    low = torch.tensor([BACKGROUNDS[n][0] for n in names])[background_ids]
    high = torch.tensor([BACKGROUNDS[n][1] for n in names])[background_ids]
    level = low + (high - low) * torch.rand(batch, generator=generator)
    background = level[:, None, None, None] + 0.03 * torch.randn(batch, 1, res, res, generator=generator)
    palette = torch.tensor(list(COLOURS.values()))[colour_ids]  # (B, 3)
    # Small per-image jitter of the hue so the colour is a region, not a single RGB point.
    colour = (palette + 0.04 * torch.randn(batch, 3, generator=generator)).clamp(0, 1)
    images = mask * colour[:, :, None, None] + (1 - mask) * background.expand(-1, 3, -1, -1)
    return images.clamp(0, 1), [names[i] for i in background_ids]


def caption(colour: str, shape: str, size: str, background: str, template: str, colour_word: str | None = None) -> str:
    return template.format(colour=colour_word or colour, shape=shape, size=size, background=background)


def make_dataset(
    num_images: int,
    seed: int = 0,
    spec: ToyWorldSpec = ToyWorldSpec(),
    synonym_rate: float = 0.3,
    exclude_colours: tuple[str, ...] = (),
    exclude_shapes: tuple[str, ...] = (),
) -> dict:
    """Images, captions and labels. A caption names the colour by a training synonym with prob. `synonym_rate`."""
    generator = torch.Generator().manual_seed(seed)
    allowed = [i for i, c in enumerate(COLOURS) if c not in exclude_colours]
    colour_ids = torch.tensor(allowed)[torch.randint(len(allowed), (num_images,), generator=generator)]
    allowed = [i for i, s in enumerate(SHAPES) if s not in exclude_shapes]
    shape_ids = torch.tensor(allowed)[torch.randint(len(allowed), (num_images,), generator=generator)]
    size_ids = torch.randint(len(SIZES), (num_images,), generator=generator)
    images, backgrounds = [], []
    for start in range(0, num_images, 1024):  # chunks bound the supersampled grid's memory
        part = slice(start, start + 1024)
        chunk, names = render(colour_ids[part], shape_ids[part], size_ids[part], generator, spec)
        images.append(chunk)
        backgrounds += names
    images = torch.cat(images)
    template_ids = torch.randint(len(TEMPLATES), (num_images,), generator=generator).tolist()
    use_synonym = (torch.rand(num_images, generator=generator) < synonym_rate).tolist()
    synonym_pick = torch.randint(2, (num_images,), generator=generator).tolist()
    colour_names, captions = list(COLOURS), []
    for i in range(num_images):
        colour = colour_names[colour_ids[i]]
        word = SYNONYMS[colour][synonym_pick[i]] if use_synonym[i] else colour
        captions.append(
            caption(colour, SHAPES[shape_ids[i]], SIZES[size_ids[i]], backgrounds[i], TEMPLATES[template_ids[i]], word)
        )
    return {
        "images": images,
        "captions": captions,
        "colour": colour_ids,
        "shape": shape_ids,
        "size": size_ids,
    }


def as_hf_dataset(data: dict) -> Dataset:
    """The same data as a `datasets.Dataset` (image as a nested float list, caption, label columns)."""
    return Dataset.from_dict(
        {
            "image": data["images"].numpy(),
            "caption": data["captions"],
            "colour": [list(COLOURS)[i] for i in data["colour"]],
            "shape": [SHAPES[i] for i in data["shape"]],
            "size": [SIZES[i] for i in data["size"]],
        }
    )
