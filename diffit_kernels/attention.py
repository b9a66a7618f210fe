"""tmsa_attention: flash attention with a learnable relative-position bias table (first version:
validation and the reference path; the Triton kernels land next)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference
from ._common import resolve_backend

HEAD_DIMS = tuple(range(16, 129, 8))


def tmsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    table: Optional[torch.Tensor] = None,
    grid: Optional[Sequence[int]] = None,
    window: Optional[Sequence[int]] = None,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    deterministic: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """O = softmax(q k^T * scale + B_rel) v per head, B_rel gathered from `table` (DESIGN.md 3)."""
    reference.check_attention_inputs(q, k, v, table, grid, window, bias)
    if resolve_backend(backend, q, k, v, table, bias) == "torch":
        return reference.tmsa_attention(q, k, v, table=table, grid=grid, window=window, bias=bias,
                                        scale=scale)
    raise NotImplementedError("tmsa_attention's Triton kernels are not in this commit yet: "
                              "use backend='torch'")


def aot_specs():
    return []


def check_cases(device: torch.device):
    return []
