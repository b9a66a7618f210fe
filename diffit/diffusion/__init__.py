"""Diffusion processes: discrete-time Gaussian diffusion (ADM / DiT / latent DiffiT)."""
from .gaussian import (GaussianDiffusion, create_diffusion, get_named_beta_schedule,
                       space_timesteps, spaced_diffusion)

__all__ = ["GaussianDiffusion", "create_diffusion", "get_named_beta_schedule",
           "space_timesteps", "spaced_diffusion"]
from . import edm  # noqa: E402,F401  (EDM for the image-space model)
