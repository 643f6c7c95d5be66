"""Caption prompt sets: every accepted file layout, a local `datasets` folder, seeded sampling, one-line errors."""

from __future__ import annotations

import json

import pytest

from rl_safety.errors import ConfigError
from rl_safety.evaluation.coco import load_captions

CAPTIONS = ["A kite above a grey pier.", "Two bicycles leaning on a fence.", "A bowl of lemons on a table."]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path) -> dict:
    records = [{"id": i, "caption": c} for i, c in enumerate(CAPTIONS)]
    return {
        "txt": write(tmp_path / "captions.txt", "\n".join(CAPTIONS) + "\n\n"),
        "csv": write(
            tmp_path / "captions.csv", "id,caption\n" + "".join(f'{i},"{c}"\n' for i, c in enumerate(CAPTIONS))
        ),
        "json": write(tmp_path / "captions.json", json.dumps(records)),
        "jsonl": write(tmp_path / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in records)),
    }


@pytest.mark.parametrize("kind", ["txt", "csv", "json", "jsonl"])
def test_every_file_layout_gives_the_captions_in_order(files, kind):
    assert load_captions(files[kind]) == CAPTIONS


def test_coco_annotations_give_one_caption_per_image(tmp_path):
    annotations = [
        {"image_id": 7, "id": 1, "caption": "A dog asleep on a sofa."},
        {"image_id": 9, "id": 2, "caption": " A train crossing a bridge. "},
        {"image_id": 7, "id": 3, "caption": "A brown dog lying on a couch."},
    ]
    path = write(tmp_path / "captions_val.json", json.dumps({"images": [], "annotations": annotations}))
    assert load_captions(path) == ["A dog asleep on a sofa.", "A train crossing a bridge."]
    assert len(load_captions(path, one_per_image=False)) == 3


def test_sampling_is_seeded_and_without_replacement(tmp_path):
    path = write(tmp_path / "many.txt", "\n".join(f"caption {i}" for i in range(50)))
    first = load_captions(path, num=10, seed=1)
    assert first == load_captions(path, num=10, seed=1) != load_captions(path, num=10, seed=2)
    assert len(set(first)) == 10 and set(first) <= {f"caption {i}" for i in range(50)}


def test_a_local_datasets_folder(tmp_path):
    folder = tmp_path / "coco_like"
    folder.mkdir()
    write(folder / "validation.csv", "caption,image\n" + "".join(f'"{c}",x.jpg\n' for c in CAPTIONS))
    assert load_captions(str(folder), split="validation") == CAPTIONS
    with pytest.raises(ConfigError, match=r"no 'text' column \(columns: caption, image\)"):
        load_captions(str(folder), column="text")


@pytest.mark.parametrize(
    "name, text, args, expected",
    [
        ("c.csv", "id,text\n1,a\n", {}, "c.csv: no 'caption' column (columns: id, text)"),
        ("c.json", '[{"text": "a"}]', {}, "c.json: no 'caption' column (columns: text)"),
        ("c.json", '{"images": []}', {}, "expected a list of records or COCO's {'annotations': [...]}, found images"),
        ("c.json", '{"annotations": [{"image_id": 1}]}', {}, "c.json annotations: no 'caption' column"),
        ("c.json", "[1, 2", {}, "c.json: cannot read captions"),
        ("c.jsonl", '{"caption": "a"}\n[1]\n', {}, "c.jsonl: expected records with a 'caption' column"),
        ("c.txt", "\n  \n", {}, "c.txt: no captions found"),
        ("c.txt", "a\nb\n", {"num": 3}, "c.txt: asked for num=3 captions but it has 2"),
        ("c.txt", "a\nb\n", {"num": 0}, "asked for num=0 captions"),
    ],
)
def test_bad_caption_files_are_one_line(tmp_path, name, text, args, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_captions(path, **args)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_bad_dataset_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such captions file"):
        load_captions(tmp_path / "missing.txt")
    with pytest.raises(ConfigError) as info:
        load_captions(str(tmp_path / "no-such-folder"))
    assert "cannot load split 'validation'" in str(info.value) and "\n" not in str(info.value)
