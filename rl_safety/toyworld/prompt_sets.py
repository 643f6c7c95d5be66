"""The safety scenario's prompt sets for one target concept, written to `prompts/toyworld/<concept>/`.

- `unsafe.txt`: every caption naming the concept by its plain word (what erasure trains and is measured on);
- `implicit.txt`: the same captions with the colour's synonyms (the model knows them, erasure never trains on them:
  the toy world's counterpart of I2P's implicit prompts); empty for shapes, which have no synonyms;
- `safe.txt`: every caption not naming the concept (preservation is measured on these);
- `safe_train.txt`: the short "a {colour} {shape}" captions of `safe.txt`, so that training batches are mostly
  unsafe prompts (where the signal is) while the preservation term still sees every other colour and shape.

The files are generated (`rl-safety toyworld prompts`) and shipped; a test keeps them equal to this code.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from ..outputs import atomic_write_text
from .data import BACKGROUNDS, COLOURS, CONCEPTS, SHAPES, SIZES, SYNONYMS, TEMPLATES, concept_head

TAGS = {"unsafe": "unsafe", "implicit": "unsafe", "safe": "safe", "safe_train": "safe"}


def captions(colour_words: list[str], shapes: list[str], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every template filled with every colour word, shape, size and background it uses, without duplicates."""
    out: dict[str, None] = {}
    for template, word, shape in itertools.product(templates, colour_words, shapes):
        sizes = SIZES if "{size}" in template else ("",)
        backgrounds = BACKGROUNDS if "{background}" in template else ("",)
        for size, background in itertools.product(sizes, backgrounds):
            out[template.format(colour=word, shape=shape, size=size, background=background)] = None
    return list(out)


def prompt_sets(concept: str) -> dict[str, list[str]]:
    """{"unsafe", "implicit", "safe", "safe_train"} prompt lists for erasing `concept` (a colour or shape)."""
    if concept_head(concept) == "colour":
        unsafe, safe = ([concept], list(SHAPES)), ([c for c in COLOURS if c != concept], list(SHAPES))
        implicit = captions(list(SYNONYMS[concept]), list(SHAPES))
    else:
        unsafe, safe = (list(COLOURS), [concept]), (list(COLOURS), [s for s in SHAPES if s != concept])
        implicit = []
    return {
        "unsafe": captions(*unsafe),
        "implicit": implicit,
        "safe": captions(*safe),
        "safe_train": captions(*safe, templates=TEMPLATES[:1]),
    }


def render_file(name: str, concept: str, prompts: list[str]) -> str:
    header = [f"# tag: {TAGS[name]}", f"# {name} prompts for target_concept={concept} (rl-safety toyworld prompts)"]
    return "\n".join(header + prompts) + "\n"


def prompt_files(root: str | Path) -> dict[Path, str]:
    """`<root>/<concept>/{unsafe,implicit,safe,safe_train}.txt` for every toy-world concept, with their text."""
    return {
        Path(root) / concept / f"{name}.txt": render_file(name, concept, prompts)
        for concept in CONCEPTS
        for name, prompts in prompt_sets(concept).items()
    }


def changed_prompt_files(root: str | Path) -> list[Path]:
    """The prompt files under `root` that exist and differ from what `write_prompt_sets` would write."""
    changed = []
    for path, text in prompt_files(root).items():
        if path.is_file():
            try:
                same = path.read_text(encoding="utf-8") == text
            except (OSError, UnicodeDecodeError):
                same = False
            if not same:
                changed.append(path)
    return changed


def blocked_prompt_paths(root: str | Path) -> list[Path]:
    """Where a prompt file cannot be written: the path is a folder, or its concept folder is a file."""
    paths = prompt_files(root)
    return [p for p in paths if (p.exists() and not p.is_file()) or (p.parent.exists() and not p.parent.is_dir())]


def write_prompt_sets(root: str | Path) -> list[Path]:
    """Write `<root>/<concept>/{unsafe,implicit,safe,safe_train}.txt` for every toy-world concept (each file
    atomically); returns them."""
    written = []
    for path, text in prompt_files(root).items():
        atomic_write_text(path, text)
        written.append(path)
    return written
