"""Gaussian diffusion: schedules, respacing, posterior against Bayes' rule, losses, and the DDPM /
DDIM loops (an oracle eps model must land on the data point; the tiny DiffiT must run)."""
import math

import pytest
import torch

from diffit.diffusion import (GaussianDiffusion, create_diffusion, get_named_beta_schedule,
                              space_timesteps)
from diffit.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl


def test_linear_schedule():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert b[500].item() == pytest.approx(1e-4 + 500 / 999 * (0.02 - 1e-4))
    b100 = get_named_beta_schedule("linear", 100)                   # scaled by 1000 / T
    assert b100[0].item() == pytest.approx(1e-3) and b100[-1].item() == pytest.approx(0.2)


def test_cosine_schedule():
    T = 50
    b = get_named_beta_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = torch.cumprod(1 - b, 0)
    for t in (0, 10, 30, 48):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert b.max().item() <= 0.999
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_space_timesteps():
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999 and s == sorted(set(s))
    assert max(b - a for a, b in zip(s, s[1:])) <= 5
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    two = space_timesteps(100, "10,5")
    assert len(two) == 15 and all(t < 50 for t in two[:10]) and all(t >= 50 for t in two[10:])
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")


def test_respacing_keeps_abar_and_maps_timesteps():
    base = create_diffusion(None)
    d = create_diffusion("25")
    keep = space_timesteps(1000, "25")
    assert d.num_timesteps == 25 and d.timestep_map.tolist() == keep
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[keep])


def test_q_sample_and_posterior_against_bayes():
    d = create_diffusion(None, noise_schedule="cosine")
    x0, xt, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = torch.tensor([0, 7, 999])
    abar = d.alphas_cumprod[t].float().view(-1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise),
                               abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    mean, var, log_var = d.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()[1:], start=1):  # t = 0 has a zero-variance posterior
        a = 1 - d.betas[ti].item()
        ap = d.alphas_cumprod[ti - 1].item()
        prec = a / d.betas[ti].item() + 1 / (1 - ap)     # q(x_t|x_t-1) q(x_t-1|x_0)
        m = (math.sqrt(a) * xt[i] / d.betas[ti].item() + math.sqrt(ap) * x0[i] / (1 - ap)) / prec
        torch.testing.assert_close(mean[i], m, rtol=1e-4, atol=1e-5)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-5)
        assert log_var[i].item() == pytest.approx(math.log(1 / prec), rel=1e-5)
    torch.testing.assert_close(mean[0], x0[0])                      # x_{-1} = x_0 exactly


def test_gaussian_helpers():
    m, lv = torch.randn(5), torch.randn(5)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-6
    kl = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))
    assert kl.item() == pytest.approx(0.5)
    bins = torch.linspace(-1, 1, 256)
    for mu, ls in ((0.3, -2.0), (0.95, -6.0), (-0.99, -7.0), (0.0, 1.0)):
        p = discretized_gaussian_log_likelihood(bins, torch.full((256,), mu),
                                                torch.full((256,), ls)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_learned_range_variance():
    d = create_diffusion(None)
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([10, 500])
    for v, name in ((1.0, "log_betas"), (-1.0, "post_log_var")):
        out = torch.cat([torch.randn_like(x), torch.full_like(x, v)], 1)
        dist = d.output_to_distribution(out, x, t)
        want = torch.log(d.betas[t]) if v == 1 else torch.log(
            d.betas[t] * (1 - d.alphas_cumprod[t - 1]) / (1 - d.alphas_cumprod[t]))
        torch.testing.assert_close(dist["log_variance"][:, 0, 0, 0], want.float())


class Oracle:
    """eps(x_t, t) of the data distribution concentrated on x_star; v = -1 (posterior var)."""

    def __init__(self, base, x_star, learn_sigma=True):
        self.abar, self.x_star, self.learn_sigma = base.alphas_cumprod, x_star, learn_sigma
        self.calls = []

    def __call__(self, x, t, **kw):
        self.calls.append(t.clone())
        a = self.abar[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x_star) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(x)], 1) if self.learn_sigma else eps


@pytest.mark.parametrize("respacing,sampler", [("20", "ddpm"), ("ddim10", "ddim"),
                                               ("ddim10", "ddim-eta1")])
def test_sampling_loops_reach_the_data_point(respacing, sampler):
    base = create_diffusion(None)
    d = create_diffusion(respacing)
    x_star = torch.rand(1, 3, 4, 4) * 2 - 1
    model = Oracle(base, x_star)
    g = torch.Generator().manual_seed(0)
    if sampler == "ddpm":
        out = d.p_sample_loop(model, (2, 3, 4, 4), generator=g, progress=True)
    else:
        out = d.ddim_sample_loop(model, (2, 3, 4, 4), generator=g,
                                 eta=1.0 if sampler.endswith("eta1") else 0.0)
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
    torch.testing.assert_close(out, x_star.expand(2, -1, -1, -1), rtol=1e-3, atol=1e-3)
    # one model call per respaced step, each with the original timestep value, descending
    assert len(model.calls) == d.num_timesteps
    assert [c[0].item() for c in model.calls] == d.timestep_map.flip(0).tolist()


def test_training_losses_oracle_and_gradient_routing():
    d = create_diffusion(None)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([1, 20, 500, 999])
    noise = torch.randn_like(x0)
    a = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)

    def perfect(x, tt, **kw):    # exact eps for this x0 and the posterior variance
        return torch.cat([(x - a.sqrt() * x0) / (1 - a).sqrt(), -torch.ones_like(x)], 1)

    terms = d.training_losses(perfect, x0, t, noise=noise)
    assert terms["mse"].abs().max() < 1e-6 and terms["vb"].abs().max() < 1e-4
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    out = torch.randn(4, 6, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, tt, **kw: out, x0, t, noise=noise)
    assert (terms["vb"] > 0).all()
    (g,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert g[:, :3].abs().max() == 0 and g[:, 3:].abs().max() > 0    # vb trains only sigma
    (g,) = torch.autograd.grad(d.training_losses(lambda x, tt, **kw: out, x0, t, noise=noise)
                               ["mse"].sum(), out)
    assert g[:, 3:].abs().max() == 0
    t0 = d.training_losses(lambda x, tt, **kw: out, x0, torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(t0["vb"]).all() and (t0["vb"] > 0).all()    # decoder NLL at t = 0


@pytest.mark.parametrize("var", ["fixed_small", "fixed_large"])
def test_fixed_variance(var):
    base = get_named_beta_schedule("linear", 50)
    d = GaussianDiffusion(base, model_var_type=var)
    x_star = torch.rand(1, 2, 2, 2)
    model = Oracle(create_diffusion(None, diffusion_steps=50), x_star, learn_sigma=False)
    out = d.p_sample_loop(model, (1, 2, 2, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x_star, rtol=1e-3, atol=1e-3)
    terms = d.training_losses(model, x_star, torch.tensor([3]))
    assert set(terms) == {"loss", "mse"} and terms["mse"].item() < 1e-6


def test_tiny_diffit_guided_sampling():
    from diffit.latent import DiffiT, preset_config

    model = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, backend="torch")).eval()
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.05)
    d = create_diffusion("4")
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([3, 10])
    kw = dict(y=y, cfg_scale=4.0)
    out = d.p_sample_loop(model.forward_with_cfg, z.shape, noise=torch.cat([z[:1], z[:1]]),
                          model_kwargs=kw, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    out2 = d.ddim_sample_loop(model.forward_with_cfg, z.shape, noise=z, model_kwargs=kw)
    assert torch.isfinite(out2).all()
    terms = d.training_losses(model, torch.randn(2, 4, 8, 8), torch.tensor([0, 3]),
                              model_kwargs={"y": torch.tensor([1, 2])})
    assert torch.isfinite(terms["loss"]).all()
