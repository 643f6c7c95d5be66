"""rl_safety: reinforcement-learning post-training that erases harmful concepts from text-to-image diffusion models."""

__version__ = "0.1.0"

_EXPORTS = {
    "DiffusionGRPOConfig": "rl_safety.trainers.grpo_config",
    "DiffusionGRPOTrainer": "rl_safety.trainers.grpo",
    "ReFLConfig": "rl_safety.trainers.refl_config",
    "ReFLTrainer": "rl_safety.trainers.refl",
    "ESDConfig": "rl_safety.trainers.esd_config",
    "ESDTrainer": "rl_safety.trainers.esd",
    "ModelArguments": "rl_safety.model_config",
    "PromptArguments": "rl_safety.prompt_config",
    "load_pipeline": "rl_safety.pipelines",
    "load_prompts": "rl_safety.prompts",
    "RewardStack": "rl_safety.rewards",
}


def __getattr__(name: str):
    # Imported on first use: `import rl_safety` stays cheap for the CLI and for reward plugins.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rl_safety' has no attribute {name!r}")


__all__ = list(_EXPORTS)
