"""time_qkv: TMSA's QKV projection with the time token and LayerNorm, written head-split.

Forward, rows m = (b, n) of x [B, N, C], W [3C', C] (rows q | k | v, head h = j // d):
    xhat = LN(x) (no affine; norm_eps a float) else x      (Triton row kernel, x's dtype)
    y = xhat W^T + cb[b],   cb = bias + temb W_t^T + b_t   (one cuBLAS GEMM into [B, N, 3C'])
    with LayerNorm and a time term: y = [xhat | e_b] [W | cb^T]^T, the row kernel writing the
    one-hot e_b of the row's sample as B extra columns of the GEMM's operand; past TIME_GROUP
    samples, in groups of G samples (one batched GEMM: group g against [W | cb_g^T]), so the
    operand grows by G columns, not B
q, k, v are head-split views of y [B, N, 3C'] that tmsa_attention reads as they are.
Backward, with dY = [dq | dk | dv] [M, 3C'] (a strided view when the three gradients are views
of one buffer, else packed by a Triton kernel that also sums it per sample):
    dW = dY^T xhat,  dxhat = dY W            (two cuBLAS GEMMs: deterministic on one stream)
    dx = rstd * (dxhat - xhat * mean_c(dxhat * xhat) - mean_c(dxhat))     (Triton row kernel)
    S[b] = sum_n dY[b, n]  ->  dbias = dtemb_bias = sum_b S,  dW_t = S^T temb,  dtemb = S W_t
Why the LayerNorm is not folded into the GEMM (TransformerEngine's LayerNormLinear does the
same): the fold saves one write + read of xhat (M x C, ~0.3 GB at DiffiT-XL B256: ~0.1 ms on
an H200) but takes the GEMM off cuBLAS; the fused Triton GEMMs measured 221 TFLOP/s forward
and ~97 TFLOP/s in dW there, where cuBLAS runs ~700. The per-sample time term: as one-hot
columns it costs G / C more GEMM FLOPs (2.8% at DiffiT-XL, G <= 32) and no pass over y; with
one group of B samples that would be 22% at B256 (a guided sampling batch of 128), so larger
batches go in groups of G samples, each with its own copy of [W | cb_g^T] (8 MB at DiffiT-XL,
written once per call). The H200 measured the alternative, a broadcast write of cb into y that
the GEMM accumulates onto (beta = 1), at 1.76x a bare GEMM's time at B256 (still taken where B
has no divisor in [TIME_GROUP_MIN, TIME_GROUP] and exceeds TIME_COLS_MAX, and without
LayerNorm, where no row kernel writes the operand). Without a time term the bias rides
cuBLASLt's epilogue.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from . import _projection_kernels as _kernels
from . import reference
from ._common import (cdiv, check_kernel_dtype, direct_call, dispatch, empty, next_power_of_2,
                      on_tensor_device, overriding, recordable, resolve_backend,
                      unit_last_stride)

# Row kernels (LayerNorm forward / backward): [ROWS, BLOCK_C] tiles of about ROW_TILE elements
# (~16 per thread, 512 per warp), whole rows up to LN_BLOCK_C channels, wider rows in chunks.
# One plan for CUDA and the interpreter: the CPU tests run exactly what a GPU runs.
LN_BLOCK_C = 4096
ROW_TILE = 4096
MAX_ROWS = 16
# The per-sample time term rides the GEMM as one-hot columns (see the module docstring) for up
# to this many samples per call: a column costs 2 M 3C' FLOPs, the broadcast init it replaces
# 2 M 3C' element moves, even at ~286 columns for 16-bit operands on an H100/H200 (0.6 PFLOP/s
# against 4.2 TB/s); fp32 GEMMs run ~10x slower per FLOP.
TIME_COLS_MAX = {2: 256, 4: 32}
# Past TIME_GROUP samples the one-hot columns go per group of G samples, G the largest divisor
# of B in [TIME_GROUP_MIN, TIME_GROUP]: G columns of FLOPs per token against one [W | cb_g^T]
# copy per group (at DiffiT-XL B256 ~0.65 us of GEMM per column against ~4 us of copy per
# group: the sum is least near G = 32)
TIME_GROUP, TIME_GROUP_MIN = 32, 8
# The dY pack / per-sample sum kernel: BLOCK_R rows x BLOCK_J columns (16 KB of bf16), 8 warps.
PACK_BLOCK_R, PACK_BLOCK_J, PACK_WARPS = 64, 128, 8

# Test hook (library code never sets it): a list collecting (kernel, plan) of every launch.
_LOG = {"log": None}


@contextlib.contextmanager
def _record_launches(log: list):
    with overriding(_LOG, log=log):
        yield


def _launched(kernel: str, plan: tuple) -> None:
    if _LOG["log"] is not None:
        _LOG["log"].append((kernel, plan))


def _row_plan(C: int) -> Tuple[int, int, bool, int]:
    """(ROWS, BLOCK_C, CHUNKED, num_warps) of the LayerNorm row kernels for rows of C."""
    block = max(16, min(next_power_of_2(C), LN_BLOCK_C))
    rows = max(1, min(MAX_ROWS, ROW_TILE // block))
    return rows, block, C > block, max(1, min(16, rows * block // 512))


def _vec(elsize: int, *sizes: int) -> int:
    """Largest power of two <= 16 bytes of elements dividing every size and stride given."""
    v = 16 // elsize
    while v > 1 and any(s % v for s in sizes):
        v //= 2
    return v


def _per_sample_bias(temb, bias, temb_weight, temb_bias) -> torch.Tensor:
    """cb = bias + (temb W_t^T + b_t) [B, 3C'] in the weights' dtype, the time term rounded as
    the reference's F.linear rounds it: one tiny GEMM per call, not per token, and no float32
    copy of W_t (4M elements at DiffiT-XL) per call."""
    cb = torch.nn.functional.linear(temb, temb_weight, temb_bias)
    return cb + bias if bias is not None else cb


def _padded_width(C: int, cols: int) -> int:
    """C + cols columns padded to a multiple of 8 (16-byte rows for cuBLAS's fastest kernels)."""
    return cdiv(C + cols, 8) * 8


def _time_columns(B: int, C: int, dtype: torch.dtype, has_temb: bool, has_ln: bool
                  ) -> Tuple[int, int]:
    """(G, width): the forward GEMM's left operand is [M, width], with one-hot time columns for
    groups of G samples (LayerNorm with a time term): C + G padded (_padded_width); G = 0 and
    width C without them. G is B up to TIME_GROUP samples, else the largest divisor of B in
    [TIME_GROUP_MIN, TIME_GROUP], else B up to TIME_COLS_MAX samples."""
    if not (has_temb and has_ln):
        return 0, C
    G = B
    if B > TIME_GROUP:
        G = next((g for g in range(TIME_GROUP, TIME_GROUP_MIN - 1, -1) if B % g == 0), B)
    if G > TIME_COLS_MAX.get(dtype.itemsize, 0):
        return 0, C
    return G, _padded_width(C, G)


def _layernorm_rows(x: torch.Tensor, eps: float, width: int, group: int, dtype: torch.dtype):
    """The forward GEMM's operand [M, width] in `dtype` (the projection's): LN(x) in columns
    < C, one-hot time columns after (width > C: 1 at C + b % group); mean and rstd [M] (fp32)
    of x [B, N, C]."""
    B, N, C = x.shape
    M = B * N
    xhat = empty((M, width), dtype, x.device)
    mean = empty((M,), torch.float32, x.device)
    rstd = empty((M,), torch.float32, x.device)
    rows, block, chunked, warps = _row_plan(C)
    time_cols = next_power_of_2(width - C) if width > C else 0
    _launched("ln_fwd", (rows, block, chunked, warps))
    if time_cols:
        _launched("time_cols", (width - C, time_cols))
    _kernels._time_qkv_ln_fwd_kernel[(cdiv(M, rows),)](
        x, xhat, mean, rstd, M, N, C, width, max(group, 1), eps, x.stride(0), x.stride(1),
        XVEC=_vec(x.element_size(), x.stride(0), x.stride(1)), CHUNKED=chunked, ROWS=rows,
        BLOCK_C=block, TIME_COLS=time_cols, num_warps=warps)
    return xhat, mean, rstd


@on_tensor_device
def _time_qkv_fwd(x, temb, weight, bias, temb_weight, temb_bias, num_heads: int,
                  norm_eps: Optional[float]):
    B, N, C = x.shape
    C3, M = weight.shape[0], B * N
    has_ln = norm_eps is not None
    dt = weight.dtype  # x's, or 16-bit for a float32 x that LN reads (see time_qkv)
    out = empty((B, N, C3), dt, x.device)
    G, width = _time_columns(B, C, dt, temb is not None, has_ln)
    if has_ln and M:
        xhat, mean, rstd = _layernorm_rows(x, float(norm_eps), width, G, dt)
    else:
        xhat = weight.new_empty(0)
        mean, rstd = (torch.empty(0, dtype=torch.float32, device=x.device) for _ in range(2))
        if M == 0:
            return out, xhat, mean, rstd
    a = xhat if has_ln else x.reshape(M, C)  # a view for rows or a channel slice of a buffer
    out2, wt = out.view(M, C3), weight.t()
    if width > C:
        # groups of G samples (one group when G == B): group g's rows [xhat | onehot(b % G)]
        # against [W | cb_g^T | 0], built by one cat (W broadcast over the groups, not copied
        # before it)
        cb = _per_sample_bias(temb, bias, temb_weight, temb_bias)
        groups = B // G
        pad = weight.new_zeros(C3, width - C - G)
        wg = torch.cat((weight.expand(groups, C3, C), cb.view(groups, G, C3).transpose(1, 2),
                        pad.expand(groups, C3, width - C - G)), dim=2)
        if groups == 1:
            torch.mm(a, wg[0].t(), out=out2)
        else:
            _launched("time_groups", (groups, G))
            torch.bmm(a.view(groups, G * N, width), wg.transpose(1, 2),
                      out=out.view(groups, G * N, C3))
    elif temb is not None:
        # the GEMM accumulates onto cb[b] broadcast over each sample's rows (beta = 1)
        cb = _per_sample_bias(temb, bias, temb_weight, temb_bias)
        out.copy_(cb[:, None, :].expand(B, N, C3))
        out2.addmm_(a, wt)
    elif bias is not None:
        torch.addmm(bias, a, wt, out=out2)  # cuBLASLt's bias epilogue: no extra pass
    else:
        torch.mm(a, wt, out=out2)
    return out, xhat, mean, rstd


def _packed(grads, B: int, N: int, C3: int) -> Optional[torch.Tensor]:
    """dY [M, 3C'] as a view when dq, dk, dv are the head-split views of one [B, N, 3C']
    buffer (what _split_heads makes), else None."""
    dq, dk, dv = grads
    D = dq.shape[3]
    want = (N * C3, D, C3, 1)
    el = dq.element_size()
    for g, seg in zip(grads, range(3)):
        if g.untyped_storage().data_ptr() != dq.untyped_storage().data_ptr() \
                or g.data_ptr() != dq.data_ptr() + seg * (C3 // 3) * el:
            return None
        if any(size > 1 and s != w for size, s, w in zip(g.shape, g.stride(), want)):
            return None
    return torch.as_strided(dq, (B * N, C3), (C3, 1), dq.storage_offset())


def _pack_and_sum(grads, B: int, N: int, C3: int, store: bool):
    """(dY [M, 3C'] packed (None unless store), S [B, 3C'] fp32 per-sample sums of dY)."""
    CP, D = C3 // 3, grads[0].shape[3]
    T = cdiv(N, PACK_BLOCK_R)
    gs = [s for g in grads for s in g.stride()[:3]]
    g2 = empty((B * N, C3), grads[0].dtype, grads[0].device) if store else None
    spart = empty((B, T, C3), torch.float32, grads[0].device)
    _launched("pack", (PACK_BLOCK_R, PACK_BLOCK_J, PACK_WARPS, store))
    _kernels._time_qkv_bwd_kernel_pack[(B * T, 3 * cdiv(CP, PACK_BLOCK_J))](
        *grads, g2 if store else spart, spart, N, CP, T, *gs, D=D,
        VEC=_vec(grads[0].element_size(), D, *gs), STORE=store, BLOCK_R=PACK_BLOCK_R,
        BLOCK_J=PACK_BLOCK_J, num_warps=PACK_WARPS)
    return g2, spart.sum(1)  # fixed-order sum over the row blocks: deterministic


@on_tensor_device
def _time_qkv_bwd(dq, dk, dv, x, xhat, weight, mean, rstd, has_ln: bool, need_dx: bool,
                  need_dw: bool):
    B, N, C = x.shape
    C3, M = weight.shape[0], B * N
    dx = empty((B, N, C) if need_dx else (0,), x.dtype, x.device)
    dw = empty((C3, C) if need_dw else (0,), weight.dtype, x.device)
    if M == 0:
        if need_dw:
            dw.zero_()
        return dx, dw, torch.zeros(B, C3, dtype=torch.float32, device=x.device)
    grads = [unit_last_stride(g.to(weight.dtype)) for g in (dq, dk, dv)]
    g2 = _packed(grads, B, N, C3)
    packed, S = _pack_and_sum(grads, B, N, C3, store=g2 is None)
    g2 = packed if g2 is None else g2
    if need_dw:
        torch.mm(g2.t(), xhat[:, :C] if has_ln else x.reshape(M, C), out=dw)
    if need_dx:
        dx2 = dx.view(M, C)
        # dxhat in the projection's dtype: in place in dx, or beside a float32 x's dx
        dxn = dx2 if x.dtype == weight.dtype else empty((M, C), weight.dtype, x.device)
        torch.mm(g2, weight, out=dxn)
        if has_ln:
            rows, block, chunked, warps = _row_plan(C)
            _launched("ln_bwd", (rows, block, chunked, warps))
            _kernels._time_qkv_bwd_kernel_ln[(cdiv(M, rows),)](
                dxn, dx2, x, mean, rstd, M, N, C, x.stride(0), x.stride(1),
                XVEC=_vec(x.element_size(), x.stride(0), x.stride(1)), CHUNKED=chunked,
                ROWS=rows, BLOCK_C=block, num_warps=warps)
    return dx, dw, S


# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("diffit_kernels::time_qkv_fwd", mutates_args=())
def _time_qkv_fwd_op(x: torch.Tensor, temb: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: Optional[torch.Tensor], temb_weight: Optional[torch.Tensor],
                     temb_bias: Optional[torch.Tensor], num_heads: int, norm_eps: Optional[float]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _time_qkv_fwd(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps)


@_time_qkv_fwd_op.register_fake
def _(x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps):
    B, N, C = x.shape
    ln = norm_eps is not None and B * N > 0
    width = _time_columns(B, C, weight.dtype, temb is not None, ln)[1]
    stats = x.new_empty((B * N if ln else 0,), dtype=torch.float32)
    return (weight.new_empty((B, N, weight.shape[0])),
            weight.new_empty((B * N, width) if ln else (0,)), stats, torch.empty_like(stats))


@torch.library.custom_op("diffit_kernels::time_qkv_bwd", mutates_args=())
def _time_qkv_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, x: torch.Tensor,
                     xhat: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor, has_ln: bool, need_dx: bool, need_dw: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _time_qkv_bwd(dq, dk, dv, x, xhat, weight, mean, rstd, has_ln, need_dx, need_dw)


@_time_qkv_bwd_op.register_fake
def _(dq, dk, dv, x, xhat, weight, mean, rstd, has_ln, need_dx, need_dw):
    B = x.shape[0]
    dx = x.new_empty(x.shape if need_dx else (0,))
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    return dx, dw, x.new_empty((B, weight.shape[0]), dtype=torch.float32)


def _split_heads(qkv: torch.Tensor, H: int):
    """[B, N, 3C'] -> q, k, v [B, H, N, d] views (strides (N*3C', d, 3C', 1))."""
    B, N, C3 = qkv.shape
    return qkv.view(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)


def _save(ctx, x, temb, weight, bias, temb_weight, temb_bias, norm_eps, xhat, mean, rstd):
    ctx.save_for_backward(x, temb, weight, temb_weight, xhat, mean, rstd)
    ctx.has_ln = norm_eps is not None
    ctx.has_bias = bias is not None
    ctx.has_temb_bias = temb_bias is not None


def _input_grads(ctx, dq, dk, dv):
    """(dx, dtemb, dweight, dbias, dtemb_weight, dtemb_bias) from the three head gradients."""
    x, temb, weight, temb_weight, xhat, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, S = dispatch("time_qkv_bwd", getattr(ctx, "direct", False), _time_qkv_bwd_op,
                         _time_qkv_bwd, dq, dk, dv, x, xhat, weight, mean, rstd, ctx.has_ln,
                         need[0], need[2])
    dt = weight.dtype  # temb and the biases share it
    want_bias = ctx.has_bias and need[3]
    want_tb = temb is not None and ctx.has_temb_bias and need[5]
    ssum = S.sum(0) if want_bias or want_tb else None               # [3C'], summed in fp32
    dtemb = dtw = None
    if temb is not None and (need[1] or need[4]):
        # the time term's GEMMs in the weights' dtype, as autograd of the reference's F.linear
        # runs them (dY summed per sample, then rounded): no float32 copies of W_t and temb
        S = S.to(dt)
        dtemb = torch.mm(S, temb_weight) if need[1] else None                     # [B, Ct]
        dtw = torch.mm(S.t(), temb) if need[4] else None                          # [3C', Ct]
    return (dx if need[0] else None, dtemb, dw if need[2] else None,
            ssum.to(dt) if want_bias else None, dtw, ssum.to(dt) if want_tb else None)


def _setup_context(ctx, inputs, output):
    x, temb, weight, bias, temb_weight, temb_bias, _num_heads, norm_eps = inputs
    _, xhat, mean, rstd = output
    _save(ctx, x, temb, weight, bias, temb_weight, temb_bias, norm_eps, xhat, mean, rstd)
    ctx.num_heads = _num_heads
    ctx.mark_non_differentiable(xhat, mean, rstd)


def _op_backward(ctx, dqkv, _dxhat, _dmean, _drstd):
    return _input_grads(ctx, *_split_heads(dqkv, ctx.num_heads)) + (None, None)


_time_qkv_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _TimeQKV(torch.autograd.Function):
    """The public path: q, k, v leave as three views of one buffer, so autograd hands their
    gradients over separately (the op's own autograd above receives the gradient of its single
    output buffer instead, which the backward reads as dY with no copy)."""

    @staticmethod
    def forward(ctx, x, temb, weight, bias, temb_weight, temb_bias, num_heads, norm_eps):
        # the custom op under torch.compile and on fake tensors, else the implementation itself
        ctx.direct = direct_call(x, temb, weight, bias, temb_weight, temb_bias)
        qkv, xhat, mean, rstd = dispatch("time_qkv_fwd", ctx.direct, _time_qkv_fwd_op,
                                         _time_qkv_fwd, x, temb, weight, bias, temb_weight,
                                         temb_bias, num_heads, norm_eps)
        _save(ctx, x, temb, weight, bias, temb_weight, temb_bias, norm_eps, xhat, mean, rstd)
        return _split_heads(qkv, num_heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        return _input_grads(ctx, dq, dk, dv) + (None, None)


# ---------------------------------------------------------------------------------------------
@recordable("time_qkv")
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
    """TMSA's QKV projection with the time token (and a LayerNorm), split into heads.

        xn = LN(x) without affine (norm_eps a float) else x
        q | k | v = xn W^T + bias + (temb W_t^T + temb_bias)[b]       [B, N, 3C'] -> heads

    Args:
        x: [B, N, C] float32 / float16 / bfloat16; rows may be strided (e.g. a channel slice of
            a wider tensor), the channel stride should be 1 (else x is copied once). With
            norm_eps, x may be float32 under 16-bit weights (autocast's residual stream): the
            LayerNorm reads it as it is and writes its output in weight's dtype, dx comes back
            float32, and no cast kernel runs around the op.
        temb: [B, Ct] time token, or None: no time term (then temb_weight / temb_bias are None).
        weight: [3C', C] (rows q | k | v; head h = rows h*d:(h+1)*d of each third).
        bias: [3C'] or None.  temb_weight: [3C', Ct].  temb_bias: [3C'] or None.
        num_heads: H, dividing C'; d = C' / H.
        norm_eps: None = x is used as is; a float = LayerNorm (no affine) with this epsilon
            first (statistics in fp32; the normalised x is kept for the backward's dW).
        backend: "auto" | "triton" | "torch" (see diffit_kernels._common.resolve_backend).
    Returns:
        q, k, v [B, H, N, d] in weight's dtype: views of one [B, N, 3C'] buffer (on either
        backend; strides (N*3C', d, 3C', 1)), which tmsa_attention reads without a copy.
        Gradients flow to x, temb, weight, bias, temb_weight and temb_bias; the backward is
        deterministic and takes dq, dk, dv as they come (no concatenated copy). Do not modify
        q, k, v in place (they are outputs of one autograd node).
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
    args = (x, temb, weight, bias, temb_weight, temb_bias)  # x with a unit channel stride
    qkv, _, _, _ = dispatch("time_qkv_fwd", direct_call(*args), _time_qkv_fwd_op, _time_qkv_fwd,
                            *args, num_heads, eps)
    return _split_heads(qkv, num_heads)


# ---------------------------------------------------------------------------------------------
def row_plans():
    """Every (ROWS, BLOCK_C, CHUNKED, num_warps) the LayerNorm row kernels can take, with the
    smallest C that takes it: one per power-of-two row width, plus chunked wide rows."""
    plans = {}
    C = 1
    while C <= 2 * LN_BLOCK_C:
        plans.setdefault(_row_plan(C), C)
        plans.setdefault(_row_plan(C + 1), C + 1)
        C *= 2
    return plans


def aot_specs():
    """Every launch plan of the three kernels, per dtype. Int arguments are an example launch's
    (B 32, N 256), typed as the JIT types them: DiffiT-XL's width C 1152 (16 heads of d 72) for
    the plan it takes, the plan's smallest (odd) width for the others; the dY pack kernel
    (storing and sum-only) at XL's head-split layout."""
    from ._aot import AotSpec, rows_vectorise

    specs = []
    B, N = 32, 256
    xl_plan = _row_plan(1152)
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                         ("fp32", torch.float32)):
        el = torch_dt.itemsize
        for (rows, block, chunked, warps), C in row_plans().items():
            # at DiffiT-XL's rows: one-hot time columns (B 32, and the most samples taken)
            # and, for 16-bit projections, a float32 x (autocast's residual stream)
            xl = (rows, block, chunked, warps) == xl_plan
            W = 1152 if xl else C
            plan = dict(CHUNKED=chunked, ROWS=rows, BLOCK_C=block)
            label = f"{dt} C{W} {rows}x{block}{' chunked' if chunked else ''} w{warps}"
            xdts = (dt, "fp32") if xl and el == 2 else (dt,)
            for xdt in xdts:
                mixed = " fp32 x" if xdt != dt else ""
                # (samples with one-hot columns, width): the most samples at the plan's odd
                # width, whose padding gives the widest TIME_COLS block
                cases = [(0, W)] + ([(B, W)] if xl else []) + (
                    [(TIME_COLS_MAX[el], C)] if xl and not mixed else [])
                for samples, w in cases:
                    ld = _padded_width(w, samples) if samples else w
                    tc = next_power_of_2(ld - w) if ld > w else 0
                    specs.append(AotSpec(
                        "_time_qkv_ln_fwd_kernel", _kernels._time_qkv_ln_fwd_kernel,
                        {"X": f"*{xdt}", "XHAT": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32",
                         "eps": "fp32"},
                        dict(plan, XVEC=_vec(4 if xdt == "fp32" else el, N * w, w),
                             TIME_COLS=tc), warps, 1,
                        f"{dt} C{w} {rows}x{block}{' chunked' if chunked else ''} w{warps}"
                        + mixed + (f" time cols {tc}" if tc else ""), False,
                        example=dict(M=(samples or B) * N, N=N, C=w, LD=ld, G=samples or 1,
                                     stride_x_b=N * w, stride_x_n=w),
                        vector16=rows_vectorise(dt, w)))
                specs.append(AotSpec(
                    "_time_qkv_bwd_kernel_ln", _kernels._time_qkv_bwd_kernel_ln,
                    {"DXN": f"*{dt}", "DX": f"*{xdt}", "X": f"*{xdt}", "MEAN": "*fp32",
                     "RSTD": "*fp32"},
                    dict(plan, XVEC=_vec(4 if xdt == "fp32" else el, N * W, W)), warps, 1,
                    label + mixed, False,
                    example=dict(M=B * N, N=N, C=W, stride_x_b=N * W, stride_x_n=W),
                    vector16=rows_vectorise(dt, W)))
        H, D = 16, 72
        gs = (H * N * D, N * D, D) * 3  # contiguous [B, H, N, D] gradients of q, k, v
        for store in (True, False):
            specs.append(AotSpec(
                "_time_qkv_bwd_kernel_pack", _kernels._time_qkv_bwd_kernel_pack,
                {"GQ": f"*{dt}", "GK": f"*{dt}", "GV": f"*{dt}", "G": f"*{dt}",
                 "SPART": "*fp32"},
                dict(D=D, VEC=_vec(el, D, *gs), STORE=store, BLOCK_R=PACK_BLOCK_R,
                     BLOCK_J=PACK_BLOCK_J),
                PACK_WARPS, 1, f"{dt} d{D} {PACK_BLOCK_R}x{PACK_BLOCK_J} "
                f"{'pack+sum' if store else 'sum'}", False,
                example=dict(N=N, CP=H * D, T=cdiv(N, PACK_BLOCK_R),
                             **dict(zip((f"stride_g{t}_{a}" for t in "qkv" for a in "bhn"),
                                        gs))), vector16=rows_vectorise(dt, D)))
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
