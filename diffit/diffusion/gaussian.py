"""Discrete-time Gaussian diffusion (DDPM, Ho et al. 2020; improved DDPM, Nichol & Dhariwal 2021;
DDIM, Song et al. 2021) as used by ADM, DiT and latent DiffiT.

Forward process with betas b_t, a_t = 1 - b_t, abar_t = prod_{s<=t} a_s:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(c0_t x_0 + ct_t x_t, bt_t I)
        c0_t = b_t sqrt(abar_{t-1}) / (1 - abar_t)
        ct_t = (1 - abar_{t-1}) sqrt(a_t) / (1 - abar_t)
        bt_t = b_t (1 - abar_{t-1}) / (1 - abar_t)          (abar_{-1} = 1)
The model predicts eps; x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t). With learned-range
variance it also outputs v in [-1, 1] per element and
    log sigma_t^2 = (v + 1)/2 * log b_t + (1 - v)/2 * log bt_t.
Training loss ("hybrid"): ||eps - eps_hat||^2 (mean over elements) + L_vb, where L_vb is the KL
between q(x_{t-1}|x_t,x_0) and the model (the decoder NLL at t = 0) in bits per dim, with the
mean's gradient stopped so only the variance learns from it.

Respacing keeps a subset S of the T timesteps and rebuilds betas from abar on S, so the same
model samples in fewer steps; the model is always called with the original timestep values.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

MODEL_VAR_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse")


# ---- schedules and respacing ----------------------------------------------------------------
def get_named_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """float64 betas [T]. "linear": 1e-4..0.02 scaled by 1000 / T (so any T spans the same
    noise range); "cosine": abar(t) = cos^2(((t/T) + s) / (1 + s) * pi / 2), s = 0.008, with
    b_t = min(1 - abar(t+1)/abar(t), 0.999)."""
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps!r}")
    if name == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - abar[1:] / abar[:-1], max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}: use 'linear' or 'cosine'")


def _even_pick(size: int, count: int) -> List[int]:
    """`count` indices spread evenly over range(size), first and last included."""
    if count > size:
        raise ValueError(f"cannot take {count} steps from a section of {size}")
    if count <= 1:
        return [0][:count]
    stride = (size - 1) / (count - 1)
    return [round(i * stride) for i in range(count)]


def space_timesteps(num_timesteps: int, spec: Union[str, Sequence[int], int]) -> List[int]:
    """Sorted original timesteps to keep.

    spec: "250" or 250 -> 250 evenly spaced steps (first and last kept); "10,15,20" splits the
    range into 3 equal sections taking 10, 15, 20 steps from each; "ddimN" -> the integer-stride
    grid 0, k, 2k, ... with exactly N steps (DDIM's spacing).
    """
    T = int(num_timesteps)
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("ddim"):
            n = int(spec[4:])
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == n:
                    return list(range(0, T, stride))
            raise ValueError(f"no integer stride gives exactly {n} steps out of {T}")
        spec = [int(s) for s in spec.split(",") if s]
    counts = list(spec)
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"bad respacing {spec!r}")
    base, extra = divmod(T, len(counts))
    kept, start = [], 0
    for i, c in enumerate(counts):
        size = base + (1 if i < extra else 0)
        kept += [start + j for j in _even_pick(size, c)]
        start += size
    return sorted(set(kept))


# ---- Gaussian helpers -----------------------------------------------------------------------
def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for data in [-1, 1] quantised to 256 bins of width 2/255 under
    N(means, e^(2 log_scales)); the edge bins take the whole tail. Uses the exact normal CDF in
    log space (torch.special.log_ndtr) for stable tails."""
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + 1.0 / 255)
    lower = inv_std * (x - means - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)                       # log P(z < upper)
    log_sf_lower = torch.special.log_ndtr(-lower)                       # log P(z > lower)
    # P(l < z < u) = Phi(u) (1 - Phi(l)/Phi(u)) in the left half, SF(l) (1 - SF(u)/SF(l)) in
    # the right half: each form keeps its precision where its CDF ratio is not ~1
    left = lambda hi, lo: hi + torch.log(-torch.expm1(torch.clamp(lo - hi, max=-1e-12)))  # noqa
    log_mid = torch.where(upper + lower < 0,
                          left(log_cdf_upper, torch.special.log_ndtr(lower)),
                          left(log_sf_lower, torch.special.log_ndtr(-upper)))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


def _progress(it: Iterable, enabled: bool, total: int, desc: str):
    if not enabled:
        return it
    from ..progress import progress_bar

    return progress_bar(it, total=total, desc=desc)


# ---- the diffusion --------------------------------------------------------------------------
class GaussianDiffusion:
    """Schedules, posterior, model parameterisation, training loss and samplers.

    Args:
        betas: float64 [T] noise schedule (after respacing, if any).
        model_var_type: "learned_range" (the model outputs [eps | v]), "learned" ([eps | log
            sigma^2]), "fixed_small" (posterior variance bt_t) or "fixed_large" (b_t).
        loss_type: "mse" (DiT: mse + vb) or "rescaled_mse" (vb scaled by T / 1000).
        timestep_map: original timestep of each of the T steps (respacing); the model is called
            with these values. None = identity.
    """

    def __init__(self, betas: torch.Tensor, *, model_var_type: str = "learned_range",
                 loss_type: str = "mse", timestep_map: Optional[Sequence[int]] = None):
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"model_var_type must be one of {MODEL_VAR_TYPES}, "
                             f"got {model_var_type!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        b = torch.as_tensor(betas, dtype=torch.float64)
        if b.dim() != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError(f"betas must be a 1-D tensor in (0, 1], got shape {tuple(b.shape)}")
        self.model_var_type, self.loss_type = model_var_type, loss_type
        self.num_timesteps = T = b.shape[0]
        self.timestep_map = torch.as_tensor(
            list(range(T)) if timestep_map is None else list(timestep_map), dtype=torch.long)
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries, "
                             f"got {tuple(self.timestep_map.shape)}")

        a = 1.0 - b
        abar = torch.cumprod(a, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # bt_0 = 0: its log is clipped to bt_1 (log sigma at t = 0 only matters for the NLL)
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if T > 1 \
            else torch.log(b)
        self.betas = b
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self._arrays: Dict[str, torch.Tensor] = {
            "sqrt_abar": abar.sqrt(),
            "sqrt_1m_abar": (1.0 - abar).sqrt(),
            "sqrt_recip_abar": (1.0 / abar).sqrt(),
            "sqrt_recipm1_abar": (1.0 / abar - 1.0).sqrt(),
            "abar": abar,
            "abar_prev": abar_prev,
            "post_var": post_var,
            "post_log_var": post_log_var,
            "post_c0": b * abar_prev.sqrt() / (1.0 - abar),
            "post_ct": (1.0 - abar_prev) * a.sqrt() / (1.0 - abar),
            "log_betas": torch.log(b),
            # fixed_large: b_t, with bt_1 at t = 0 so the decoder term stays finite
            "large_var": torch.cat([post_var[1:2], b[1:]]) if T > 1 else b,
        }
        self._cache: Dict[tuple, torch.Tensor] = {}

    def _get(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arrays[name][t] as like's dtype / device, shaped [B, 1, ..., 1] to broadcast."""
        key = (name, like.device)
        arr = self._cache.get(key)
        if arr is None:
            arr = self._cache[key] = self._arrays[name].to(like.device, torch.float32)
        out = arr[t.to(like.device).long()]
        return out.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep values for step indices t (what the model is conditioned on).
        The map is copied to t's device once, not on every call (a blocking host-to-device copy
        before each model forward otherwise)."""
        key = ("timestep_map", t.device)
        tmap = self._cache.get(key)
        if tmap is None:
            tmap = self._cache[key] = self.timestep_map.to(t.device)
        return tmap[t.long()]

    # ---- forward process ----
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._get("sqrt_abar", t, x_start) * x_start
                + self._get("sqrt_1m_abar", t, x_start) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and (clipped) log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._get("post_c0", t, x_t) * x_start + self._get("post_ct", t, x_t) * x_t
        return mean, self._get("post_var", t, x_t), self._get("post_log_var", t, x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return self._get("sqrt_recip_abar", t, x_t) * x_t - self._get("sqrt_recipm1_abar", t,
                                                                        x_t) * eps

    def predict_eps_from_xstart(self, x_t, t, x_start):
        return ((self._get("sqrt_recip_abar", t, x_t) * x_t - x_start)
                / self._get("sqrt_recipm1_abar", t, x_t))

    # ---- model parameterisation ----
    def _learns_var(self) -> bool:
        return self.model_var_type in ("learned", "learned_range")

    def output_to_distribution(self, model_output: torch.Tensor, x: torch.Tensor,
                               t: torch.Tensor, clip_denoised: bool = False,
                               denoised_fn: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a raw model output: mean, variance, log_variance, pred_xstart,
        eps."""
        C = x.shape[1]
        if self._learns_var():
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"model_var_type={self.model_var_type!r} needs the model to "
                                 f"output 2 x {C} channels, got {tuple(model_output.shape)}")
            eps, v = model_output[:, :C], model_output[:, C:]
            if self.model_var_type == "learned":
                log_var = v
            else:
                lo, hi = self._get("post_log_var", t, x), self._get("log_betas", t, x)
                frac = (v + 1) / 2
                log_var = frac * hi + (1 - frac) * lo
            var = torch.exp(log_var)
        else:
            eps = model_output[:, :C]
            name = "post_var" if self.model_var_type == "fixed_small" else "large_var"
            var = self._get(name, t, x).expand_as(x)
            log_var = (self._get("post_log_var", t, x) if self.model_var_type == "fixed_small"
                       else torch.log(self._get("large_var", t, x))).expand_as(x)
        x0 = self.predict_xstart_from_eps(x, t, eps)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": x0,
                "eps": eps}

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False, denoised_fn: Optional[Callable] = None,
                        model_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.output_to_distribution(out, x, t, clip_denoised, denoised_fn)

    # ---- training ----
    def _vb_bits(self, dist: Dict[str, torch.Tensor], x_start: torch.Tensor,
                 x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample L_vb term in bits per dim: KL at t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, dist["mean"], dist["log_variance"]))
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, dist["mean"], 0.5 * dist["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None,
                        noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Per-sample losses {"loss", "mse"[, "vb"]} for step indices t [B]."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        C = x_start.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :C].float()) ** 2)}
        if self._learns_var():
            # stop the mean's gradient: the vb term trains only the variance output
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1).float()
            dist = self.output_to_distribution(frozen, x_t.float(), t)
            vb = self._vb_bits(dist, x_start.float(), x_t.float(), t)
            if self.loss_type == "rescaled_mse":
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
            terms["loss"] = terms["mse"] + vb
        else:
            terms["loss"] = terms["mse"]
        return terms

    # ---- sampling ----
    def p_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} = mean + sigma z (no noise at t = 0)."""
        dist = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        sample = dist["mean"] + nonzero * torch.exp(0.5 * dist["log_variance"]) * z
        return {"sample": sample, "pred_xstart": dist["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, denoised_fn=None,
                    model_kwargs=None, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """One DDIM step: x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps + s z,
        s = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')."""
        dist = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        x0 = dist["pred_xstart"]
        eps = self.predict_eps_from_xstart(x, t, x0)
        abar, abar_prev = self._get("abar", t, x), self._get("abar_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = abar_prev.sqrt() * x0 + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return {"sample": mean + nonzero * sigma * z, "pred_xstart": x0}

    def _loop(self, step, shape, noise, device, progress, generator, desc):
        if noise is not None:
            x = noise
        else:
            x = torch.randn(*shape, generator=generator,
                            device=device if device is not None else "cpu")
        for i in _progress(reversed(range(self.num_timesteps)), progress, self.num_timesteps,
                           desc):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = step(x, t)["sample"]
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                      model_kwargs=None, device=None, progress=False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or `noise`) through every (respaced) step."""
        step = lambda x, t: self.p_sample(model, x, t, clip_denoised, denoised_fn,  # noqa: E731
                                          model_kwargs, generator)
        return self._loop(step, shape, noise, device, progress, generator, "DDPM")

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta: float = 0.0,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DDIM sampling (deterministic for eta = 0) through every (respaced) step."""
        step = lambda x, t: self.ddim_sample(model, x, t, clip_denoised,  # noqa: E731
                                             denoised_fn, model_kwargs, eta, generator)
        return self._loop(step, shape, noise, device, progress, generator, "DDIM")


def spaced_diffusion(base_betas: torch.Tensor, use_timesteps: Sequence[int],
                     **kwargs) -> GaussianDiffusion:
    """The diffusion on a subset of the base process's timesteps (same abar at those steps)."""
    abar = torch.cumprod(1.0 - torch.as_tensor(base_betas, dtype=torch.float64), 0)
    keep = sorted(set(int(t) for t in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= abar.shape[0]:
        raise ValueError(f"use_timesteps must lie in [0, {abar.shape[0]}), got {keep[:3]}...")
    last, betas = 1.0, []
    for t in keep:
        betas.append(1.0 - abar[t].item() / last)
        last = abar[t].item()
    return GaussianDiffusion(torch.tensor(betas, dtype=torch.float64), timestep_map=keep,
                             **kwargs)


def create_diffusion(timestep_respacing: Union[str, int, Sequence[int], None] = None,
                     noise_schedule: str = "linear", learn_sigma: bool = True,
                     sigma_small: bool = False, diffusion_steps: int = 1000,
                     rescale_learned_sigmas: bool = False) -> GaussianDiffusion:
    """The ADM / DiT / DiffiT diffusion: eps prediction, learned-range variance when
    learn_sigma, "mse" loss (+ vb). timestep_respacing: None or "" = all steps (training);
    "250" / "ddim50" / "10,20" / 250 for sampling."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    var = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    kw = dict(model_var_type=var, loss_type="rescaled_mse" if rescale_learned_sigmas else "mse")
    if timestep_respacing in (None, ""):
        return GaussianDiffusion(betas, **kw)
    return spaced_diffusion(betas, space_timesteps(diffusion_steps, timestep_respacing), **kw)
