import pytest
import torch
from diffusers import DDIMScheduler

from rl_safety.sampling import ddim_std, ddim_step, ddim_step_with_logprob, gaussian_kl
from rl_safety.tiny_pipeline import SD_SCHEDULER_CONFIG


def scheduler(steps=10, **overrides):
    s = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, **overrides})
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize(
    "overrides",
    [{}, {"prediction_type": "v_prediction"}, {"prediction_type": "sample"}, {"clip_sample": True}],
    ids=["epsilon", "v_prediction", "sample", "clip_sample"],
)
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_step_matches_diffusers(overrides, eta):
    sched = scheduler(**overrides)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        sample, model_output, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
        ours = ddim_step_with_logprob(sched, model_output, t, sample, eta, noise=noise)
        ref = sched.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"prediction_type": "v_prediction"}, {"prediction_type": "sample"}],
    ids=["epsilon", "v_prediction", "sample"],
)
def test_deterministic_step_and_predicted_x0_match_diffusers(overrides):
    """ReFL's path: eta = 0 steps and the predicted x0 its reward is computed on."""
    sched = scheduler(**overrides)
    g = torch.Generator().manual_seed(4)
    for t in sched.timesteps:
        sample, model_output = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(2))
        ours = ddim_step(sched, model_output, t, sample, 0.0)
        ref = sched.step(model_output, t, sample, eta=0.0)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.pred_original_sample, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        assert ours.log_prob is None


def test_log_prob_is_normal_density_mean_over_dims():
    sched = scheduler()
    g = torch.Generator().manual_seed(1)
    sample, model_output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = sched.timesteps[3]
    out = ddim_step_with_logprob(sched, model_output, t, sample, 1.0, generator=g)
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ref)
    # Re-scoring the stored transition gives the same log-prob (the update phase's path).
    again = ddim_step_with_logprob(sched, model_output, t, sample, 1.0, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob)


def test_per_sample_timesteps_equal_separate_calls():
    sched = scheduler()
    g = torch.Generator().manual_seed(2)
    sample, model_output, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    timesteps = sched.timesteps[[0, 4, 9]]
    batched = ddim_step_with_logprob(sched, model_output, timesteps, sample, 1.0, noise=noise)
    for i, t in enumerate(timesteps):
        single = ddim_step_with_logprob(
            sched, model_output[i : i + 1], t, sample[i : i + 1], 1.0, noise=noise[i : i + 1]
        )
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)


def test_std_matches_scheduler_variance():
    sched = scheduler()
    prev = sched.timesteps - sched.config.num_train_timesteps // sched.num_inference_steps
    ref = torch.stack([sched._get_variance(t, p).sqrt() * 0.7 for t, p in zip(sched.timesteps, prev)])
    torch.testing.assert_close(ddim_std(sched, sched.timesteps, 0.7), ref.float())


def test_gaussian_kl_closed_form():
    g = torch.Generator().manual_seed(3)
    mean, ref_mean = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    std = torch.full((2, 1, 1, 1), 0.3)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)),
        torch.distributions.Normal(ref_mean, std.expand_as(mean)),
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, std), expected)


def test_thresholding_is_refused():
    sched = scheduler(thresholding=True)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="thresholding"):
        ddim_step_with_logprob(sched, x, sched.timesteps[0], x, 1.0)
