"""The @triton.jit kernels of time_qkv: the light passes around its cuBLAS GEMMs.
diffit_kernels/projection.py holds the math, the launch plans and the launchers that call them.

Rows m = (b, n) of x [B, N, C]; q | k | v are three segments of C' columns of the [B, N, 3C']
projection, which no column tile straddles; the head-split q, k, v gradients are addressed
column by column through `_head_cols`. Row kernels take a [ROWS, BLOCK_C] tile of whole rows
(CHUNKED: rows wider than BLOCK_C are walked in BLOCK_C chunks, sums first, then the output).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None


if triton is not None:

    @triton.jit
    def _head_cols(offs_j, stride_h, D: tl.constexpr, VEC: tl.constexpr):
        """Offsets of columns j (inside q, k or v) in a [.., H, .., D] head-split tensor: runs of
        VEC (dividing D and every stride) stay in one head, so loads / stores vectorise."""
        col = (offs_j // D).to(tl.int64) * stride_h + offs_j % D
        return tl.max_contiguous(tl.multiple_of(col, VEC), VEC)

    @triton.jit
    def _time_qkv_ln_fwd_kernel(
        X,       # [B, N, C] tokens (rows strided, unit channel stride)
        XHAT,    # [B * N, LD] out: the GEMM's operand in x's dtype: LN(x) in columns < C, then
                 # (TIME_COLS) sample b's one-hot in columns C..LD-1 (1 at C + b % G, else 0:
                 # the sample's place in its group of G)
        MEAN,    # [B * N] fp32 out: row means, for the backward
        RSTD,    # [B * N] fp32 out: row 1/std
        M, N, C, LD, G, eps,
        stride_x_b, stride_x_n,
        XVEC: tl.constexpr, CHUNKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
        TIME_COLS: tl.constexpr,
    ):
        # Statistics in fp32 around the row's first element s: x - s is exact for values near
        # s (Sterbenz), so rows with |mean| >> std keep their precision (mean = s + E[x - s]).
        offs_m = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        mask_m = offs_m < M
        b = offs_m // N
        x_row = tl.multiple_of(b * stride_x_b + (offs_m - b * N) * stride_x_n, XVEC)
        shift = tl.load(X + x_row, mask=mask_m, other=0.0).to(tl.float32)
        offs = tl.arange(0, BLOCK_C)
        if not CHUNKED:
            # [ROWS, BLOCK_C]
            mask = mask_m[:, None] & (offs < C)[None, :]
            xc = tl.load(X + x_row[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, xc - shift[:, None], 0.0)
            mean_c = tl.sum(xc, axis=1) / C
            d = tl.where(mask, xc - mean_c[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
            tl.store(XHAT + offs_m[:, None] * LD + offs[None, :],
                     (d * rstd[:, None]).to(XHAT.dtype.element_ty), mask=mask)
        else:
            s1 = tl.zeros((ROWS,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                mask = mask_m[:, None] & (c0 + offs < C)[None, :]
                xc = tl.load(X + x_row[:, None] + (c0 + offs)[None, :], mask=mask, other=0.0)
                s1 += tl.sum(tl.where(mask, xc.to(tl.float32) - shift[:, None], 0.0), axis=1)
            mean_c = s1 / C
            s2 = tl.zeros((ROWS,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                mask = mask_m[:, None] & (c0 + offs < C)[None, :]
                xc = tl.load(X + x_row[:, None] + (c0 + offs)[None, :], mask=mask, other=0.0)
                d = tl.where(mask, xc.to(tl.float32) - shift[:, None] - mean_c[:, None], 0.0)
                s2 += tl.sum(d * d, axis=1)
            rstd = 1.0 / tl.sqrt(s2 / C + eps)
            for c0 in range(0, C, BLOCK_C):
                mask = mask_m[:, None] & (c0 + offs < C)[None, :]
                xc = tl.load(X + x_row[:, None] + (c0 + offs)[None, :], mask=mask, other=0.0)
                d = xc.to(tl.float32) - shift[:, None] - mean_c[:, None]
                tl.store(XHAT + offs_m[:, None] * LD + (c0 + offs)[None, :],
                         (d * rstd[:, None]).to(XHAT.dtype.element_ty), mask=mask)
        if TIME_COLS > 0:
            offs_t = tl.arange(0, TIME_COLS)
            # via fp32: the interpreter casts a bool to bf16 as the integer bit pattern 1
            hot = tl.where(offs_t[None, :] == (b % G)[:, None], 1.0, 0.0).to(
                XHAT.dtype.element_ty)
            tl.store(XHAT + offs_m[:, None] * LD + C + offs_t[None, :], hot,
                     mask=mask_m[:, None] & (C + offs_t < LD)[None, :])
        tl.store(MEAN + offs_m, shift + mean_c, mask=mask_m)
        tl.store(RSTD + offs_m, rstd, mask=mask_m)

    @triton.jit
    def _time_qkv_bwd_kernel_pack(
        GQ, GK, GV,  # [B, H, N, D] gradients of q, k, v (own strides, unit last stride)
        G,           # [B * N, 3C'] out: the packed gradient dY (STORE)
        SPART,       # [B, T, 3C'] fp32 out: sums of dY over each block of BLOCK_R rows
        N, CP, T,
        stride_gq_b, stride_gq_h, stride_gq_n,
        stride_gk_b, stride_gk_h, stride_gk_n,
        stride_gv_b, stride_gv_h, stride_gv_n,
        D: tl.constexpr, VEC: tl.constexpr, STORE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        # program (b * T + t, column tile): rows t*BLOCK_R.. of sample b, so the row sums are
        # the per-sample partial sums of the bias / time-term gradients (no atomics)
        bt = tl.program_id(0).to(tl.int64)
        b = bt // T
        t = bt - b * T
        tiles_seg = tl.cdiv(CP, BLOCK_J)
        seg = tl.program_id(1) // tiles_seg
        offs_j = (tl.program_id(1) - seg * tiles_seg) * BLOCK_J + tl.arange(0, BLOCK_J)
        n = t * BLOCK_R + tl.arange(0, BLOCK_R)  # int64 (t is)
        mask_j = offs_j < CP
        mask = (n < N)[:, None] & mask_j[None, :]
        SRC = tl.where(seg == 0, GQ, tl.where(seg == 1, GK, GV))
        stride_b = tl.where(seg == 0, stride_gq_b, tl.where(seg == 1, stride_gk_b, stride_gv_b))
        stride_h = tl.where(seg == 0, stride_gq_h, tl.where(seg == 1, stride_gk_h, stride_gv_h))
        stride_n = tl.where(seg == 0, stride_gq_n, tl.where(seg == 1, stride_gk_n, stride_gv_n))
        g_row = tl.multiple_of(b * stride_b + n * stride_n, VEC)
        # [BLOCK_R, BLOCK_J]
        g = tl.load(SRC + g_row[:, None] + _head_cols(offs_j, stride_h, D, VEC)[None, :],
                    mask=mask, other=0.0)
        col = seg * CP + offs_j
        if STORE:
            tl.store(G + ((b * N + n) * (3 * CP))[:, None] + col[None, :], g, mask=mask)
        tl.store(SPART + bt * (3 * CP) + col, tl.sum(g.to(tl.float32), axis=0),
                 mask=mask_j)

    @triton.jit
    def _time_qkv_bwd_kernel_ln(
        DXN,     # [B * N, C] grad of LN(x) (contiguous, the projection's dtype)
        DX,      # [B * N, C] out: grad of x in x's dtype (DXN itself when the dtypes match)
        X,       # [B, N, C] forward input
        MEAN,    # [B * N] fp32
        RSTD,    # [B * N] fp32
        M, N, C,
        stride_x_b, stride_x_n,
        XVEC: tl.constexpr, CHUNKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # dx = rstd * (dxn - xhat * mean(dxn * xhat) - mean(dxn)), xhat rebuilt from x in fp32
        offs_m = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        mask_m = offs_m < M
        b = offs_m // N
        x_row = tl.multiple_of(b * stride_x_b + (offs_m - b * N) * stride_x_n, XVEC)
        mean = tl.load(MEAN + offs_m, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + offs_m, mask=mask_m, other=0.0)
        offs = tl.arange(0, BLOCK_C)
        if not CHUNKED:
            # [ROWS, BLOCK_C]
            mask = mask_m[:, None] & (offs < C)[None, :]
            dxn = tl.load(DXN + offs_m[:, None] * C + offs[None, :], mask=mask,
                          other=0.0).to(tl.float32)
            x = tl.load(X + x_row[:, None] + offs[None, :], mask=mask, other=0.0)
            xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            c1 = tl.sum(dxn * xhat, axis=1) / C
            c2 = tl.sum(dxn, axis=1) / C
            dx = (dxn - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(DX + offs_m[:, None] * C + offs[None, :], dx.to(DX.dtype.element_ty),
                     mask=mask)
        else:
            c1 = tl.zeros((ROWS,), dtype=tl.float32)
            c2 = tl.zeros((ROWS,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                mask = mask_m[:, None] & (c0 + offs < C)[None, :]
                dxn = tl.load(DXN + offs_m[:, None] * C + (c0 + offs)[None, :], mask=mask,
                              other=0.0).to(tl.float32)
                x = tl.load(X + x_row[:, None] + (c0 + offs)[None, :], mask=mask, other=0.0)
                xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
                c1 += tl.sum(dxn * xhat, axis=1)
                c2 += tl.sum(dxn, axis=1)
            c1 = c1 / C
            c2 = c2 / C
            for c0 in range(0, C, BLOCK_C):
                mask = mask_m[:, None] & (c0 + offs < C)[None, :]
                dxn = tl.load(DXN + offs_m[:, None] * C + (c0 + offs)[None, :], mask=mask,
                              other=0.0).to(tl.float32)
                x = tl.load(X + x_row[:, None] + (c0 + offs)[None, :], mask=mask, other=0.0)
                xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
                dx = (dxn - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                tl.store(DX + offs_m[:, None] * C + (c0 + offs)[None, :],
                         dx.to(DX.dtype.element_ty), mask=mask)
