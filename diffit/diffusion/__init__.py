"""Diffusion processes: discrete-time Gaussian diffusion (ADM / DiT / latent DiffiT) in
`gaussian`, and EDM (preconditioning, loss, Heun sampler; image-space DiffiT) in `edm`."""
from . import edm
from .gaussian import (GaussianDiffusion, create_diffusion, get_named_beta_schedule,
                       space_timesteps, spaced_diffusion)

__all__ = ["GaussianDiffusion", "create_diffusion", "edm", "get_named_beta_schedule",
           "space_timesteps", "spaced_diffusion"]
