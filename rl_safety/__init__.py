"""rl_safety: reinforcement-learning post-training that erases harmful concepts from text-to-image diffusion models."""

__version__ = "0.1.0"
