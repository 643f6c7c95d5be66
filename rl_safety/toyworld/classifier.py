"""The toy world's attribute classifier (a colour head and a shape head) and its exact, rule-based colour judge.

The classifier is the concept detector that rewards use (`classifier` reward with
`architecture: rl_safety.toyworld.classifier:AttributeClassifier`). Evaluation must not trust a model the policy was
trained against, so colour is also measured exactly from pixels (`colour_from_pixels`), and shape by a second
classifier trained from another seed on other images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..outputs import atomic_folder
from .data import COLOURS, SHAPES, make_dataset

PALETTE = torch.tensor(list(COLOURS.values()))


class AttributeClassifier(nn.Module):
    """Small CNN for 32 px images in [0, 1]: returns {"colour": logits (B, 6), "shape": logits (B, 4)}."""

    def __init__(self, width: int = 32, num_colours: int = len(COLOURS), num_shapes: int = len(SHAPES)):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.colour = nn.Linear(4 * width, num_colours)
        self.shape = nn.Linear(4 * width, num_shapes)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=32, mode="bilinear", antialias=True, align_corners=False)
        h = self.features(images * 2 - 1)
        pooled = h.mean(dim=(2, 3))
        return {"colour": self.colour(pooled), "shape": self.shape(pooled)}


def colour_from_pixels(images: torch.Tensor, min_saturation: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact colour judge: (palette index, share of coloured pixels) per image.

    Backgrounds are grey (r = g = b), so coloured pixels are those whose max − min channel exceeds
    `min_saturation`; the image's colour is the palette entry nearest their median. Index −1 when none is coloured.
    """
    spread = images.amax(dim=1) - images.amin(dim=1)  # (B, H, W)
    coloured = (spread > min_saturation).flatten(1)
    share = coloured.float().mean(dim=1)
    pixels = images.flatten(2).masked_fill(~coloured[:, None], float("nan"))
    median = pixels.nanmedian(dim=2).values  # (B, 3); NaN where no pixel is coloured
    index = torch.cdist(median.nan_to_num(0.0), PALETTE.to(images)).argmin(dim=1)
    return index.masked_fill(share == 0, -1), share


def train_classifier(
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    num_images: int = 20000,
    width: int = 32,
    lr: float = 3e-3,
    num_held_out: int = 2000,
) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train on procedural images of `seed`; returns the model and its held-out accuracies (images of seed + 1000)."""
    torch.manual_seed(seed)
    data = make_dataset(num_images, seed=seed)
    model = AttributeClassifier(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(steps), desc="classifier")
    for _ in progress:
        idx = torch.randint(num_images, (batch_size,), generator=generator)
        out = model(data["images"][idx])
        loss = F.cross_entropy(out["colour"], data["colour"][idx]) + F.cross_entropy(out["shape"], data["shape"][idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), evaluate(model, make_dataset(num_held_out, seed=seed + 1000))


@torch.no_grad()
def evaluate(model: AttributeClassifier, data: dict) -> dict[str, float]:
    out = model(data["images"])
    return {
        "colour_accuracy": (out["colour"].argmax(1) == data["colour"]).float().mean().item(),
        "shape_accuracy": (out["shape"].argmax(1) == data["shape"]).float().mean().item(),
    }


def save_classifier(model: AttributeClassifier, directory: str | Path, metrics: dict[str, float]) -> Path:
    """`model.safetensors` + `config.json` (architecture path and args, label names, held-out accuracy), written to
    a temporary folder that replaces `directory` when complete."""
    directory = Path(directory)
    config = {
        "architecture": "rl_safety.toyworld.classifier:AttributeClassifier",
        "architecture_args": {"width": model.colour.in_features // 4},
        "colour_names": list(COLOURS),
        "shape_names": list(SHAPES),
        "held_out": metrics,
    }
    with atomic_folder(directory) as tmp:
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_classifier(directory: str | Path) -> AttributeClassifier:
    config = json.loads((Path(directory) / "config.json").read_text())
    model = AttributeClassifier(**config["architecture_args"])
    model.load_state_dict(load_file(Path(directory) / "model.safetensors"))
    return model.eval().requires_grad_(False)
