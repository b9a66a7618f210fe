"""How tmsa_attention's tensors meet its kernels: which views are taken as they come and which
are copied (row strides the vector loads assume, 32-bit row offsets), the output and gradient
layouts (o over [B, N, H, D] memory, dq | dk | dv as views of one buffer), the dense bias's
broadcast strides and gradient, and a launch's run of samples (_common.batch_slices).
diffit_kernels/attention.py holds the math, the launchers and the op.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._attention_index import _Geom
from ._attention_launch import _head_split, _packed_span
from ._common import empty, unit_last_stride


# The kernels address the rows of one (sample, head) with 32-bit offsets (row * row stride, plus
# a 64-bit sample and head offset; the dense bias and its per-sample gradient: row * row stride
# + column * column stride), which wrap past 2^31 elements: a silent wrong answer on a card.
I32_SPAN = 1 << 31


def _rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """Unit last stride and every other stride (of a dim > 1) a multiple of 8, as the kernels'
    vector-load hints assume, and the rows of one head within I32_SPAN elements; anything else
    is copied (a contiguous [B, H, N, D] head spans N * D elements)."""
    t = unit_last_stride(t)
    if any(st % 8 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1) \
            or (t.shape[-2] - 1) * t.stride(-2) >= I32_SPAN:
        t = t.contiguous()
    return t


def _bias_span(bias: torch.Tensor, N: int) -> int:
    """The largest offset in one (sample, head) of the bias broadcast to [B, H, N, N]."""
    _, _, sm, sn = _bias_strides(bias)
    return (N - 1) * (sm + sn)


def _within_i32(q: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bias (copied where a view's strides would reach I32_SPAN) once the sizes the kernels'
    32-bit offsets address are known to fit: the rows of a sample in the [B, N, 3, H, D]
    gradient buffer (_packs; o's [B, N, H, D] has fewer), one (sample, head) of the bias, and
    of a per-sample bias's [B, H, N, N] gradient."""
    B, H, N, D = q.shape
    if (N - 1) * 3 * H * D >= I32_SPAN:
        raise NotImplementedError(
            f"tmsa_attention's Triton kernels address one sample's rows with 32-bit offsets: "
            f"N={N} tokens of 3 x H={H} x D={D} reach 2^31 elements; use backend='torch'")
    if bias is None:
        return None
    if _bias_span(bias, N) >= I32_SPAN:
        bias = bias.contiguous()
    per_sample = bias.dim() == 4 and bias.shape[0] > 1
    if _bias_span(bias, N) >= I32_SPAN or (per_sample and N * N > I32_SPAN):
        raise NotImplementedError(
            f"tmsa_attention's Triton kernels address a dense bias's [N, N] (and a per-sample "
            f"bias's gradient) with 32-bit offsets: N={N} reaches 2^31 elements (bias "
            f"{tuple(bias.shape)}); use table= or backend='torch'")
    return bias


def _out_layout(B: int, H: int, N: int, D: int, dtype: torch.dtype, device) -> torch.Tensor:
    """o [B, H, N, D] over [B, N, H, D] memory (FlashAttention's output layout): merging the
    heads back into [B, N, H * D] tokens, what every caller does next, is then a view, where a
    contiguous [B, H, N, D] o costs a transposing copy per call (and that copy is what the
    projection after it saves for its backward)."""
    return empty((B, N, H, D), dtype, device).transpose(1, 2)


def _strides3(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _bias_strides(bias: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
    """Strides of the bias broadcast to [B, H, N, N]: 0 along every dim it broadcasts."""
    if bias is None:
        return 0, 0, 0, 0
    pad = (1,) * (4 - bias.dim())
    return tuple(0 if n == 1 else st for n, st in zip(pad + tuple(bias.shape),
                                                     (0,) * len(pad) + tuple(bias.stride())))


def _rows_of(b0: int, b1: int, B: int, *ts):
    """Samples b0..b1 of per-sample tensors (the batch their first dim) for a launch over that
    run of the batch (batch_slices); the tensors themselves for the whole batch."""
    if (b0, b1) == (0, B):
        return ts
    return tuple(None if t is None else t[b0:b1] for t in ts)


def _bias_rows(b0: int, b1: int, B: int, bias: Optional[torch.Tensor], like: torch.Tensor):
    """The kernels' BIAS argument for samples b0..b1: a per-sample bias's rows, a bias
    broadcast over the batch as it is, `like` (any tensor of the launch) when there is none."""
    if bias is None:
        return like
    if bias.dim() < 4 or bias.shape[0] == 1:
        return bias
    return _rows_of(b0, b1, B, bias)[0]


def _bias_grad(ds: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ds [H, N, N] (summed over the batch) or [B, H, N, N] -> the bias's own shape."""
    ds = ds.reshape((1,) * (4 - ds.dim()) + tuple(ds.shape))
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    dims = [d for d in range(4) if shape[d] == 1 and ds.shape[d] != 1]
    if dims:
        ds = ds.sum(dims, keepdim=True)
    return ds.reshape(bias.shape).to(bias.dtype).contiguous()


def _packs(dtype: torch.dtype, n_win: int, packed_span: int) -> bool:
    """Whether the backward writes dq, dk, dv into one [B, N, 3, H, D] buffer, the layout of
    time_qkv's output, whose backward then reads them as one [M, 3C'] matrix without a copy:
    16-bit inputs whose spans (n_win) take the dK/dV and dQ kernels or the fused kernel's
    one-window tile (the "wide" plan), not the fused kernel's packed tiles of spans up to
    packed_span (_packed_span). float32 and those tiles keep three contiguous [B, H, N, D]: the
    packed store's address arithmetic made their configs spill (FMA-dot configs for sm_80 /
    sm_90a under Triton 3.9, the fused kernel's one-warp 16x16 tile for sm_90a under 3.6)."""
    return dtype in (torch.float16, torch.bfloat16) and n_win > packed_span


def _packs_for(q: torch.Tensor, geometry: Sequence[int], bias: Optional[torch.Tensor]) -> bool:
    """_packs from the op's arguments (its fake implementation and autograd formula)."""
    N, D = q.shape[2], q.shape[3]
    return _packs(q.dtype, _Geom(N, geometry).n_win,
                  _packed_span(*_head_split(D), q.element_size(), bias is not None))


def _grads_shape(q: torch.Tensor, packed: bool) -> Tuple[int, ...]:
    B, H, N, D = q.shape
    return (B, N, 3, H, D) if packed else (3, B, H, N, D)


def _grad_views(grads: torch.Tensor, packed: bool):
    """dq, dk, dv [B, H, N, D]: views of the backward's gradient buffer (see _packs)."""
    if packed:
        return tuple(t.transpose(1, 2) for t in grads.unbind(2))
    return grads.unbind(0)
