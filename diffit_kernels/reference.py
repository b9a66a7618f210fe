"""The spec: plain-PyTorch versions of every op (DESIGN.md sections 1 and 3).

These functions are the CPU path, the test oracle and the benchmarks' eager baseline. They
favour clarity over speed. Each takes `upcast`: False computes in the inputs' own dtype (what
eager PyTorch would do), True computes in float32 and casts the results back to the input dtype.
Autograd flows through them, so their gradients are the reference gradients too.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._common import check_tensor, describe

__all__ = ["adaln_norm", "time_qkv", "tmsa_attention", "relative_position_index"]


def _up(t: Optional[torch.Tensor], upcast: bool) -> Optional[torch.Tensor]:
    return t.float() if (upcast and t is not None) else t


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters; statistics in float32 (or fp64)."""
    xf = x if x.dtype == torch.float64 else x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)


# --------------------------------------------------------------------------------------------
def check_adaln_inputs(x, shift, scale, residual, gate, eps, activation) -> None:
    """Validate adaln_norm's inputs (shared by the reference and the kernel launcher)."""
    check_tensor("x", x, ndim=3)
    B, N, C = x.shape
    if residual is not None:
        check_tensor("residual", residual, shape=(B, N, C), device=x.device)
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32
                                              and x.dtype in (torch.float16, torch.bfloat16)):
            raise TypeError(f"residual must have x's dtype {x.dtype} (or be a float32 residual "
                            f"stream for a float16 / bfloat16 x), got {describe(residual)}")
    wide = residual.dtype if residual is not None else x.dtype
    for name, t in (("shift", shift), ("scale", scale), ("gate", gate)):
        if t is not None:
            check_tensor(name, t, shape=(B, C), device=x.device)
            if t.dtype not in (x.dtype, wide):
                also = f" or residual's {wide}" if wide != x.dtype else ""
                raise TypeError(f"{name} must have x's dtype {x.dtype}{also}, got {describe(t)}")
    if gate is not None and residual is None:
        raise ValueError("gate scales the branch added to the residual stream: pass residual= too")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def adaln_norm(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    *,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    activation: Optional[str] = None,
    upcast: bool = False,
):
    """Residual add, LayerNorm without affine, per-sample modulation, optional SiLU.

        h = residual + gate[b] * x      (with residual; gate optional)      else h = x
        y = LN(h) * (1 + scale[b]) + shift[b]                             (each optional)
        y = SiLU(y)                                                        (activation="silu")

    Args:
        x, residual: [B, N, C]; residual in x's dtype, or a float32 residual stream for a
            16-bit x (autocast): then everything is computed in float32, h stays float32 and
            y takes x's dtype.
        shift, scale, gate: [B, C] per-sample vectors (strided views are fine), in x's or
            residual's dtype.
    Returns:
        y [B, N, C] in x's dtype, or (y, h) when `residual` is given (h is the new residual
        stream, in residual's dtype).
    """
    check_adaln_inputs(x, shift, scale, residual, gate, eps, activation)
    dtype = x.dtype
    h_dtype = residual.dtype if residual is not None else dtype
    if h_dtype != dtype:  # a float32 residual stream: compute in it
        x, shift, scale, gate = (t.to(h_dtype) if t is not None else None
                                 for t in (x, shift, scale, gate))
    x, residual, shift, scale, gate = (_up(t, upcast) for t in (x, residual, shift, scale, gate))

    h = x
    if residual is not None:
        h = residual + (gate[:, None, :] * x if gate is not None else x)
    y = _layer_norm(h, eps)
    if scale is not None:
        y = y * (1 + scale[:, None, :])
    if shift is not None:
        y = y + shift[:, None, :]
    if activation == "silu":
        y = F.silu(y)
    y = y.to(dtype)
    return (y, h.to(h_dtype)) if residual is not None else y


# --------------------------------------------------------------------------------------------
def check_time_qkv_inputs(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps):
    """Validate time_qkv's inputs (shared by the reference and the kernel launcher); messages
    name the argument, its shape / dtype / device and what was expected."""
    check_tensor("x", x, ndim=3)
    B, N, C = x.shape
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.dtype != x.dtype and not (norm_eps is not None and x.dtype == torch.float32 and
                                        weight.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"weight must have x's dtype {x.dtype} (or be float16 / bfloat16 for a "
                        f"float32 x with norm_eps: LayerNorm reads the float32 residual stream "
                        f"and the projection runs in weight's dtype), got {describe(weight)}")
    wdt = weight.dtype  # the projection's dtype: temb and the biases take it too
    if weight.shape[1] != C or weight.shape[0] % 3 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [3*C', C={C}] (rows q | k | v), "
                         f"got {describe(weight)}")
    C3 = weight.shape[0]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if (C3 // 3) % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide C'={C3 // 3} "
                         f"(weight {describe(weight)})")
    if bias is not None:
        check_tensor("bias", bias, shape=(C3,), dtype=wdt, device=x.device)
    if temb is None:
        if temb_weight is not None or temb_bias is not None:
            raise ValueError("temb_weight / temb_bias given without temb: pass temb [B, Ct], "
                             "or None for all three (no time term)")
    else:
        check_tensor("temb", temb, ndim=2, dtype=wdt, device=x.device)
        if temb.shape[0] != B:
            raise ValueError(f"temb must have shape [B={B}, Ct], got {describe(temb)}")
        if temb_weight is None:
            raise ValueError(f"temb needs temb_weight [3C'={C3}, Ct={temb.shape[1]}]")
        check_tensor("temb_weight", temb_weight, shape=(C3, temb.shape[1]), dtype=wdt,
                     device=x.device)
        if temb_bias is not None:
            check_tensor("temb_bias", temb_bias, shape=(C3,), dtype=wdt, device=x.device)
    if norm_eps is not None and (isinstance(norm_eps, bool)
                                 or not isinstance(norm_eps, (int, float)) or not norm_eps >= 0):
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
    upcast: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TMSA's projection: spatial tokens plus the time token, split into heads.

        xn = LN(x) (no affine, when norm_eps is a float) else x
        qkv = xn W^T + b + (temb W_t^T + b_t)[b]            [B, N, 3C']
        q, k, v = qkv viewed as [B, N, 3, H, d] -> [3, B, H, N, d]

    Args:
        x: [B, N, C] spatial tokens, in weight's dtype or (norm_eps given, 16-bit weights) a
            float32 residual stream: LN(x) is then rounded to weight's dtype.
        temb: [B, Ct] time token, or None (no time term).
        weight: [3C', C], bias: [3C'] or None; temb_weight: [3C', Ct], temb_bias: [3C'] or None.
        num_heads: H, dividing C'.
    Returns:
        q, k, v [B, H, N, C'/H] in weight's dtype, views of one buffer.
    """
    check_time_qkv_inputs(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps)
    B, N, C = x.shape
    C3 = weight.shape[0]
    dtype = weight.dtype
    x, temb, weight, bias, temb_weight, temb_bias = (
        _up(t, upcast) for t in (x, temb, weight, bias, temb_weight, temb_bias))

    xn = _layer_norm(x, norm_eps).to(weight.dtype) if norm_eps is not None else x
    qkv = F.linear(xn, weight, bias)                                    # [B, N, 3C']
    if temb is not None:
        qkv = qkv + F.linear(temb, temb_weight, temb_bias)[:, None, :]  # + [B, 1, 3C']
    H = num_heads
    qkv = qkv.to(dtype).view(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
    return qkv[0], qkv[1], qkv[2]


# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _relative_position_index_cpu(gh: int, gw: int) -> torch.Tensor:
    # explicit device: under `with torch.device("meta")` the cache would otherwise keep meta tensors
    return _build_relative_position_index(gh, gw, torch.device("cpu"))


def _build_relative_position_index(gh: int, gw: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(gh, device=device).repeat_interleave(gw)  # row of token a = i*gw + j
    j = torch.arange(gw, device=device).repeat(gh)
    di = i[:, None] - i[None, :] + gh - 1
    dj = j[:, None] - j[None, :] + gw - 1
    return di * (2 * gw - 1) + dj


def relative_position_index(gh: int, gw: int, device=None) -> torch.Tensor:
    """Swin's relative position index for a gh x gw window: LongTensor [gh*gw, gh*gw].

    index[a, b] = (i_a - i_b + gh - 1) * (2gw - 1) + (j_a - j_b + gw - 1), tokens row-major.
    `device` (default CPU): the copy is made on that device from a per-device cache, so
    repeated calls cost no host-to-device transfer.
    """
    if int(gh) != gh or int(gw) != gw or gh < 1 or gw < 1:
        raise ValueError(f"window (gh, gw) must be positive ints, got ({gh!r}, {gw!r})")
    if device is None:
        return _relative_position_index_cpu(int(gh), int(gw)).clone()
    return _relative_position_index_on(int(gh), int(gw), torch.device(device)).clone()


def _relative_position_index_on(gh: int, gw: int, device: torch.device) -> torch.Tensor:
    """The index on `device` without a host-to-device copy per call (it would stall the eager
    reference and the baselines built on it, and flatter the kernels): eagerly a per-device
    cache; under torch.compile, which traces through lru_cache, built on the device itself so
    the compiled graph makes it there (and Inductor can fuse it into the gather)."""
    if torch.compiler.is_compiling():
        return _build_relative_position_index(gh, gw, device)
    return _cached_relative_position_index_on(gh, gw, device)


@lru_cache(maxsize=64)
def _cached_relative_position_index_on(gh: int, gw: int, device: torch.device) -> torch.Tensor:
    return _relative_position_index_cpu(gh, gw).to(device)


def check_attention_inputs(q, k, v, table, grid, window, bias) -> Tuple[int, int, int, int]:
    """Validate tmsa_attention's inputs (shared by the reference and the kernel launcher).

    Returns (gh, gw, Gh, Gw): the attention window and the token grid ((1, N, 1, N) style
    values are never needed: without table/window the grid is unused and (0, 0, 0, 0) is returned).
    """
    check_tensor("q", q, ndim=4)
    B, H, N, D = q.shape
    check_tensor("k", k, shape=(B, H, N, D), dtype=q.dtype, device=q.device)
    check_tensor("v", v, shape=(B, H, N, D), dtype=q.dtype, device=q.device)
    if N < 1 or D < 1 or B < 1 or H < 1:
        raise ValueError(f"q must have non-empty [B, H, N, D], got {describe(q)}")
    if table is not None and bias is not None:
        raise ValueError("table and bias are exclusive: pass the learnable table or a dense bias")
    if bias is not None:  # before the grid-less early return below
        check_tensor("bias", bias, device=q.device)
        full = (B, H, N, N)
        if not 2 <= bias.dim() <= 4 or any(
                n not in (1, f) for n, f in zip(bias.shape, full[4 - bias.dim():])):
            raise ValueError(f"bias must have shape broadcastable to [B={B}, H={H}, N={N}, N] "
                             f"with 2 to 4 dims (e.g. [H, N, N], [1, H, N, N], [B, 1, N, N], "
                             f"[N, N]), got {describe(bias)}")
    if grid is None:
        if table is not None or window is not None:
            raise ValueError(f"table / window need grid=(Gh, Gw) with Gh*Gw == N={N}")
        return 0, 0, 0, 0
    if len(grid) != 2 or any(int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid must be two positive ints (Gh, Gw), got {grid!r}")
    Gh, Gw = int(grid[0]), int(grid[1])
    if Gh * Gw != N:
        raise ValueError(f"grid={tuple(grid)} has {Gh * Gw} tokens but q has N={N} ({describe(q)})")
    if window is None:
        gh, gw = Gh, Gw
    else:
        if len(window) != 2 or any(int(w) != w or w < 1 for w in window):
            raise ValueError(f"window must be two positive ints (gh, gw), got {window!r}")
        gh, gw = int(window[0]), int(window[1])
        if Gh % gh or Gw % gw:
            raise ValueError(f"window={tuple(window)} must divide grid={tuple(grid)}")
        if bias is not None:
            raise ValueError("a dense bias is [H, N, N] over the whole grid: use table= with window")
    if table is not None:
        rows = (2 * gh - 1) * (2 * gw - 1)
        check_tensor("table", table, shape=(rows, H), device=q.device)
    return gh, gw, Gh, Gw


def _window_partition(t: torch.Tensor, Gh: int, Gw: int, gh: int, gw: int) -> torch.Tensor:
    """[B, H, Gh*Gw, D] -> [B, H, nW, gh*gw, D] (windows row-major, tokens row-major inside)."""
    B, H, N, D = t.shape
    t = t.reshape(B, H, Gh // gh, gh, Gw // gw, gw, D).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, H, (Gh // gh) * (Gw // gw), gh * gw, D)


def _window_reverse(t: torch.Tensor, Gh: int, Gw: int, gh: int, gw: int) -> torch.Tensor:
    B, H, nW, n, D = t.shape
    t = t.reshape(B, H, Gh // gh, Gw // gw, gh, gw, D).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, H, Gh * Gw, D)


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
    upcast: bool = False,
) -> torch.Tensor:
    """Multi-head attention with a relative-position bias table, global or windowed.

        O = softmax(q k^T * scale + B_rel) v,   B_rel[h, a, b] = table[index[a, b], h]

    Args:
        q, k, v: [B, H, N, D].
        table: [(2gh-1)(2gw-1), H] with grid=(Gh, Gw), Gh*Gw == N; window=(gh, gw) restricts
            attention to non-overlapping windows (all sharing the table); None = whole grid.
        bias: dense additive bias broadcastable to [B, H, N, N] (exclusive with table).
        scale: defaults to D ** -0.5.
    Returns:
        o [B, H, N, D] in q's dtype.
    """
    gh, gw, Gh, Gw = check_attention_inputs(q, k, v, table, grid, window, bias)
    B, H, N, D = q.shape
    dtype = q.dtype
    scale = D ** -0.5 if scale is None else float(scale)
    q, k, v, table, bias = (_up(t, upcast) for t in (q, k, v, table, bias))
    windowed = grid is not None and (gh, gw) != (Gh, Gw)
    if windowed:
        q, k, v = (_window_partition(t, Gh, Gw, gh, gw) for t in (q, k, v))  # [B, H, nW, n, D]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                         # [..., n, n]
    if table is not None:
        idx = _relative_position_index_on(gh, gw, table.device)
        rel = table[idx.view(-1)].view(gh * gw, gh * gw, H).permute(2, 0, 1)  # [H, n, n]
        rel = rel[:, None] if windowed else rel                              # broadcast windows
        s = s + rel.to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, v)
    if windowed:
        o = _window_reverse(o, Gh, Gw, gh, gw)
    return o.to(dtype)

