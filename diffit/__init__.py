"""DiffiT models, diffusion and command line on the diffit_kernels fused ops."""
from .layers import (AdaLNBlock, DiffiTBlock, Mlp, TimestepEmbedder, TMSAttention,
                     get_2d_sincos_pos_embed, timestep_embedding)

__all__ = [
    "AdaLNBlock", "DiffiTBlock", "Mlp", "TMSAttention", "TimestepEmbedder",
    "get_2d_sincos_pos_embed", "timestep_embedding",
]
