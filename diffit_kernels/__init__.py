"""diffit-kernels: Triton kernels, forward and backward, for DiffiT (Diffusion Vision Transformers).

Public ops (DESIGN.md section 3); each has a plain-PyTorch twin in `diffit_kernels.reference`:
    adaln_norm        fused residual add + LayerNorm + per-sample shift/scale/gate + SiLU
    time_qkv          TMSA's QKV projection with the time token (and LayerNorm) fused
    tmsa_attention    flash attention with a learnable relative-position bias table
    relative_position_index
Importing this package queries no GPU.
"""
from . import reference
from . import norm as _norm
from .norm import adaln_norm
from . import projection as _projection
from .projection import time_qkv
from . import attention as _attention
from .attention import tmsa_attention
from .reference import relative_position_index

# op modules, each with aot_specs() and check_cases(): the compile report and `check` walk them
OP_MODULES = (
    _norm,
    _projection,
    _attention,
)

__all__ = [
    "adaln_norm",
    "time_qkv",
    "tmsa_attention",
    "relative_position_index",
    "reference",
]
__version__ = "0.1.0"
