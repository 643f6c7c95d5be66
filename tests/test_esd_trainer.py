"""ESD: the loss is MSE(e_n, e_0 − η (e_c − e_0)) with z sampled by DDIM at start_guidance (checked against diffusers'
scheduler and separate UNet calls), only the adapter learns and the base stays, train_method picks the wrapped
modules, resume is exact, other trainers' fields are refused in one line, and no rewards are needed."""

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from rl_safety.pipelines import add_lora, load_pipeline
from rl_safety.prompts import load_prompts
from rl_safety.train import cli, main, parse_args
from rl_safety.trainers import ESDConfig, ESDTrainer
from rl_safety.trainers.base import adapters_disabled
from rl_safety.trainers.esd_config import TRAIN_METHODS
from tests.conftest import REPO


@pytest.fixture
def concept_file(tmp_path):
    path = tmp_path / "concept.txt"
    path.write_text("# tag: unsafe\na red circle\na red square\n")
    safe = tmp_path / "safe.txt"
    safe.write_text("# tag: safe\na blue square\n")
    return path


def esd_args(model, prompts, out, **overrides) -> list[str]:
    fields = dict(
        trainer="esd",
        pretrained_model_name_or_path=model,
        train_prompts=prompts,
        output_dir=out,
        num_inference_steps=4,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=100,
        report_to="none",
        seed=0,
    )
    fields.update(overrides)
    argv = []
    for key, value in fields.items():
        argv += [f"--{key}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return argv


def build(tiny_sd_path, prompt_files, tmp_path, **overrides) -> ESDTrainer:
    from rl_safety.model_config import ModelArguments
    from rl_safety.prompt_config import PromptArguments

    fields = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        num_inference_steps=4,
        per_device_train_batch_size=2,
        seed=0,
        learning_rate=1e-2,
    )
    fields.update(overrides)
    args = ESDConfig(**fields)
    pipe = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path)))
    dataset = load_prompts(PromptArguments(train_prompts=[str(p) for p in prompt_files]))
    return ESDTrainer(pipe, args, dataset)


def perturb_adapter(model, std=0.05):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def test_loss_is_the_esd_target_computed_by_hand(tiny_sd_path, concept_file, tmp_path):
    eta, start_guidance = 2.0, 3.0
    trainer = build(
        tiny_sd_path, [concept_file], tmp_path, negative_guidance=eta, start_guidance=start_guidance, seed=3
    )
    assert sorted(trainer.train_dataset["prompt"]) == ["a red circle", "a red square"]  # the unsafe rows only
    unet = trainer.model
    perturb_adapter(unet)  # the current model differs from the base, so sampling with it matters
    calls = []
    hook = unet.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    rows = [{"prompt": "a red circle", "tag": "unsafe"}, {"prompt": "a red square", "tag": "unsafe"}]
    loss = trainer.compute_loss(unet, rows)
    hook.remove()
    (z, t), cond = calls[-1][0], calls[-1][1]["encoder_hidden_states"]  # the e_n call

    # z by hand: the same draws (k, then x_T), diffusers' DDIM step, CFG with separate UNet calls.
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    k = int(torch.randint(4, (1,), generator=generator))
    assert trainer._metrics["stop_step"] == [float(k)]
    x = torch.randn((2, *trainer.latent_shape), generator=generator)
    scheduler = DDIMScheduler.from_config(trainer.pipeline.scheduler.config)
    scheduler.set_timesteps(4)
    embed = trainer.prompt_encoder
    c, u = embed([r["prompt"] for r in rows]), embed([""]).expand(2, -1, -1)
    with torch.no_grad():
        for step in scheduler.timesteps[:k]:
            e_u, e_cond = unet(x, step, encoder_hidden_states=u).sample, unet(x, step, encoder_hidden_states=c).sample
            x = scheduler.step(e_u + start_guidance * (e_cond - e_u), step, x, eta=0.0).prev_sample
    torch.testing.assert_close(z, x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cond, c)
    # t inside DDIM step k's interval of the 1000 training timesteps.
    t_k = int(scheduler.timesteps[k])
    assert all(max(t_k - 1000 // 4 + 1, 0) <= int(v) <= t_k for v in t)

    with torch.no_grad(), adapters_disabled(unet):
        e_0 = unet(z, t, encoder_hidden_states=u).sample
        e_c = unet(z, t, encoder_hidden_states=c).sample
    e_n = unet(z, t, encoder_hidden_states=c).sample
    expected = ((e_n - (e_0 - eta * (e_c - e_0))) ** 2).mean()
    assert not torch.allclose(e_n, e_c)  # the adapter is on for e_n, off for e_c
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert loss.requires_grad


def test_only_the_adapter_learns_and_the_base_model_stays(tiny_sd_path, concept_file, tmp_path):
    trainer = build(tiny_sd_path, [concept_file], tmp_path, max_steps=2)
    unet = trainer.model
    perturb_adapter(unet, 0.01)
    rows = [{"prompt": "a red circle", "tag": "unsafe"}] * 2
    trainer.compute_loss(unet, rows).backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for m in (trainer.pipeline.vae, trainer.pipeline.text_encoder) for p in m.parameters())
    unet.zero_grad(set_to_none=True)

    probe = torch.randn(1, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))
    c = trainer.prompt_encoder(["a red circle"])
    with torch.no_grad(), adapters_disabled(unet):
        base_before = unet(probe, 500, encoder_hidden_states=c).sample
    lora_before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}
    frozen_before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" not in n}
    trainer.train()
    assert any(not torch.equal(p, lora_before[n]) for n, p in unet.named_parameters() if "lora" in n)
    assert all(torch.equal(p, frozen_before[n]) for n, p in unet.named_parameters() if "lora" not in n)
    with torch.no_grad(), adapters_disabled(unet):
        torch.testing.assert_close(unet(probe, 500, encoder_hidden_states=c).sample, base_before, rtol=0, atol=0)
    assert trainer.state.log_history[0]["loss/esd"] > 0


def linear_and_conv(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]


EXPECTED = {
    "xattn": lambda n: ".attn2." in n,
    "selfattn": lambda n: ".attn1." in n,
    "noxattn": lambda n: "attn2" not in n and not n.startswith(("time_embedding", "conv_out")),
    "full": lambda n: True,
}


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_train_method_selects_the_wrapped_modules(tiny_sd_path, method, tmp_path):
    from rl_safety.model_config import ModelArguments

    unet = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path))).unet
    candidates = linear_and_conv(unet)
    args = ESDConfig(output_dir=str(tmp_path), train_method=method, report_to="none")
    add_lora(unet, 2, 2.0, args.lora_targets(), seed=0)
    wrapped = sorted(n for n, m in unet.named_modules() if hasattr(m, "lora_A"))
    expected = sorted(n for n in candidates if EXPECTED[method](n))
    assert wrapped == expected and wrapped
    if method == "xattn":
        assert all(n.rsplit(".attn2.", 1)[1] in ("to_q", "to_k", "to_v", "to_out.0") for n in wrapped)
    if method == "noxattn":
        assert not any("attn2" in n or "time_embedding" in n for n in wrapped)
        assert any("resnets" in n for n in wrapped) and any(".attn1." in n for n in wrapped)
    # An explicit lora_target_modules wins over train_method.
    explicit = ESDConfig(output_dir=str(tmp_path), train_method=method, lora_target_modules=["to_q"])
    assert explicit.lora_targets() == ["to_q"]


def test_resume_reproduces_uninterrupted_run(tiny_sd_path, concept_file, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(max_steps=4, save_steps=2, gradient_accumulation_steps=2)
    assert main(esd_args(tiny_sd_path, concept_file, straight, **common)) == 0
    main(esd_args(tiny_sd_path, concept_file, resumed, **common))
    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    main(esd_args(tiny_sd_path, concept_file, resumed, resume_from_checkpoint="last", **common))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora.up" in k or "lora_B" in k)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_bad_fields_are_refused_in_one_line(tiny_sd_path, concept_file, tmp_path, capsys):
    def error(**overrides) -> str:
        assert cli(esd_args(tiny_sd_path, concept_file, tmp_path / "x", **overrides)) == 2
        # Errors found after loading the pipeline follow its progress bars: the error is still one line.
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("rl-safety train: error: "), err
        return err

    assert "'reward_target': not a field of trainer esd (it belongs to trainer refl)" in error(reward_target=1.0)
    assert "not a field of trainer esd (it belongs to trainer grpo)" in error(num_generations=4)
    assert "train_method" in error(train_method="attn") and "'noxattn'" in error(train_method="attn")
    with pytest.raises(ValueError, match="train_method='attn': must be one of xattn, selfattn, noxattn, full"):
        ESDConfig(output_dir=str(tmp_path), train_method="attn")
    assert "negative_guidance=-1.0: must be ≥ 0" in error(negative_guidance=-1.0)
    assert "rewards=" in error(rewards='{"name": "jpeg_incompressibility"}')
    assert "erase_prompts_tag='nudity': no train_prompts row has this tag" in error(erase_prompts_tag="nudity")
    # And the other way round: an ESD field in a GRPO recipe.
    argv = esd_args(
        tiny_sd_path, concept_file, tmp_path / "y", trainer="grpo", negative_guidance=1.0, num_generations=2
    )
    assert cli(argv + ["--rewards", '{"name": "jpeg_incompressibility"}']) == 2
    assert "not a field of trainer grpo (it belongs to trainer esd)" in capsys.readouterr().err


def test_trains_without_rewards(tiny_sd_path, concept_file, tmp_path):
    out = tmp_path / "run"
    assert cli(esd_args(tiny_sd_path, concept_file, out)) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss/esd" in r]
    assert len(steps) == 2
    for key in ("stop_step", "time/sampling", "time/update", "time/step"):
        assert key in steps[0], key
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert "none (this method trains without rewards)" in (out / "README.md").read_text()


def test_recipes_parse_with_their_trainer():
    _, prompt_args, args = parse_args(
        ["--config", str(REPO / "recipes/toyworld/esd_erase_red.yaml"), "--target_concept", "blue"]
    )
    assert isinstance(args, ESDConfig) and args.output_dir.endswith("blue") and not args.rewards
    assert prompt_args.train_prompts == ["prompts/toyworld/blue/unsafe.txt"]
    assert args.lora_targets() == r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)"
    _, prompt_args, sd = parse_args(["--config", str(REPO / "recipes/sd14/esd_nudity.yaml")])
    assert (sd.train_method, sd.negative_guidance, sd.start_guidance, sd.learning_rate) == ("noxattn", 1.0, 3.0, 1e-5)
    assert (sd.max_steps, sd.per_device_train_batch_size, sd.num_inference_steps) == (1000, 1, 50)
    assert (REPO / prompt_args.train_prompts[0]).read_text().strip().splitlines()[-1] == "nudity"
