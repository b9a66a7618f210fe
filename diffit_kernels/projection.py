"""time_qkv: TMSA's QKV projection, time token and LayerNorm fused, written head-split.

Forward, rows m = (b, n) of x [B, N, C], columns j of W [3C', C] (q | k | v, head h = j // d),
s_m = x[m, 0] the row's first element:
    y[m, j] = rstd_m * ((x_m - s_m) . W_j - (mean_m - s_m) * wsum_j) + cb[b, j]   (LayerNorm)
    y[m, j] = x_m . W_j + cb[b, j]                                                (norm_eps=None)
    wsum_j = sum_c W[j, c] (fp32, per call), cb = bias + temb W_t^T + b_t (fp32)
mean/rstd come from the same pass over x that feeds the GEMM (fp32 sums of x - s_m), no
normalised copy of x is written, and the epilogue stores straight into one [B, N, 3C'] buffer
(row-major tiles) whose head-split q, k, v views [B, H, N, d] tmsa_attention reads as they are.
Why the MMA sees x - s_m, not x: the plain fold rstd * (x . W - mean * wsum) lets the tensor
cores read x straight from shared memory, but its fp32 accumulator then carries |mean| * |W|
and loses ~|mean|/std * 2^-24 * sqrt(C) relative precision, amplified by rstd. Measured under
the interpreter: bf16 rows of mean 2000 (some constant after rounding, std -> 0) came out 0.49
off vs 0.009 for eager bf16. x - s_m is exact for values near s_m (Sterbenz) and otherwise one
rounding, like the reference's own rounding of LN(x); the statistics need the tile in registers
anyway. (fp16 inputs beyond +-32k could overflow x - s_m; LayerNorm inputs are not that large.)
Backward, with g = [dq | dk | dv] read head-split through each gradient's own strides:
    dxn = g W   (Triton GEMM),  dx = rstd * (dxn - mean_c(dxn) - xhat * mean_c(dxn * xhat))
    dW = g^T LN(x)  (Triton GEMM over rows, LN(x) rebuilt per tile, fixed-order split-K)
    S[b] = sum_n g[b, n]   ->  dbias = dtemb_bias = sum_b S,  dW_t = S^T temb,  dtemb = S W_t
S comes from the dW kernel (fp32 per row block, summed in a fixed order) or torch.sum:
deterministic, and no [B, N, 3C'] temporary: dq, dk, dv are never concatenated.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import _projection_kernels as _kernels
from . import reference
from ._common import (cdiv, check_kernel_dtype, dot_upcast, empty, interpreting,
                      next_power_of_2, resolve_backend, row_warps, sm_count,
                      unit_last_stride)

try:
    import triton
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None

LN_BLOCK_C = 4096  # LayerNorm-backward row chunk: wider rows are walked twice


# Launch configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). 16-bit tiles target the
# tensor cores (128x64 / 64x128 x64, 3-4 stages); fp32 runs IEEE FMA dots (no TF32), so its
# tiles are smaller. The interpreter gets exactly one config. Every entry compiles without
# spills for sm_80 and sm_90a under each Triton from 3.4 to 3.9, which costs the 128x128 tiles:
# the forward's LayerNorm epilogue spills in them on sm_90a with Triton 3.5-3.7 (80-136 bytes)
# and dX / dW spill in them on sm_80 with 3.4, as 4-warp 128-row tiles do here and there.
# 128-row forward tiles run only where each tile lies in one sample (the per-sample bias is one
# row of cb): a 2-row select or 2-D gather of cb on top of the LayerNorm path spills.
FWD_CONFIGS = {"16": [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3)],
               "32": [(64, 64, 32, 8, 3), (64, 128, 32, 8, 3)]}
DX_CONFIGS = {"16": [(128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)],
              "32": [(64, 64, 16, 8, 3)]}
# dW: (BLOCK_N over q|k|v columns, BLOCK_C over channels, rows per step, warps, stages); the
# rows per step are fixed per dtype (the launcher sizes the per-sample partial sums by them)
DW_CONFIGS = {"16": [(128, 64, 64, 8, 4), (64, 128, 64, 8, 4), (64, 64, 64, 4, 3)],
              "32": [(64, 64, 16, 8, 3)]}
INTERP_CONFIG = (32, 32, 32, 4, 1)
INTERP_DW_BLOCK_K = 16  # short row steps: the interpreter's tests cover several per sample
GROUP_M = 8


def _kind(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def _configs(table, kind: str, interp: bool):
    rows = [INTERP_CONFIG] if interp else table[kind]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in rows]


def _prune_mn(m_arg: str, n_arg: str, fwd: bool = False):
    """Drop tiles far larger than the problem (a batch-1 call need not time 128-row tiles),
    and in the forward 128-row tiles whose rows would span samples (see FWD_CONFIGS)."""
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}  # constexpr flags arrive as keyword arguments
        m = max(16, next_power_of_2(a[m_arg]))
        n = max(16, next_power_of_2(a[n_arg]))
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m)
                and c.kwargs["BLOCK_N"] <= max(64, n)
                and not (fwd and c.kwargs["BLOCK_M"] > 64 and a["HAS_CB"]
                         and _cb_rows(a["N"], c.kwargs["BLOCK_M"]) != 1)]
        return keep or [c for c in configs if c.kwargs["BLOCK_M"] <= 64][-1:]
    return prune


def _cb_rows(N: int, block_m: int) -> int:
    """Samples one forward row tile can touch: 1, 2, or 0 meaning many (a 2-D gather)."""
    return 1 if N % block_m == 0 else (2 if N > block_m else 0)


@functools.lru_cache(maxsize=None)
def _tuned(which: str, kind: str, interp: bool):
    """The autotuned launcher, built on first use (no GPU query at import)."""
    if which == "fwd":
        fn = triton.heuristics({"EVEN_K": lambda a: a["C"] % a["BLOCK_K"] == 0,
                                "CB_ROWS": lambda a: _cb_rows(a["N"], a["BLOCK_M"])})(
            _kernels._time_qkv_fwd_kernel)
        return triton.autotune(_configs(FWD_CONFIGS, kind, interp),
                               key=["M", "N", "C", "CP", "HAS_LN", "HAS_CB"],  # N: CB_ROWS
                               prune_configs_by={"early_config_prune":
                                                 _prune_mn("M", "CP", fwd=True)})(fn)
    if which == "dx":
        return triton.autotune(_configs(DX_CONFIGS, kind, interp), key=["M", "C", "CP"],
                               prune_configs_by={"early_config_prune": _prune_mn("M", "C")}
                               )(_kernels._time_qkv_bwd_kernel_dx)
    rows = [INTERP_CONFIG] if interp else DW_CONFIGS[kind]
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s)
               for bn, bc, _, w, s in rows]
    return triton.autotune(configs, key=["M", "C", "CP", "HAS_LN", "PER_SAMPLE"])(
        _kernels._time_qkv_bwd_kernel_dw)


def _dw_block_k(dtype: torch.dtype) -> int:
    return INTERP_DW_BLOCK_K if interpreting() else DW_CONFIGS[_kind(dtype)][0][2]


def _vec(elsize: int, *sizes: int) -> int:
    """Largest power of two <= 16 bytes of elements dividing every size and stride given."""
    v = 16 // elsize
    while v > 1 and any(s % v for s in sizes):
        v //= 2
    return v


def _dw_split(T: int, CP: int, C: int, device: torch.device) -> int:
    """Row splits of the dW GEMM (fixed-order fp32 partials): only when its 128x128 output
    tiles cannot fill the card (narrow layers), keeping >= 16 row steps per split."""
    if device.type != "cuda":
        return 2 if T >= 4 else 1  # the interpreter exercises the partial reduction
    tiles = 3 * cdiv(CP, 128) * cdiv(C, 128)
    sms = sm_count(device)
    if tiles >= sms:
        return 1
    return max(1, min(cdiv(sms, tiles), T // 16))


def _weight_rowsum(weight: torch.Tensor) -> torch.Tensor:
    """wsum_j = sum_c W[j, c] in fp32, recomputed every call. A cache keyed on the weight's
    version counter goes silently stale after writes through `.data` (they bypass the counter),
    and the sum reads W once: 3C' * C elements, about 1% of the bytes the GEMM itself moves at
    DiffiT-XL's 65536 x 1152 x 3456."""
    return weight.sum(dim=1, dtype=torch.float32)


def _per_sample_bias(temb, bias, temb_weight, temb_bias) -> Tuple[Optional[torch.Tensor], int]:
    """cb = bias + temb W_t^T + b_t in fp32: one tiny GEMM per call, not per token."""
    if temb is None:
        return (None, 0) if bias is None else (bias.float().contiguous()[None], 0)
    cb = torch.matmul(temb.float(), temb_weight.float().t())                # [B, 3C']
    for t in (temb_bias, bias):
        if t is not None:
            cb = cb + t.float()
    return cb, cb.stride(0)


def _time_qkv_fwd(x, temb, weight, bias, temb_weight, temb_bias, num_heads: int,
                  norm_eps: Optional[float]):
    B, N, C = x.shape
    C3 = weight.shape[0]
    CP, M = C3 // 3, B * N
    has_ln = norm_eps is not None
    out = empty((B, N, C3), x.dtype, x.device)
    mean = empty((M if has_ln else 0,), torch.float32, x.device)
    rstd = empty((M if has_ln else 0,), torch.float32, x.device)
    if M == 0:
        return out, mean, rstd
    cb, stride_cb_b = _per_sample_bias(temb, bias, temb_weight, temb_bias)
    wsum = _weight_rowsum(weight) if has_ln else None
    dummy = mean if has_ln else torch.empty(1, dtype=torch.float32, device=x.device)
    el = x.element_size()
    kernel = _tuned("fwd", _kind(x.dtype), interpreting())
    grid = lambda META: (cdiv(M, META["BLOCK_M"]) * 3 * cdiv(CP, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](
        x, weight, wsum if wsum is not None else dummy, cb if cb is not None else dummy, out,
        mean if has_ln else dummy, rstd if has_ln else dummy,
        M, N, C, CP, float(norm_eps) if has_ln else 0.0,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), stride_cb_b,
        OVEC=_vec(el, C3), XVEC=_vec(el, x.stride(0), x.stride(1)),
        WVEC=_vec(el, weight.stride(0)), HAS_LN=has_ln, HAS_CB=cb is not None,
        UPCAST=dot_upcast(x.dtype), DOT_PREC="ieee",
        GROUP_M=GROUP_M,
    )
    return out, mean, rstd


def _token_sums(grads, B: int, CP: int) -> torch.Tensor:
    """S[b, j] = sum_n g[b, n, j] in fp32 (torch's reduction: deterministic)."""
    return torch.cat([g.sum(dim=2, dtype=torch.float32).reshape(B, CP) for g in grads], dim=1)


def _time_qkv_bwd(dq, dk, dv, x, weight, mean, rstd, has_ln: bool, need_dx: bool,
                  need_dw: bool):
    B, N, C = x.shape
    C3 = weight.shape[0]
    CP, D, M = C3 // 3, dq.shape[3], B * N
    grads = [unit_last_stride(g.to(x.dtype)) for g in (dq, dk, dv)]
    gs = [s for g in grads for s in g.stride()[:3]]
    el = x.element_size()
    VEC = _vec(el, D, *gs)
    upcast = dot_upcast(x.dtype)
    kind = _kind(x.dtype)
    dx = empty((B, N, C) if need_dx else (0,), x.dtype, x.device)
    dw = empty((C3, C) if need_dw else (0,), x.dtype, x.device)
    if M == 0:
        if need_dw:
            dw.zero_()
        return dx, dw, torch.zeros(B, C3, dtype=torch.float32, device=x.device)
    if need_dx:
        grid = lambda META: (cdiv(M, META["BLOCK_M"]) * cdiv(C, META["BLOCK_N"]),)  # noqa: E731
        _tuned("dx", kind, interpreting())[grid](
            *grads, weight, dx, M, N, C, CP, *gs, weight.stride(0), weight.stride(1),
            D=D, VEC=VEC, WVEC=_vec(el, weight.stride(0)), UPCAST=upcast, DOT_PREC="ieee",
            GROUP_M=GROUP_M)
        if has_ln:
            block = min(next_power_of_2(C), LN_BLOCK_C)
            _kernels._time_qkv_bwd_kernel_ln[(M,)](
                dx, x, mean, rstd, N, C, x.stride(0), x.stride(1), NUM_CHUNKS=cdiv(C, block),
                BLOCK_C=block, num_warps=row_warps(block))
    S = None
    if need_dw:
        bk = _dw_block_k(x.dtype)
        per_sample = N % bk == 0 or N >= 8 * bk
        tps = cdiv(N, bk)
        T = B * tps if per_sample else cdiv(M, bk)
        split = _dw_split(T, CP, C, x.device)
        part = dw[None] if split == 1 else empty((split, C3, C), torch.float32, x.device)
        spart = empty((T, C3) if per_sample else (1,), torch.float32, x.device)
        dummy = mean if has_ln else spart
        grid = lambda META: (3 * cdiv(CP, META["BLOCK_N"]) * cdiv(C, META["BLOCK_C"]),  # noqa
                             split)
        _tuned("dw", kind, interpreting())[grid](
            *grads, x, mean if has_ln else dummy, rstd if has_ln else dummy, part, spart,
            M, N, C, CP, T, tps, *gs, x.stride(0), x.stride(1), part.stride(0), part.stride(1),
            D=D, VEC=VEC, XVEC=_vec(el, x.stride(0), x.stride(1)), HAS_LN=has_ln,
            PER_SAMPLE=per_sample, UPCAST=upcast, DOT_PREC="ieee", BLOCK_K=bk)
        if split > 1:
            dw = part.sum(0).to(x.dtype)  # fixed order over the splits
        if per_sample:
            S = spart.view(B, tps, C3).sum(1)
    if S is None:
        S = _token_sums(grads, B, CP)
    return dx, dw, S


# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("diffit_kernels::time_qkv_fwd", mutates_args=())
def _time_qkv_fwd_op(x: torch.Tensor, temb: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: Optional[torch.Tensor], temb_weight: Optional[torch.Tensor],
                     temb_bias: Optional[torch.Tensor], num_heads: int,
                     norm_eps: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _time_qkv_fwd(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps)


@_time_qkv_fwd_op.register_fake
def _(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps):
    B, N, C = x.shape
    CP = weight.shape[0] // 3
    stats = x.new_empty((B * N if norm_eps is not None else 0,), dtype=torch.float32)
    return x.new_empty((B, N, 3 * CP)), stats, torch.empty_like(stats)


@torch.library.custom_op("diffit_kernels::time_qkv_bwd", mutates_args=())
def _time_qkv_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, x: torch.Tensor,
                     weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, has_ln: bool,
                     need_dx: bool, need_dw: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _time_qkv_bwd(dq, dk, dv, x, weight, mean, rstd, has_ln, need_dx, need_dw)


@_time_qkv_bwd_op.register_fake
def _(dq, dk, dv, x, weight, mean, rstd, has_ln, need_dx, need_dw):
    B = x.shape[0]
    dx = x.new_empty(x.shape if need_dx else (0,))
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    return dx, dw, x.new_empty((B, weight.shape[0]), dtype=torch.float32)


def _split_heads(qkv: torch.Tensor, H: int):
    """[B, N, 3C'] -> q, k, v [B, H, N, d] views (strides (N*3C', d, 3C', 1))."""
    B, N, C3 = qkv.shape
    return qkv.view(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)


def _save(ctx, x, temb, weight, bias, temb_weight, temb_bias, norm_eps, mean, rstd):
    ctx.save_for_backward(x, temb, weight, temb_weight, mean, rstd)
    ctx.has_ln = norm_eps is not None
    ctx.has_bias = bias is not None
    ctx.has_temb_bias = temb_bias is not None


def _input_grads(ctx, dq, dk, dv):
    """(dx, dtemb, dweight, dbias, dtemb_weight, dtemb_bias) from the three head gradients."""
    x, temb, weight, temb_weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, S = _time_qkv_bwd_op(dq, dk, dv, x, weight, mean, rstd, ctx.has_ln, need[0], need[2])
    dt = x.dtype
    ssum = S.sum(0)                                                          # [3C'] fp32
    dbias = ssum.to(dt) if ctx.has_bias and need[3] else None
    dtemb = dtw = dtb = None
    if temb is not None:
        dtemb = torch.matmul(S, temb_weight.float()).to(dt) if need[1] else None   # [B, Ct]
        dtw = torch.matmul(S.t(), temb.float()).to(dt) if need[4] else None       # [3C', Ct]
        dtb = ssum.to(dt) if ctx.has_temb_bias and need[5] else None
    return (dx if need[0] else None, dtemb, dw if need[2] else None, dbias, dtw, dtb)


def _setup_context(ctx, inputs, output):
    x, temb, weight, bias, temb_weight, temb_bias, _num_heads, norm_eps = inputs
    _, mean, rstd = output
    _save(ctx, x, temb, weight, bias, temb_weight, temb_bias, norm_eps, mean, rstd)
    ctx.num_heads = _num_heads
    ctx.mark_non_differentiable(mean, rstd)


def _op_backward(ctx, dqkv, _dmean, _drstd):
    return _input_grads(ctx, *_split_heads(dqkv, ctx.num_heads)) + (None, None)


_time_qkv_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _TimeQKV(torch.autograd.Function):
    """The public path: q, k, v leave as three views of one buffer, so autograd hands their
    gradients over separately and they are never stacked into a [B, N, 3C'] copy (the op's
    own autograd above receives the gradient of its single output buffer instead)."""

    @staticmethod
    def forward(ctx, x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps):
        qkv, mean, rstd = _time_qkv_fwd_op(x, temb, weight, bias, temb_weight, temb_bias,
                                           num_heads, norm_eps)
        _save(ctx, x, temb, weight, bias, temb_weight, temb_bias, norm_eps, mean, rstd)
        return _split_heads(qkv, num_heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        return _input_grads(ctx, dq, dk, dv) + (None, None)


# ---------------------------------------------------------------------------------------------
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
    """TMSA's QKV projection with the time token (and LayerNorm) fused, split into heads.

        xn = LN(x) without affine (norm_eps a float) else x
        q | k | v = xn W^T + bias + (temb W_t^T + temb_bias)[b]       [B, N, 3C'] -> heads

    Args:
        x: [B, N, C] float32 / float16 / bfloat16; rows may be strided (e.g. a channel slice of
            a wider tensor), the channel stride should be 1 (else x is copied once).
        temb: [B, Ct] time token, or None: no time term (then temb_weight / temb_bias are None).
        weight: [3C', C] (rows q | k | v; head h = rows h*d:(h+1)*d of each third).
        bias: [3C'] or None.  temb_weight: [3C', Ct].  temb_bias: [3C'] or None.
        num_heads: H, dividing C'; d = C' / H.
        norm_eps: None = x is used as is; a float = LayerNorm (no affine) with this epsilon,
            folded into the GEMM (statistics in fp32, no normalised copy of x).
        backend: "auto" | "triton" | "torch" (see diffit_kernels._common.resolve_backend).
    Returns:
        q, k, v [B, H, N, d]: views of one [B, N, 3C'] buffer (on either backend; strides
        (N*3C', d, 3C', 1)), which tmsa_attention reads without a copy. Gradients flow to x,
        temb, weight, bias, temb_weight and temb_bias; the backward is deterministic and takes
        dq, dk, dv as they come (no concatenated copy). Do not modify q, k, v in place (they
        are outputs of one autograd node).
    """
    reference.check_time_qkv_inputs(x, temb, weight, bias, temb_weight, temb_bias, num_heads,
                                    norm_eps)
    tensors = (x, temb, weight, bias, temb_weight, temb_bias)
    if resolve_backend(backend, *tensors) == "torch":
        return reference.time_qkv(*tensors, num_heads, norm_eps=norm_eps)
    check_kernel_dtype("x", x)
    x = unit_last_stride(x)
    eps = None if norm_eps is None else float(norm_eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _TimeQKV.apply(x, temb, weight, bias, temb_weight, temb_bias, num_heads, eps)
    qkv, _, _ = _time_qkv_fwd_op(x, temb, weight, bias, temb_weight, temb_bias, num_heads, eps)
    return _split_heads(qkv, num_heads)


# ---------------------------------------------------------------------------------------------
def aot_specs():
    """Every config the launchers ship, at DiffiT-XL's layout (C = 1152, 16 heads of d = 72):
    each autotune entry per dtype with the heaviest feature set, plus the lighter variants."""
    from ._aot import AotSpec

    specs = []
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                         ("fp32", torch.float32)):
        kind = _kind(torch_dt)
        el = torch.tensor([], dtype=torch_dt).element_size()
        vec = _vec(el, 72, 1152)
        fwd_sig = {"X": f"*{dt}", "W": f"*{dt}", "WSUM": "*fp32", "CB": "*fp32", "OUT": f"*{dt}",
                   "MEAN": "*fp32", "RSTD": "*fp32", **ints("M", "N", "C", "CP"), "eps": "fp32",
                   **ints("stride_x_b", "stride_x_n", "stride_w_j", "stride_cb_b")}
        common = dict(D=72, VEC=vec, UPCAST=False, DOT_PREC="ieee", stride_w_c=1)
        for bm, bn, bk, w, s in FWD_CONFIGS[kind]:
            # the cb layouts each tile size may meet: 1 row (128-row tiles), else any
            variants = [(True, 1), (False, 1)] if bm > 64 else [(True, 2), (True, 0), (False, 0)]
            for ln, rows in variants:
                specs.append(AotSpec(
                    "_time_qkv_fwd_kernel", _kernels._time_qkv_fwd_kernel, fwd_sig,
                    {"OVEC": vec, "XVEC": vec, "WVEC": vec, "UPCAST": False, "DOT_PREC": "ieee",
                     "stride_w_c": 1, "HAS_LN": ln, "HAS_CB": True, "CB_ROWS": rows,
                     "EVEN_K": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                     "GROUP_M": GROUP_M},
                    w, s, f"{dt} {'LN' if ln else 'noLN'} cb{rows} {bm}x{bn}x{bk} w{w} s{s}",
                    kind == "16"))
        dx_sig = {"GQ": f"*{dt}", "GK": f"*{dt}", "GV": f"*{dt}", "W": f"*{dt}", "DX": f"*{dt}",
                  **ints("M", "N", "C", "CP", "stride_w_j",
                         *(f"stride_g{t}_{a}" for t in "qkv" for a in "bhn"))}
        for bm, bn, bk, w, s in DX_CONFIGS[kind]:
            specs.append(AotSpec(
                "_time_qkv_bwd_kernel_dx", _kernels._time_qkv_bwd_kernel_dx, dx_sig,
                {**common, "WVEC": vec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                 "GROUP_M": GROUP_M}, w, s, f"{dt} {bm}x{bn}x{bk} w{w} s{s}", kind == "16"))
        dw_sig = {"GQ": f"*{dt}", "GK": f"*{dt}", "GV": f"*{dt}", "X": f"*{dt}", "MEAN": "*fp32",
                  "RSTD": "*fp32", "DW": f"*{dt}", "SPART": "*fp32",
                  **ints("M", "N", "C", "CP", "T", "TPS", "stride_x_b", "stride_x_n",
                         "stride_dw_s", "stride_dw_j",
                         *(f"stride_g{t}_{a}" for t in "qkv" for a in "bhn"))}
        common.pop("stride_w_c")
        for i, (bn, bc, bk, w, s) in enumerate(DW_CONFIGS[kind]):
            for per_sample in ((True, False) if i == 0 else (True,)):
                specs.append(AotSpec(
                    "_time_qkv_bwd_kernel_dw", _kernels._time_qkv_bwd_kernel_dw, dw_sig,
                    {**common, "XVEC": vec, "HAS_LN": True, "PER_SAMPLE": per_sample,
                     "BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_K": bk},
                    w, s, f"{dt} LN {'per-sample' if per_sample else 'flat'} {bn}x{bc}x{bk} "
                    f"w{w} s{s}", kind == "16"))
        for C in (1152, 8192):
            block = min(next_power_of_2(C), LN_BLOCK_C)
            specs.append(AotSpec(
                "_time_qkv_bwd_kernel_ln", _kernels._time_qkv_bwd_kernel_ln,
                {"DX": f"*{dt}", "X": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32",
                 **ints("N", "C", "stride_x_b", "stride_x_n")},
                {"NUM_CHUNKS": cdiv(C, block), "BLOCK_C": block}, row_warps(block), 3,
                f"{dt} C{C} BLOCK_C{block}", False))
    return specs


def check_cases(device: torch.device):
    """Shapes for `python -m diffit_kernels check`: small, with every input and option."""
    from ._check import CheckCase

    def leaves(B, N, C, H, Ct, wide):
        def make():
            return {"x": torch.randn(B, N, C + wide, device=device) * 2 + 0.5,
                    "temb": torch.randn(B, Ct, device=device),
                    "w": torch.randn(3 * C, C, device=device) / C ** 0.5,
                    "b": torch.randn(3 * C, device=device) * 0.5,
                    "tw": torch.randn(3 * C, Ct, device=device) / Ct ** 0.5,
                    "tb": torch.randn(3 * C, device=device) * 0.5}
        return make

    def build(C, H, ln, temb):
        def b(t):
            return dict(x=t["x"][..., :C], temb=t["temb"] if temb else None, weight=t["w"],
                        bias=t["b"], temb_weight=t["tw"] if temb else None,
                        temb_bias=t["tb"] if temb else None, num_heads=H,
                        norm_eps=1e-6 if ln else None)
        return b

    return [
        CheckCase("time_qkv", "B2 N20 C144 H2 (d72) Ct40 LN+temb+bias", time_qkv,
                  reference.time_qkv, leaves(2, 20, 144, 2, 40, 0), build(144, 2, True, True),
                  ("q", "k", "v"), ("x", "temb", "w", "b", "tw", "tb")),
        CheckCase("time_qkv", "B1 N33 C200 H4 strided x, no LN/temb", time_qkv,
                  reference.time_qkv, leaves(1, 33, 200, 4, 8, 5), build(200, 4, False, False),
                  ("q", "k", "v"), ("x", "w", "b")),
    ]
