import torch

from rl_safety.toyworld.data import COLOURS, HELD_OUT_SYNONYMS, SHAPES, SYNONYMS, as_hf_dataset, make_dataset


def test_deterministic_by_seed():
    a, b, c = make_dataset(16, seed=3), make_dataset(16, seed=3), make_dataset(16, seed=4)
    assert torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"]
    assert not torch.equal(a["images"], c["images"])


def test_shape_pixels_have_the_caption_colour_and_background_is_grey():
    data = make_dataset(64, seed=0)
    palette = torch.tensor(list(COLOURS.values()))
    images = data["images"]
    # Background pixels are grey (r = g = b up to noise); shape pixels are far from grey.
    spread = images.max(dim=1).values - images.min(dim=1).values  # (B, H, W)
    shape_pixels = spread > 0.3
    assert (shape_pixels.flatten(1).sum(1) > 4).all()  # every image shows its shape
    for i in range(len(images)):
        rgb = images[i][:, shape_pixels[i]].median(dim=1).values
        nearest = (palette - rgb).norm(dim=1).argmin().item()
        assert nearest == data["colour"][i].item()
        assert list(COLOURS)[nearest] in data["captions"][i] or any(
            s in data["captions"][i] for s in SYNONYMS[list(COLOURS)[nearest]]
        )
        assert SHAPES[data["shape"][i]] in data["captions"][i]


def test_held_out_synonyms_never_in_training_captions():
    captions = " ".join(make_dataset(2000, seed=1)["captions"]).split()
    held_out = {w for words in HELD_OUT_SYNONYMS.values() for w in words}
    assert held_out.isdisjoint(captions)
    assert {w for words in SYNONYMS.values() for w in words} <= set(captions)  # training synonyms do appear


def test_exclude_colours_and_hf_dataset():
    data = make_dataset(200, seed=2, exclude_colours=("red",))
    assert list(COLOURS).index("red") not in data["colour"].tolist()
    ds = as_hf_dataset(make_dataset(4, seed=0))
    assert ds.column_names == ["image", "caption", "colour", "shape", "size"]
    assert torch.tensor(ds[0]["image"]).shape == (3, 32, 32)
