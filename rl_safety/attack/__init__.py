"""White-box attacks on erased models (PGD on text embeddings) and the adversarial pool that training uses."""

from .config import AttackConfig
from .pgd import pgd, project
from .run import attack_embeddings, concept_latents, run_attack

__all__ = ["AttackConfig", "attack_embeddings", "concept_latents", "pgd", "project", "run_attack"]
