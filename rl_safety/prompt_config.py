"""Which prompts to train on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PromptArguments:
    train_prompts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Prompt sources: '.txt' files (one prompt per line, '#' comments, an optional '# tag: <tag>' "
            "header line), '.csv'/'.json'/'.jsonl'/'.parquet' files, or `datasets` Hub ids, each with a prompt column "
            "and an optional tag column."
        },
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt text."})
    tag_column: str = field(
        default="tag", metadata={"help": "Column holding each prompt's tag (e.g. 'unsafe', 'safe'), if present."}
    )
    default_tag: str = field(default="default", metadata={"help": "Tag of prompts whose source gives none."})
    target_concept: str | None = field(
        default=None,
        metadata={
            "help": "The concept to erase, e.g. 'nudity', or a toy-world colour or shape such as 'red'. Every "
            "'{target_concept}' in train_prompts, output_dir and reward args is replaced by it."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to read from Hub datasets."})
