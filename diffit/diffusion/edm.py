"""EDM: preconditioning, training loss and Heun sampler (Karras, Aittala, Aila, Laine, "Elucidating
the Design Space of Diffusion-Based Generative Models", NeurIPS 2022), written from the paper's math.

The data y is noised as x = y + n, n ~ N(0, sigma^2 I), and a denoiser D(x; sigma) estimates y.
A raw network F is wrapped so that its input and target both have unit variance (Table 1):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2)        c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)       c_noise = ln(sigma) / 4          (sd = sigma_data = 0.5)

Training: ln(sigma) ~ N(P_mean, P_std^2) with P_mean = -1.2, P_std = 1.2, and the loss
lambda(sigma) ||D(y + n; sigma) - y||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2, which makes
the effective target of F unit-weighted at every sigma.

Sampling integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to
0 with Heun's 2nd-order method on the steps
    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, sigma_N = 0
(Algorithm 1), optionally adding noise before each step ("churn", Algorithm 2: sigma_hat =
sigma_i (1 + gamma_i), gamma_i = min(S_churn / N, sqrt(2) - 1) for sigma_i in [S_min, S_max]).

Augmentation (EDM's regularisation for small data sets): EDMLoss(augment=p) warps each clean image
y with diffit.augment.AugmentPipe before noising, trains D on the warped image, and hands the
transformation's labels to the network (D(x, sigma, y, augment_labels=...)), which learns to
produce the warped distribution when told so; sampling passes no labels, i.e. zeros, i.e. the data
as it is. EDM uses p = 0.12 on CIFAR-10 and 0.15 on FFHQ-64, with 9 labels (the network's
augment_dim).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..augment import AugmentPipe

__all__ = [
    "SIGMA_DATA",
    "EDMPrecond",
    "EDMLoss",
    "edm_sigma_steps",
    "heun_sampler",
    "guided_denoiser",
]

SIGMA_DATA = 0.5  # std of the training images scaled to [-1, 1] (EDM's choice for all datasets)

Denoiser = Callable[..., torch.Tensor]  # D(x, sigma, y) -> denoised x, same shape as x


def _sigma_as_tensor(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as float32 [B, 1, ..., 1] broadcasting against x [B, ...]."""
    B = x.shape[0]
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.dim() == 0:
        s = s.expand(B)
    elif s.numel() == B:
        s = s.reshape(B)
    else:
        raise ValueError(f"sigma must be a scalar or hold one value per sample (B={B}), "
                         f"got shape {tuple(s.shape)}")
    return s.view(B, *([1] * (x.dim() - 1)))


class EDMPrecond(nn.Module):
    """Wraps a raw network F(x, noise_label, y) into EDM's denoiser D(x; sigma).

    Args:
        model: any module called as model(x_in [B, C, H, W], c_noise [B], y) returning [B, C, H, W]
            (DiffiTUNet's forward(x, sigma_or_t, y) qualifies).
        sigma_data: expected std of the data.
    Forward:
        x [B, C, H, W] noisy images, sigma scalar or [B] (or [B, 1, 1, 1]), y labels or None,
        augment_labels [B, augment_dim] or None (passed to the model as a keyword only when
        given, so models without augmentation conditioning need not accept it)
        -> D(x; sigma) [B, C, H, W] in float32. The c_* coefficients are computed in float32 and
        the model runs in the dtype of its parameters (or under the caller's autocast).
    """

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data!r}")
        self.model = model
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for sigma (any shape, float32)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma, y: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a [B, ...] tensor, got {getattr(x, 'shape', type(x))}")
        xf = x.to(torch.float32)
        s = _sigma_as_tensor(sigma, xf)                                  # [B, 1, 1, 1]
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        param = next(self.model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        kw = {} if augment_labels is None else {"augment_labels": augment_labels}
        F_x = self.model((c_in * xf).to(dtype), c_noise.flatten(), y, **kw)  # [B, C, H, W]
        if F_x.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(F_x.shape)} for input shape "
                             f"{tuple(x.shape)}; EDM needs the same shape")
        return c_skip * xf + c_out * F_x.to(torch.float32)             # [B, C, H, W]


class EDMLoss:
    """EDM's training loss with log-normal sigma sampling.

    Call as loss_fn(net, images, labels=None) with `net` an EDM denoiser D(x, sigma, y) (e.g.
    EDMPrecond(model)); returns the per-sample loss [B] (float32), the weighted squared error
    averaged over the pixels of each sample. EDM sums over pixels instead; the two differ by the
    constant C*H*W, which Adam's update ignores (up to its epsilon), so the paper's learning rates
    carry over. Reduce with .mean() for the batch.

    `sigma` and `noise` may be passed to fix the noise level [B] and the unit-normal noise (tests,
    loss-vs-sigma plots); by default both are drawn here, from `generator` when one is given.

    `augment`: None or 0 = no augmentation; a probability p in (0, 1] = AugmentPipe(p) with EDM's
    CIFAR-10 transformation set (9 labels); or an AugmentPipe. With augmentation the clean images
    are warped before noising (from `generator` too) and `net` is called with
    augment_labels=[B, label_dim], so the network needs augment_dim = label_dim.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = SIGMA_DATA,
                 augment: Union[None, float, AugmentPipe] = None):
        if not P_std > 0 or not sigma_data > 0:
            raise ValueError(f"P_std and sigma_data must be positive, got {P_std!r}, {sigma_data!r}")
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)
        if augment is None or isinstance(augment, AugmentPipe):
            self.augment_pipe = augment
        elif isinstance(augment, (int, float)) and not isinstance(augment, bool):
            self.augment_pipe = AugmentPipe(float(augment)) if augment else None
        else:
            raise TypeError(f"augment must be None, a probability or an AugmentPipe, "
                            f"got {type(augment).__name__}")

    def sample_sigma(self, batch: int, device=None, generator=None) -> torch.Tensor:
        """ln(sigma) ~ N(P_mean, P_std^2): float32 [batch]."""
        z = torch.randn(batch, device=device, dtype=torch.float32, generator=generator)
        return (z * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net: Denoiser, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 *, sigma: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise ValueError(f"images must be a [B, ...] tensor, got "
                             f"{getattr(images, 'shape', type(images))}")
        y = images.to(torch.float32)
        B = y.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(B, y.device, generator)
        s = _sigma_as_tensor(sigma, y)                                   # [B, 1, 1, 1]
        if noise is None:
            noise = torch.randn(y.shape, device=y.device, dtype=torch.float32, generator=generator)
        elif noise.shape != y.shape:
            raise ValueError(f"noise must have the images' shape {tuple(y.shape)}, "
                             f"got {tuple(noise.shape)}")
        if self.augment_pipe is None:
            D = net(y + noise.to(torch.float32) * s, s.flatten(), labels)   # [B, C, H, W]
        else:
            y, aug = self.augment_pipe(y, generator=generator)           # [B, C, H, W], [B, A]
            D = net(y + noise.to(torch.float32) * s, s.flatten(), labels,
                    augment_labels=aug)                                  # [B, C, H, W]
        per_elem = self.weight(s) * (D.to(torch.float32) - y) ** 2
        return per_elem.flatten(1).mean(1)                               # [B]


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, device=None) -> torch.Tensor:
    """EDM's noise levels: float64 [num_steps + 1], sigma_max ... sigma_min, then an appended 0."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho!r}")
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64, device=device)
    else:
        ramp = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def heun_sampler(
    net: Denoiser,
    noise: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generator: Optional[torch.Generator] = None,
    progress: Union[bool, str] = False,
) -> torch.Tensor:
    """EDM's Heun sampler: deterministic with S_churn = 0 (Algorithm 1), stochastic otherwise.

    Args:
        net: the denoiser D(x, sigma, y) (e.g. EDMPrecond(model)), called with float32 x and a
            float32 sigma [B].
        noise: unit-normal [B, C, H, W]; the chain starts at x = noise * sigma_max.
        labels: passed to net unchanged.
        num_steps: N (18 for CIFAR-10 and 40 for FFHQ-64 in the paper); 2N - 1 network calls.
        S_churn, S_min, S_max, S_noise: Algorithm 2's stochasticity (EDM's tuned values for
            ImageNet-64 are 40, 0.05, 50, 1.003); S_churn = 0 gives the deterministic ODE sampler.
        generator: for the churn noise.
        progress: True (or a description string) shows a tqdm bar over the steps.
    Returns:
        x at sigma = 0, float32 [B, C, H, W]. The chain runs in float64 as EDM's does, so the
        step arithmetic adds no rounding of its own.
    """
    if not isinstance(noise, torch.Tensor) or noise.dim() < 2:
        raise ValueError(f"noise must be a [B, ...] tensor, got {getattr(noise, 'shape', type(noise))}")
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn!r}, {S_noise!r}")
    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=noise.device)
    B = noise.shape[0]

    def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sig = s.to(torch.float32).expand(B)
        return net(x.to(torch.float32), sig, labels).to(torch.float64)

    steps = range(num_steps)
    if progress:
        from ..progress import progress_bar

        desc = progress if isinstance(progress, str) else "heun"
        steps = progress_bar(steps, desc=desc, unit="step")

    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    x = noise.to(torch.float64) * sigmas[0]
    for i in steps:
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if S_churn > 0 and S_min <= float(s_cur) <= S_max else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, dtype=torch.float64, device=x.device, generator=generator)
            x = x + (s_hat ** 2 - s_cur ** 2).sqrt() * S_noise * eps
        d = (x - denoise(x, s_hat)) / s_hat                            # dx/dsigma at s_hat
        x_next = x + (s_next - s_hat) * d                               # Euler step
        if i < num_steps - 1:                                           # 2nd order unless sigma=0
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)


def guided_denoiser(net: Denoiser, scale: float, null_label: int) -> Denoiser:
    """Classifier-free guidance: D = D(x, sigma, null) + scale (D(x, sigma, y) - D(x, sigma, null)).

    `null_label` is the model's null class (DiffiTUNet: config.num_classes). The conditional and
    unconditional halves run as one batch of 2B. Use the result as `net` in heun_sampler.
    """

    def D(x: torch.Tensor, sigma, y: Optional[torch.Tensor]) -> torch.Tensor:
        if y is None:
            raise ValueError("guided_denoiser needs class labels y [B]")
        B = x.shape[0]
        s = _sigma_as_tensor(sigma, x).flatten()
        null = torch.full_like(y, null_label)
        out = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([y, null]))
        cond, uncond = out[:B], out[B:]
        return uncond + scale * (cond - uncond)

    return D
