"""EDM (diffit.diffusion.edm): preconditioning identities, the loss, the sigma schedule and the Heun
sampler, checked against the exact denoiser of a Gaussian data distribution.

For data y ~ N(mu, s^2) per element, x = y + sigma n is N(mu, s^2 + sigma^2) and the ideal denoiser
is the posterior mean D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), with posterior variance
s^2 sigma^2 / (s^2 + sigma^2). The probability-flow ODE then maps N(mu, s^2 + sigma_max^2) to
N(mu, s^2) exactly, so a correct sampler must reproduce the data's mean and variance.
"""
import io
import math
import sys

import pytest
import torch
from torch import nn

from diffit.augment import AugmentPipe
from diffit.diffusion.edm import (SIGMA_DATA, EDMLoss, EDMPrecond, edm_sigma_steps,
                                  guided_denoiser, heun_sampler)

# three channels with different means and stds (one equal to sigma_data)
MU = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64).view(1, 3, 1, 1)


def gaussian_denoiser(mu=MU, std=STD):
    def D(x, sigma, y=None):
        s2 = std ** 2
        sig = sigma.to(torch.float64).view(-1, 1, 1, 1)
        return (mu + s2 / (s2 + sig ** 2) * (x.to(torch.float64) - mu)).to(torch.float32)

    return D


# ---- preconditioning ------------------------------------------------------------------------
def test_preconditioning_identities():
    """The c_* make the network's input and its effective target unit-variance (EDM sec. 5)."""
    pre = EDMPrecond(nn.Identity(), sigma_data=SIGMA_DATA)
    sigma = torch.logspace(-3, 2, 41, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    sd2 = SIGMA_DATA ** 2
    one = torch.ones_like(sigma)
    # Var(c_in x) = 1 for x = y + n with Var(y) = sd^2
    torch.testing.assert_close(c_in ** 2 * (sd2 + sigma ** 2), one)
    # Var of the effective target (y - c_skip x) / c_out = 1
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd2 + c_skip ** 2 * sigma ** 2) / c_out ** 2, one)
    # the loss weight cancels c_out^2: the F-space loss is unit-weighted at every sigma
    torch.testing.assert_close(EDMLoss().weight(sigma) * c_out ** 2, one)
    torch.testing.assert_close(c_noise, sigma.log() / 4)


class _Recorder(nn.Module):
    """F(x, c_noise, y) = 2 x + c_noise, remembering what it was called with."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, c_noise, y):
        self.seen = (x, c_noise, y)
        return self.w * x + c_noise.view(-1, 1, 1, 1)


def test_precond_calls_model_with_scaled_input_and_noise_label():
    net = _Recorder()
    pre = EDMPrecond(net)
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    y = torch.tensor([0, 1, 2])
    out = pre(x, sigma, y)
    sd2 = SIGMA_DATA ** 2
    s = sigma.view(-1, 1, 1, 1)
    c_in = 1 / (s ** 2 + sd2).sqrt()
    torch.testing.assert_close(net.seen[0], c_in * x)
    torch.testing.assert_close(net.seen[1], sigma.log() / 4)
    assert net.seen[2] is y
    F_x = 2 * c_in * x + (sigma.log() / 4).view(-1, 1, 1, 1)
    want = sd2 / (s ** 2 + sd2) * x + s * SIGMA_DATA / (s ** 2 + sd2).sqrt() * F_x
    torch.testing.assert_close(out, want)
    # a scalar sigma broadcasts over the batch
    torch.testing.assert_close(pre(x, 1.0, y), pre(x, torch.ones(3), y))
    with pytest.raises(ValueError, match="sigma"):
        pre(x, torch.ones(2), y)


# ---- loss -----------------------------------------------------------------------------------
def test_sigma_sampling_is_log_normal():
    loss = EDMLoss()
    g = torch.Generator().manual_seed(1)
    ln = loss.sample_sigma(200_000, generator=g).log().double()
    se = 1.2 / math.sqrt(ln.numel())
    assert abs(ln.mean().item() - (-1.2)) < 5 * se
    assert abs(ln.std().item() - 1.2) < 5 * 1.2 / math.sqrt(2 * ln.numel())


def test_loss_of_exact_denoiser_matches_theory():
    """With s = sigma_data, lambda(sigma) times the posterior variance is 1 at every sigma."""
    mu = torch.full((1, 3, 1, 1), 0.3, dtype=torch.float64)
    std = torch.full((1, 3, 1, 1), SIGMA_DATA, dtype=torch.float64)
    images = (mu + std * torch.randn(20_000, 3, 4, 4, dtype=torch.float64)).float()
    per_sample = EDMLoss()(gaussian_denoiser(mu, std), images)
    assert per_sample.shape == (images.shape[0],) and per_sample.dtype == torch.float32
    m, se = per_sample.double().mean().item(), per_sample.double().std().item() / math.sqrt(
        per_sample.numel())
    assert abs(m - 1.0) < 5 * se, (m, se)


@pytest.mark.parametrize("perturb", ["offset", "wrong_std", "identity"])
def test_exact_denoiser_has_lower_loss_than_perturbed(perturb):
    """The posterior mean minimises the expected loss; same sigma and noise for both (paired)."""
    images = (MU + STD * torch.randn(20_000, 3, 4, 4, dtype=torch.float64)).float()
    loss = EDMLoss()
    sigma = loss.sample_sigma(images.shape[0])
    noise = torch.randn_like(images)
    exact = gaussian_denoiser()
    if perturb == "offset":
        def other(x, s, y=None):
            return exact(x, s) + 0.05
    elif perturb == "wrong_std":
        other = gaussian_denoiser(MU, STD * 1.3)
    else:
        def other(x, s, y=None):
            return x
    l_exact = loss(exact, images, sigma=sigma, noise=noise).double()
    l_other = loss(other, images, sigma=sigma, noise=noise).double()
    diff = l_other - l_exact
    se = diff.std().item() / math.sqrt(diff.numel())
    assert diff.mean().item() > 5 * se, (diff.mean().item(), se)
    assert l_exact.mean() < l_other.mean()


class _AugRecorder(nn.Module):
    """F(x, c_noise, y, augment_labels=None) = 0, remembering every call's arguments."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, c_noise, y, augment_labels=None):
        self.calls.append((x.detach().clone(), augment_labels))
        return self.w * x


def test_loss_augments_clean_images_and_passes_labels():
    """With a pipe, the target is the warped image, the network input is warped image + noise,
    and the labels reach the model; the same generator reproduces the whole draw."""
    images = torch.rand(6, 3, 8, 8)
    pipe = AugmentPipe(1.0)
    sigma = torch.full((6,), 0.7)
    noise = torch.randn_like(images)
    seen = {}

    def D(x, s, y=None, augment_labels=None):
        seen["x"], seen["aug"] = x, augment_labels
        return torch.zeros_like(x)

    loss = EDMLoss(augment=pipe)
    g = torch.Generator().manual_seed(0)
    per_sample = loss(D, images, sigma=sigma, noise=noise, generator=g)
    aug = seen["aug"]
    assert aug.shape == (6, 9) and aug.dtype == torch.float32 and aug.abs().sum() > 0
    warped = pipe.apply(images, aug)
    torch.testing.assert_close(seen["x"], warped + 0.7 * noise)
    # D = 0: the loss is lambda(sigma) * mean(warped^2), the warped image being the target
    torch.testing.assert_close(per_sample, loss.weight(sigma) * warped.pow(2).flatten(1).mean(1))
    again = loss(D, images, sigma=sigma, noise=noise, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, per_sample) and torch.equal(seen["aug"], aug)


def test_augment_argument_and_label_plumbing():
    assert EDMLoss().augment_pipe is None and EDMLoss(augment=0.0).augment_pipe is None
    pipe = EDMLoss(augment=0.12).augment_pipe
    assert isinstance(pipe, AugmentPipe) and pipe.p == 0.12 and pipe.label_dim == 9
    with pytest.raises(TypeError, match="augment"):
        EDMLoss(augment="0.12")
    with pytest.raises(ValueError, match="p must be"):
        EDMLoss(augment=1.5)
    # EDMPrecond hands the labels to the model as a keyword; without a pipe nothing is passed
    net = _AugRecorder()
    images = torch.randn(4, 2, 4, 4)
    EDMLoss(augment=AugmentPipe(0.5))(EDMPrecond(net), images)
    assert net.calls[-1][1].shape == (4, 9)
    EDMLoss()(EDMPrecond(net), images)
    assert net.calls[-1][1] is None
    # sampling never augments: every network call gets no labels
    net.calls.clear()
    heun_sampler(EDMPrecond(net), torch.randn(2, 2, 4, 4), num_steps=3)
    assert len(net.calls) == 5 and all(a is None for _, a in net.calls)


def test_loss_input_checks():
    loss = EDMLoss()
    images = torch.randn(4, 3, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        loss(gaussian_denoiser(), images, noise=torch.randn(4, 3, 4, 5))
    with pytest.raises(ValueError, match="sigma"):
        loss(gaussian_denoiser(), images, sigma=torch.ones(3))


# ---- sampler --------------------------------------------------------------------------------
def test_sigma_steps():
    s = edm_sigma_steps(18, 0.002, 80.0, 7.0)
    assert s.shape == (19,) and s.dtype == torch.float64
    assert s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002)
    assert s[18].item() == 0.0 and bool((s[1:] < s[:-1]).all())
    # rho = 1 is the linear ramp
    torch.testing.assert_close(edm_sigma_steps(5, 1.0, 3.0, 1.0),
                               torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        edm_sigma_steps(0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigma_steps(10, 1.0, 0.5)


def _check_moments(x: torch.Tensor, sigma_max: float):
    """Per channel: mean and variance of the samples vs the data's, within 5 standard errors.

    The chain starts at noise * sigma_max (mean 0, not mu); the exact ODE maps that offset to
    mu s / sqrt(s^2 + sigma_max^2), which is added to the tolerance of the mean.
    """
    x = x.double()
    M = x.numel() // x.shape[1]
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    mu, s = MU.flatten(), STD.flatten()
    start_bias = mu.abs() * s / torch.sqrt(s ** 2 + sigma_max ** 2)
    assert ((mean - mu).abs() <= 5 * s / math.sqrt(M) + start_bias).all(), (mean, mu)
    assert ((var / s ** 2 - 1).abs() <= 5 * math.sqrt(2 / M)).all(), (var / s ** 2)


def test_heun_deterministic_reproduces_gaussian():
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(20_000, 3, 2, 2, generator=g)
    x = heun_sampler(gaussian_denoiser(), noise, num_steps=128)
    assert x.shape == noise.shape and x.dtype == torch.float32
    _check_moments(x, 80.0)


def test_heun_stochastic_reproduces_gaussian():
    g = torch.Generator().manual_seed(3)
    # the churn's bias shrinks like 1/N (~1.5% of the variance at N=128, ~0.5% at 256)
    noise = torch.randn(10_000, 3, 2, 2, generator=g)
    x = heun_sampler(gaussian_denoiser(), noise, num_steps=256, S_churn=40.0, S_min=0.05,
                     S_max=50.0, S_noise=1.0, generator=g)
    _check_moments(x, 80.0)
    # churn really injects noise: the same start gives another result
    y = heun_sampler(gaussian_denoiser(), noise[:64], num_steps=8, S_churn=40.0, generator=g)
    z = heun_sampler(gaussian_denoiser(), noise[:64], num_steps=8, S_churn=40.0, generator=g)
    assert not torch.equal(y, z)


def test_heun_is_second_order():
    """The Gaussian's ODE is linear, so the sampler maps x_T to a + k x_T; k's error vs the exact
    s / sqrt(s^2 + sigma_max^2) must shrink ~4x per doubling of the steps (Euler: ~2x)."""
    D = gaussian_denoiser()
    exact = STD / torch.sqrt(STD ** 2 + 80.0 ** 2)

    def gain_error(n):
        one = heun_sampler(D, torch.ones(1, 3, 1, 1), num_steps=n).double()
        zero = heun_sampler(D, torch.zeros(1, 3, 1, 1), num_steps=n).double()
        return ((one - zero) / 80.0 / exact - 1).abs().flatten()

    e18, e36, e72 = gain_error(18), gain_error(36), gain_error(72)
    assert (e18 > e36).all() and (e36 > e72).all()
    ratio = e36 / e72
    assert ((ratio > 3.0) & (ratio < 5.5)).all(), ratio


def test_heun_progress_and_guidance(capsys):
    def D(x, sigma, y):
        return torch.zeros_like(x) + y.view(-1, 1, 1, 1).float()

    noise = torch.randn(4, 1, 2, 2)
    y = torch.tensor([1, 2, 3, 4])
    # scale 1 is the conditional denoiser, scale 0 the unconditional (null label 0)
    torch.testing.assert_close(guided_denoiser(D, 1.0, 0)(noise, torch.ones(4), y), D(noise, 1, y))
    torch.testing.assert_close(guided_denoiser(D, 0.0, 0)(noise, torch.ones(4), y),
                               torch.zeros_like(noise))
    torch.testing.assert_close(guided_denoiser(D, 2.0, 0)(noise, torch.ones(4), y),
                               2 * D(noise, 1, y))
    out = heun_sampler(D, noise, y, num_steps=3, progress=True)
    # D ignores x, so the last (Euler) step lands on D exactly
    torch.testing.assert_close(out, D(noise, 1, y))
    # capsys' stderr is no terminal: no bar, so a log never collects carriage-return redraws
    assert capsys.readouterr().err == ""


def test_heun_progress_bar_only_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    noise = torch.randn(2, 1, 2, 2)
    heun_sampler(lambda x, s, y: torch.zeros_like(x), noise, None, num_steps=3, progress="demo")
    assert "demo" in err.getvalue() and "\r" in err.getvalue()
