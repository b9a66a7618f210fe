"""DiffiT models, diffusion and command line on the diffit_kernels fused ops.

    diffit.DiffiT / DiffiTConfig / PRESETS     latent DiffiT, official state-dict layout
    diffit.TMSAttention                        drop-in for the official DiffiTAttention
    diffit.DiffiTBlock, AdaLNBlock, ...        building blocks (also used by the U-Net)
    diffit.diffusion                           Gaussian diffusion (ADM / DiT), DDPM / DDIM
    python -m diffit sample                    sampling command line
"""
from .latent import (PRESETS, CheckpointMismatchError, DiffiT, DiffiT_B_2, DiffiT_L_2,
                     DiffiT_S_2, DiffiT_XL_2, DiffiTConfig, preset_config)
from .layers import (AdaLNBlock, DiffiTBlock, Mlp, TimestepEmbedder, TMSAttention,
                     get_2d_sincos_pos_embed, timestep_embedding)
from .unet import PRESETS as UNET_PRESETS, DiffiTUNet, DiffiTUNetConfig

__all__ = [
    "AdaLNBlock", "CheckpointMismatchError", "DiffiT", "DiffiTBlock", "DiffiTConfig",
    "DiffiT_B_2", "DiffiT_L_2", "DiffiT_S_2", "DiffiT_XL_2", "Mlp", "PRESETS", "TMSAttention",
    "TimestepEmbedder", "get_2d_sincos_pos_embed", "preset_config", "timestep_embedding",
    "DiffiTUNet", "DiffiTUNetConfig", "UNET_PRESETS",
]
