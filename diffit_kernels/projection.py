"""time_qkv: TMSA's QKV projection with the time token, LayerNorm folded in (first version:
validation and the reference path; the Triton kernels land next)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference
from ._common import check_tensor, describe, resolve_backend


def _check_inputs(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps):
    """Validate like the spec, with messages naming the argument, its shape/dtype/device."""
    check_tensor("x", x, ndim=3)
    B, N, C = x.shape
    check_tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    if weight.shape[1] != C or weight.shape[0] % 3 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [3*C', C={C}] (q | k | v rows), got {describe(weight)}")
    C3 = weight.shape[0]
    CP = C3 // 3
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if CP % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide C'={CP} (weight {describe(weight)})")
    if bias is not None:
        check_tensor("bias", bias, shape=(C3,), dtype=x.dtype, device=x.device)
    if temb is None:
        if temb_weight is not None or temb_bias is not None:
            raise ValueError("temb_weight / temb_bias given without temb: pass temb [B, Ct] or "
                             "leave all three None (no time term)")
    else:
        check_tensor("temb", temb, ndim=2, dtype=x.dtype, device=x.device)
        if temb.shape[0] != B:
            raise ValueError(f"temb must have shape [B={B}, Ct], got {describe(temb)}")
        if temb_weight is None:
            raise ValueError(f"temb needs temb_weight [3C'={C3}, Ct={temb.shape[1]}]")
        check_tensor("temb_weight", temb_weight, shape=(C3, temb.shape[1]), dtype=x.dtype,
                     device=x.device)
        if temb_bias is not None:
            check_tensor("temb_bias", temb_bias, shape=(C3,), dtype=x.dtype, device=x.device)
    if norm_eps is not None and (isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float))
                                 or norm_eps < 0):
        raise ValueError(f"norm_eps must be None or a non-negative float, got {norm_eps!r}")


def time_qkv(
    x: torch.Tensor,
    temb: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    temb_weight: Optional[torch.Tensor],
    temb_bias: Optional[torch.Tensor],
    num_heads: int,
    *,
    norm_eps: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TMSA's QKV projection: q, k, v = split_heads(LN?(x) W^T + b + (temb W_t^T + b_t)[b])."""
    _check_inputs(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps)
    if resolve_backend(backend, x, temb, weight, bias, temb_weight, temb_bias) == "torch":
        return reference.time_qkv(x, temb, weight, bias, temb_weight, temb_bias, num_heads,
                                  norm_eps=norm_eps)
    raise NotImplementedError("time_qkv's Triton kernels are not in this commit yet: "
                              "use backend='torch'")


def aot_specs():
    return []


def check_cases(device: torch.device):
    return []
