"""Adversarial training (RACE): adversarial embeddings of the concept prompts, found by PGD against the current
policy every `refresh_steps` optimizer steps, that replace a share of the concept prompts' embeddings in training.

The pool is a function of (seed, refresh step, policy weights): two runs from one seed build the same pools, and a
checkpoint holds the pool in use, so a resumed run trains on what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .run import attack_embeddings

POOL_NAME = "adversarial_pool.safetensors"
ADVERSARIAL_TAG = "adversarial"


class AdversarialPool:
    """One adversarial embedding per concept prompt, refreshed against the policy.

    Args:
        prompts: the concept prompts (each gets its own embedding).
        clean: (P, L, D) their text-encoder outputs.
        concept_latents: (P, K, C, h, w) latents of concept images drawn by the base model (the RACE objective's
            targets; see `rl_safety.attack.objectives`).
        epsilon, step_size, num_steps, objective: PGD's settings.
        refresh_steps: optimizer steps between refreshes.
        share: probability that a concept prompt's row uses its adversarial embedding at a given step.
        seed: seeds every refresh (with the step) and the choice of rows.
        start_step: the first optimizer step that uses (and refreshes) the pool.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        clean: torch.Tensor,
        concept_latents: torch.Tensor,
        *,
        epsilon: float,
        step_size: float,
        num_steps: int,
        objective: str,
        refresh_steps: int,
        share: float,
        seed: int,
        start_step: int = 0,
    ):
        self.prompts = list(prompts)
        self.index = {prompt: i for i, prompt in enumerate(self.prompts)}
        self.clean, self.concept_latents = clean, concept_latents
        self.epsilon, self.step_size, self.num_steps, self.objective = epsilon, step_size, num_steps, objective
        self.refresh_steps, self.share, self.seed, self.start_step = refresh_steps, share, seed, start_step
        self.embeddings = clean.clone()
        self.refreshed_at: int | None = None
        self.last_loss = float("nan")

    def active(self, step: int) -> bool:
        """Adversarial rows are used from `start_step` on (RACE hardens a model that already erases the concept)."""
        return step >= self.start_step

    def due(self, step: int) -> bool:
        """A refresh happens at start_step, start_step + refresh_steps, ... (once per step)."""
        if not self.active(step) or self.refreshed_at == step:
            return False
        return self.refreshed_at is None or (step - self.start_step) % self.refresh_steps == 0

    def refresh(
        self, unet: torch.nn.Module, scheduler, step: int, base_unet_context: Callable = contextlib.nullcontext
    ) -> None:
        """PGD against `unet` as it is now, seeded from (seed, step)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        self.embeddings, losses = attack_embeddings(
            unet,
            scheduler,
            self.clean,
            self.concept_latents,
            objective=self.objective,
            epsilon=self.epsilon,
            step_size=self.step_size,
            num_steps=self.num_steps,
            generator=generator,
            base_unet_context=base_unet_context,
        )
        self.refreshed_at = step
        self.last_loss = losses.mean().item()

    def chosen(self, prompt: str, step: int) -> bool:
        """Whether `prompt`'s rows use the adversarial embedding at `step`: a hash, so every process and every
        rollout of the step agree without communicating."""
        if prompt not in self.index:
            return False
        draw = zlib.crc32(f"{self.seed}:{step}:{prompt}".encode()) / 2**32
        return draw < self.share

    def apply(
        self, prompts: Sequence[str], tags: Sequence[str], cond: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, list[str]]:
        """`cond` with the chosen rows replaced by their adversarial embeddings, and their tags set to
        'adversarial' (the rewards see the prompt text unchanged)."""
        rows = [i for i, prompt in enumerate(prompts) if self.chosen(prompt, step)]
        tags = list(tags)
        if not rows:
            return cond, tags
        cond = cond.clone()
        picks = torch.tensor([self.index[prompts[i]] for i in rows])
        cond[torch.tensor(rows, device=cond.device)] = self.embeddings[picks.to(self.embeddings.device)].to(cond)
        for i in rows:
            tags[i] = ADVERSARIAL_TAG
        return cond, tags

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / POOL_NAME
        tmp = path.with_name(f".{POOL_NAME}.tmp")
        meta = {"refreshed_at": str(self.refreshed_at), "last_loss": repr(self.last_loss)}
        save_file({"embeddings": self.embeddings.contiguous().cpu()}, str(tmp), metadata=meta)
        tmp.replace(path)

    def load(self, folder: str | Path) -> bool:
        """Restore the pool saved in a checkpoint folder; False when it holds none."""
        path = Path(folder) / POOL_NAME
        if not path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        self.embeddings = load_file(str(path))["embeddings"].to(self.clean)
        self.refreshed_at = None if meta["refreshed_at"] == "None" else int(meta["refreshed_at"])
        self.last_loss = float(meta["last_loss"])
        return True
