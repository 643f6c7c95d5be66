"""The attack: PGD's ε-ball and its optimum on a closed form, the two objectives against hand computations, the
command's report and embeddings, and the adversarial pool's reproducibility."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from rl_safety.attack.objectives import attack_loss
from rl_safety.attack.pgd import embedding_bounds, pgd, project
from rl_safety.attack.pool import AdversarialPool
from rl_safety.attack.run import cli
from rl_safety.pipelines import PromptEncoder

from .conftest import REPO


def test_project_holds_the_ball_and_the_clean_range():
    clean = torch.randn(3, 4, 5)
    far = clean + 10 * torch.randn(3, 4, 5)
    bounds = embedding_bounds(clean)
    out = project(far, clean, 0.2, bounds)
    assert (out - clean).abs().max() <= 0.2 + 1e-6
    assert (out.flatten(1).min(1).values >= bounds[:, 0] - 1e-6).all()
    assert (out.flatten(1).max(1).values <= bounds[:, 1] + 1e-6).all()
    inside = clean + 0.05
    assert torch.equal(project(inside, clean, 0.2, None), inside)


def test_pgd_reaches_the_corner_of_the_ball_on_a_quadratic():
    """min ‖e − target‖² with the target outside the ball: the optimum is clean + ε·sign(target − clean), which
    signed steps of ε/4 reach from any start in the ball within 8 steps."""
    clean = torch.randn(2, 3, 4)
    target = clean + torch.where(torch.rand(2, 3, 4) > 0.5, 3.0, -3.0)

    def loss(e, step):
        return (e - target).pow(2).flatten(1).sum(1)

    adversarial, losses = pgd(loss, clean, 0.5, 0.125, 10, torch.Generator().manual_seed(0), clamp_to_range=False)
    torch.testing.assert_close(adversarial, clean + 0.5 * (target - clean).sign())
    assert losses.shape == (2,)


@pytest.fixture
def tiny(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    return pipe.unet.requires_grad_(False), scheduler, encoder(["a red circle", "a red square"])


def test_race_objective_is_the_denoising_error_on_concept_latents(tiny):
    unet, scheduler, clean = tiny
    latents = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    loss = attack_loss(
        "race", unet, scheduler, latents, clean, torch.Generator().manual_seed(7), contextlib.nullcontext
    )
    value = loss(clean + 0.1, 0)

    generator = torch.Generator().manual_seed(7)  # the same draws, by hand
    t = torch.randint(scheduler.config.num_train_timesteps, (2,), generator=generator)
    noise = torch.randn((2, 4, 4, 4), generator=generator)
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents[:, 0] + (1 - alpha).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=clean + 0.1).sample
    torch.testing.assert_close(value, (pred - noise).pow(2).mean((1, 2, 3)))


def test_unlearndiff_objective_is_zero_at_the_clean_prompt_of_the_base_model(tiny):
    unet, scheduler, clean = tiny
    latents = torch.randn(2, 2, 4, 4, 4)
    entered = []

    @contextlib.contextmanager
    def base():
        entered.append(True)
        yield

    loss = attack_loss("unlearndiff", unet, scheduler, latents, clean, torch.Generator().manual_seed(0), base)
    assert loss(clean, 0).abs().max() < 1e-10 and entered  # attacked model = base here: target met exactly
    assert (loss(clean + 0.5, 1) > 0).all()


def test_attack_objective_must_be_known(tiny):
    unet, scheduler, clean = tiny
    with pytest.raises(ValueError, match="objective='pez'"):
        attack_loss("pez", unet, scheduler, torch.zeros(2, 1, 4, 4, 4), clean, torch.Generator(), None)


def _pool(clean, latents, seed):
    return AdversarialPool(
        ["a red circle", "a red square"],
        clean,
        latents,
        epsilon=0.3,
        step_size=0.075,
        num_steps=3,
        objective="race",
        refresh_steps=2,
        share=0.5,
        seed=seed,
    )


def test_pool_refresh_is_reproducible_from_the_seed_and_survives_a_checkpoint(tiny, tmp_path):
    unet, scheduler, clean = tiny
    latents = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    a, b, c = _pool(clean, latents, 0), _pool(clean, latents, 0), _pool(clean, latents, 1)
    for pool in (a, b, c):
        assert pool.due(0)
        pool.refresh(unet, scheduler, 0)
        assert not pool.due(0) and not pool.due(1) and pool.due(2)
    assert torch.equal(a.embeddings, b.embeddings) and not torch.equal(a.embeddings, c.embeddings)
    assert (a.embeddings - clean).abs().max() <= 0.3 + 1e-6 and not torch.equal(a.embeddings, clean)

    a.save(tmp_path)
    restored = _pool(clean, latents, 0)
    assert restored.load(tmp_path) and torch.equal(restored.embeddings, a.embeddings) and restored.refreshed_at == 0
    assert not _pool(clean, latents, 0).load(tmp_path / "missing")


def test_pool_swaps_chosen_concept_rows_and_tags_them(tiny):
    unet, scheduler, clean = tiny
    pool = _pool(clean, torch.zeros(2, 1, 4, 4, 4), 0)
    pool.embeddings = clean + 1.0
    prompts = ["a red circle"] * 2 + ["a blue square"] * 2 + ["a red square"] * 2
    cond = torch.zeros(6, *clean.shape[1:])
    chosen = {p: pool.chosen(p, 4) for p in prompts}
    out, tags = pool.apply(prompts, ["unsafe", "unsafe", "safe", "safe", "unsafe", "unsafe"], cond, 4)
    assert not chosen["a blue square"]  # not a concept prompt
    for i, prompt in enumerate(prompts):
        if chosen[prompt]:
            assert tags[i] == "adversarial" and torch.equal(out[i], pool.embeddings[pool.index[prompt]])
        else:
            assert tags[i] != "adversarial" and torch.equal(out[i], cond[i])
    # Over many steps about `share` of the steps use a prompt's adversarial embedding.
    share = sum(pool.chosen("a red circle", step) for step in range(400)) / 400
    assert 0.4 < share < 0.6


def test_attack_command_writes_report_and_embeddings_inside_the_ball(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "attack"
    argv = ["--config", "recipes/toyworld/attack.yaml", "--output_dir", str(out), "--max_prompts", "3"]
    argv += ["--pgd_num_step", "2", "--seeds", "1000", "--num_inference_steps", "4", "--epsilon", "0.2"]
    assert cli(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_prompts"] == 3 and report["protocol"]["epsilon"] == 0.2
    assert report["protocol"]["pgd_step_size"] == 0.05 and report["protocol"]["objective"] == "race"
    base = report["models"]["base"]
    assert len(base["per_prompt"]) == 3 and base["clean_rate"]["n"] == 3
    assert report["attack_success_rate"] == base["attack_success_rate"]
    saved = load_file(out / "adversarial_embeddings.safetensors")["base"]
    pipe = StableDiffusionPipeline.from_pretrained(REPO / "rl_safety/toyworld/assets/pipeline", safety_checker=None)
    prompts = [entry["prompt"] for entry in base["per_prompt"]]
    clean = PromptEncoder(pipe.tokenizer, pipe.text_encoder)(prompts)
    assert (saved - clean).abs().max() <= 0.2 + 1e-5 and (saved - clean).abs().max() > 0
    assert (out / "report.html").is_file()
    assert cli(argv) == 2 and "holds a report" in capsys.readouterr().err  # no silent overwrite


def test_attack_recipe_parses_for_every_concept():
    from rl_safety.attack.run import parse_args
    from rl_safety.toyworld.data import CONCEPTS

    for concept in CONCEPTS:
        config = parse_args(["--config", str(REPO / "recipes/toyworld/attack.yaml"), "--target_concept", concept])
        assert config.prompts == f"prompts/toyworld/{concept}/unsafe.txt" and (REPO / config.prompts).is_file()
        assert config.pgd_step_size == config.epsilon / 4


def test_pool_waits_for_its_start_step(tiny):
    unet, scheduler, clean = tiny
    pool = AdversarialPool(
        ["a red circle"],
        clean[:1],
        torch.zeros(1, 1, 4, 4, 4),
        epsilon=0.3,
        step_size=0.075,
        num_steps=1,
        objective="race",
        refresh_steps=5,
        share=1.0,
        seed=0,
        start_step=7,
    )
    assert not pool.active(6) and not pool.due(0) and not pool.due(5)
    assert pool.active(7) and pool.due(7)
    pool.refresh(unet, scheduler, 7)
    assert not pool.due(8) and not pool.due(10) and pool.due(12)  # every 5 steps counted from the start


def test_the_gpu_attack_recipe_parses():
    from rl_safety.attack.run import parse_args

    config = parse_args(["--config", str(REPO / "recipes/sd14/attack_nudity.yaml")])
    assert config.detector == "nudenet" and config.pgd_num_step == 20 and config.epsilon == 0.1
    assert config.pretrained_model_name_or_path == "CompVis/stable-diffusion-v1-4"


def test_an_interrupted_attack_continues_with_the_next_model_and_ends_with_the_same_report(tmp_path, monkeypatch):
    import rl_safety.attack.run as attack

    from .test_toyworld_eval import save_adapter

    adapters = [tmp_path / "perturbed", tmp_path / "strong"]
    save_adapter(adapters[0], 0.5)
    save_adapter(adapters[1], 1.0)
    argv = ["--config", str(REPO / "recipes/toyworld/attack.yaml"), "--max_prompts", "2", "--pgd_num_step", "1"]
    argv += ["--seeds", "1000", "--num_inference_steps", "3", "--device", "cpu", "--adapter", *map(str, adapters)]
    real, calls = attack.attack_model, []

    def interrupted(*args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the second model is attacked
        calls.append(1)
        return real(*args, **kwargs)

    out = tmp_path / "attack"
    monkeypatch.setattr(attack, "attack_model", interrupted)
    assert cli([*argv, "--output_dir", str(out)]) == 130
    assert not (out / "report.json").exists() and len(list((out / "cache").glob("*.safetensors"))) == 1

    calls.clear()
    monkeypatch.setattr(attack, "attack_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli([*argv, "--output_dir", str(out)]) == 0
    assert len(calls) == 1  # only the model the interrupted run had not finished
    assert cli([*argv, "--output_dir", str(tmp_path / "fresh")]) == 0
    resumed, fresh = (json.loads((folder / "report.json").read_text()) for folder in (out, tmp_path / "fresh"))
    assert resumed["models"] == fresh["models"]
    assert torch.equal(
        *(load_file(folder / "adversarial_embeddings.safetensors")["strong"] for folder in (out, tmp_path / "fresh"))
    )
    # A changed adapter is a new key: its attack runs again, the other one is reused.
    save_adapter(adapters[1], 0.8)
    calls.clear()
    assert cli([*argv, "--output_dir", str(out), "--overwrite_output_dir"]) == 0
    assert len(calls) == 1
