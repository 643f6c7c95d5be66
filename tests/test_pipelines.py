import pytest
import torch
from diffusers import StableDiffusionPipeline

from rl_safety.model_config import ModelArguments
from rl_safety.pipelines import LORA_WEIGHT_NAME, PromptEncoder, add_lora, load_lora_into, load_pipeline, save_lora


def generate(pipe, seed=0):
    return pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def perturb_adapter(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=g))


# Attention only (GRPO, ReFL, ESD-x), and attention with convolutions and feed-forwards (ESD-u, `full`): a saved file
# that mixed diffusers' old attention key names with PEFT's for the rest lost its attention weights on load.
@pytest.mark.parametrize(
    "targets",
    [
        ["to_q", "to_k", "to_v", "to_out.0"],
        r"conv_in|.*\.(attn1\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.2|conv1|conv2)",
    ],
)
def test_lora_round_trip_through_diffusers(tiny_sd_path, tmp_path, targets):
    pipe = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path)))
    base_images = generate(pipe)
    add_lora(pipe.unet, rank=4, alpha=8.0, target_modules=targets, seed=0)
    torch.testing.assert_close(generate(pipe), base_images)  # a fresh adapter is a no-op
    perturb_adapter(pipe.unet)
    adapted = generate(pipe)
    assert (adapted - base_images).abs().max() > 1e-3  # the adapter matters, so the reload below proves something
    save_lora(pipe.unet, tmp_path)
    assert (tmp_path / LORA_WEIGHT_NAME).is_file()

    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    fresh.scheduler = pipe.scheduler
    fresh.load_lora_weights(tmp_path)
    fresh.set_progress_bar_config(disable=True)
    loaded = {n for n, m in fresh.unet.named_modules() if hasattr(m, "lora_A")}
    assert loaded == {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}  # every adapted module
    torch.testing.assert_close(generate(fresh), adapted)


def test_load_lora_into_restores_weights(tiny_sd_path, tmp_path):
    pipe = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path)))
    add_lora(pipe.unet, rank=4, alpha=4.0, target_modules=["to_q", "to_v"], seed=0)
    perturb_adapter(pipe.unet, seed=1)
    save_lora(pipe.unet, tmp_path)
    trained = {k: v.clone() for k, v in pipe.unet.named_parameters() if "lora" in k}
    other = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path)))
    add_lora(other.unet, rank=4, alpha=4.0, target_modules=["to_q", "to_v"], seed=5)
    load_lora_into(other.unet, tmp_path)
    for name, param in other.unet.named_parameters():
        if "lora" in name:
            torch.testing.assert_close(param, trained[name])


def test_prompt_encoder_encodes_each_prompt_once(tiny_sd_path):
    pipe = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path)))
    calls = []
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    original = encoder._encode
    encoder._encode = lambda prompts: calls.append(list(prompts)) or original(prompts)
    first = encoder(["a", "b", "a", "a"])
    second = encoder(["b", "c"])
    assert calls == [["a", "b"], ["c"]]
    reference = pipe.encode_prompt(["a", "b", "c"], "cpu", 1, False)[0]
    torch.testing.assert_close(first, reference[[0, 1, 0, 0]])
    torch.testing.assert_close(second, reference[[1, 2]])
