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


def write_prompt_sets(root: str | Path) -> list[Path]:
    """Write `<root>/<concept>/{unsafe,implicit,safe,safe_train}.txt` for every toy-world concept; returns them."""
    written = []
    for concept in CONCEPTS:
        folder = Path(root) / concept
        folder.mkdir(parents=True, exist_ok=True)
        for name, prompts in prompt_sets(concept).items():
            path = folder / f"{name}.txt"
            path.write_text(render_file(name, concept, prompts), encoding="utf-8")
            written.append(path)
    return written
