"""Which diffusion checkpoint to start from."""

from __future__ import annotations

from dataclasses import dataclass, field

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelArguments:
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A diffusers Stable Diffusion checkpoint (SD 1.x/2.x family): a Hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5' or a local directory saved with `save_pretrained`."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to load."})
    variant: str | None = field(
        default=None, metadata={"help": "Weight file variant to load, e.g. 'fp16' for `*.fp16.safetensors`."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the frozen components (VAE, text encoder, base UNet). LoRA weights are always float32. "
            "'auto' means float32.",
            "choices": list(TORCH_DTYPES),
        },
    )

    def __post_init__(self):
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
