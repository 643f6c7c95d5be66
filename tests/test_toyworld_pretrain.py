import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rl_safety.errors import ConfigError
from rl_safety.toyworld.data import HELD_OUT_SYNONYMS, make_dataset
from rl_safety.toyworld.pretrain import (
    PretrainConfig,
    build_components,
    build_tokenizer,
    denoising_loss,
    encode_latents,
    main,
    toy_words,
    train_unet,
    train_vae,
    vae_loss,
)

# Tiny widths: these tests check plumbing and learning signals, not image quality.
TINY = dict(vae_channels=(8, 16), unet_channels=(16, 32), unet_heads=2, text_width=16, log_every=1)
TINY_ARGS = "--num_threads 1 --vae_channels 8 16 --unet_channels 16 32 --unet_heads 2 --text_width 16".split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a shared CPU makes more threads much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_toy_word_is_one_token():
    words = toy_words()
    assert {w for pair in HELD_OUT_SYNONYMS.values() for w in pair} <= set(words)
    captions = make_dataset(500, seed=0)["captions"]
    assert {w for c in captions for w in c.split()} <= set(words)
    tokenizer = build_tokenizer(words, max_length=16)
    for word in words:
        ids = tokenizer(word).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
    assert len({tokenizer(w).input_ids[1] for w in words}) == len(words)  # distinct tokens
    assert tokenizer.pad_token_id == tokenizer.eos_token_id < len(tokenizer)
    # Text outside the vocabulary still encodes (byte-level characters), and captions fit max_length.
    assert tokenizer.unk_token_id not in tokenizer("a photo of a dog, 2 cats!").input_ids[1:-1]
    assert max(len(tokenizer(c).input_ids) for c in captions) <= 16


def test_training_steps_decrease_the_losses(tmp_path):
    # A few steps on 8 fixed images: enough to see both losses fall well below their starting values.
    config = PretrainConfig(
        output_dir=str(tmp_path),
        vae_steps=12,
        vae_batch_size=8,
        unet_steps=12,
        batch_size=8,
        warmup_steps=2,
        lr=1e-2,
        vae_lr=1e-2,
        **TINY,
    )
    tokenizer, text_encoder, vae, unet, _ = build_components(config)
    data = make_dataset(8, seed=0)
    images = (data["images"] * 255).round().to(torch.uint8)
    x = images.float() / 127.5 - 1

    def vae_eval() -> float:
        with torch.no_grad():
            return vae_loss(vae, x, config.kl_weight, torch.Generator().manual_seed(0))[0].item()

    before = vae_eval()
    train_vae(vae, images, config, tmp_path / "vae.pt")
    assert vae_eval() < 0.9 * before

    latents = encode_latents(vae, images)
    ids = tokenizer(data["captions"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    z = latents[0].float()

    def unet_eval() -> float:
        with torch.no_grad():
            return denoising_loss(unet, text_encoder, z, ids, torch.Generator().manual_seed(0)).item()

    before = unet_eval()
    ema_unet, _ = train_unet(unet, text_encoder, latents, ids, empty, 1.0, config, tmp_path / "unet.pt")
    assert unet_eval() < 0.9 * before
    assert ema_unet is not unet and not torch.equal(ema_unet.conv_in.weight, unet.conv_in.weight)


def test_pretrain_saves_a_loadable_pipeline_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--num_images", "64", "--vae_steps", "3", "--unet_steps", "2"]
    args += ["--batch_size", "4", "--vae_batch_size", "4", "--save_every", "2", "--log_every", "1", *TINY_ARGS]
    threads = torch.get_num_threads()
    assert main([*args, "--num_threads", str(threads + 1)]) == 0
    # Its thread count is the run's, not the caller's: a later in-process run must not inherit it.
    assert torch.get_num_threads() == threads
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 16 and pipe.vae.config.scaling_factor != 0.18215
    images = pipe(
        ["a red circle", "a ruby cross"],
        num_inference_steps=2,
        guidance_scale=4.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert all(f.suffix != ".bin" for f in (out / "pipeline").rglob("*"))  # safetensors only

    with pytest.raises(ConfigError, match="holds a run .*; pass --resume to continue it"):
        main(args)
    with pytest.raises(ConfigError, match=r"--resume: text_width=32 \(the run's: 16\)"):
        main([*args, "--resume", "--text_width", "32"])
    main([*args, "--unet_steps", "4", "--resume"])  # the later flag wins: 2 more UNet steps
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vae_steps = [m["step"] for m in steps if m["stage"] == "vae"]
    unet_steps = [m["step"] for m in steps if m["stage"] == "unet"]
    assert vae_steps == [1, 2, 3] and unet_steps == [1, 2, 3, 4]  # nothing retrained, continued at step 3
    assert torch.load(out / "unet_checkpoint.pt", weights_only=False)["step"] == 4


def test_interrupted_training_resumes_exactly(tmp_path):
    config = PretrainConfig(output_dir=str(tmp_path), unet_steps=4, batch_size=4, save_every=2, **TINY)
    latents = (torch.randn(16, 4, 16, 16).half(), torch.full((16, 4, 16, 16), 0.01).half())
    ids, empty = torch.randint(0, 500, (16, 16)), torch.full((16,), 7)

    def run(name: str, stop_at: int | None = None) -> dict:
        def export(unet, text_encoder, step):
            if step == stop_at:
                raise KeyboardInterrupt

        _, text_encoder, _, unet, _ = build_components(config)
        try:
            train_unet(unet, text_encoder, latents, ids, empty, 1.0, config, tmp_path / name, export)
        except KeyboardInterrupt:
            _, text_encoder, _, unet, _ = build_components(config)  # a fresh process: new modules
            train_unet(unet, text_encoder, latents, ids, empty, 1.0, config, tmp_path / name, export)
        return torch.load(tmp_path / name, weights_only=False)

    straight, resumed = run("straight.pt"), run("resumed.pt", stop_at=2)
    assert straight["step"] == resumed["step"] == 4
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, msg=name)
