"""Toy-world rewards on the shipped attribute classifier: a penalty on the erased concept and prompt fidelity.

`toyworld_concept` is the `classifier` reward with the head and class looked up from the concept's name, so
`target_concept: blue` or `target_concept: circle` needs no other change to a recipe. `toyworld_fidelity` rewards
drawing what the prompt asks for (log-probabilities of the named colour and shape), skipping the erased concept:
on safe prompts it is the preservation term, on unsafe prompts it keeps the shape while the colour goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from rl_safety.resources import resolve_path, tried
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.classifier import load_classifier
from rl_safety.toyworld.data import LABELS, concept_head, named_attributes

from .base import Reward, RewardError
from .classifier import ClassifierReward

DEFAULT_CLASSIFIER = ASSETS / "reward_classifier"


def _load(classifier: str | os.PathLike) -> torch.nn.Module:
    try:
        return load_classifier(resolve_path(classifier, "dir"))  # as given, or a shipped model (resources.py)
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # missing files, bad JSON, mismatched weights
        raise RewardError(
            f"classifier={str(classifier)!r}: not a toy-world classifier folder ({err}){tried(classifier)}"
        ) from err


class ToyConceptPenalty(ClassifierReward):
    """log(1 − p(concept | image)) from the toy world's attribute classifier; 0 when the concept is absent.

    Args: `concept` (a toy-world colour or shape), `output` ('log_one_minus_prob', or 'prob' / 'log_prob' for
    −p / −log p), `classifier` (a toy-world classifier folder).
    """

    def __init__(
        self, concept: str, output: str = "log_one_minus_prob", classifier: str | os.PathLike = DEFAULT_CLASSIFIER
    ):
        try:
            head = concept_head(concept)
        except ValueError as err:
            raise RewardError(str(err).replace("target_concept", "concept")) from err
        super().__init__(
            target_class=concept,
            model=_load(classifier),
            class_names=LABELS[head],
            head=head,
            output=output,
            negate=output != "log_one_minus_prob",  # higher is better either way
        )


@lru_cache(maxsize=4096)
def _label_ids(prompt: str, exclude: frozenset[str]) -> tuple[int, int]:
    """(colour index, shape index) the prompt asks for; −1 where it names none or names an excluded concept."""
    named = named_attributes(prompt)
    ids = []
    for head in ("colour", "shape"):
        value = named.get(head)
        ids.append(LABELS[head].index(value) if value is not None and value not in exclude else -1)
    return ids[0], ids[1]


class ToyPromptFidelity(Reward):
    """log p(named colour) + log p(named shape) per image; attributes in `exclude` or not named count 0.

    Args: `exclude` (concepts not rewarded, e.g. ["{target_concept}"]), `classifier` (a toy-world classifier folder).
    """

    differentiable = True

    def __init__(self, exclude: Sequence[str] = (), classifier: str | os.PathLike = DEFAULT_CLASSIFIER):
        super().__init__()
        if isinstance(exclude, str):
            raise RewardError(f"exclude={exclude!r}: expected a list of concepts, e.g. [red]")
        for concept in exclude:
            try:
                concept_head(concept)
            except ValueError as err:
                raise RewardError(str(err).replace("target_concept", "exclude")) from err
        self.exclude = frozenset(exclude)
        self.model = _load(classifier)

    def train(self, mode: bool = True) -> ToyPromptFidelity:
        super().train(mode)
        self.model.eval()  # a fixed judge
        return self

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        labels = torch.tensor([_label_ids(p, self.exclude) for p in prompts], device=images.device)  # (B, 2)
        out = self.model(images)
        score = torch.zeros(len(prompts), device=images.device)
        for column, head in enumerate(("colour", "shape")):
            wanted = labels[:, column]
            log_probs = F.log_softmax(out[head].float(), dim=1).gather(1, wanted.clamp(min=0)[:, None])[:, 0]
            score = score + torch.where(wanted >= 0, log_probs, torch.zeros_like(log_probs))
        return score
