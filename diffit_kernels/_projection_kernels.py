"""The @triton.jit kernels of time_qkv. diffit_kernels/projection.py holds the math (the
LayerNorm fold, why the MMA sees x - s_m), the launch configs and the launchers that call them.

Conventions shared by the kernels: rows m = (b, n) of x [B, N, C]; columns j of W [3C', C] in
three segments q | k | v of C' each, which no column tile straddles; the head-split q, k, v
gradients are addressed column by column through `_head_cols`.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None


if triton is not None:

    @triton.jit
    def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Grouped tile order: GROUP_M row tiles sweep the columns together (L2 reuse of W)."""
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _head_cols(offs_j, stride_h, D: tl.constexpr, VEC: tl.constexpr):
        """Offsets of columns j (inside q, k or v) in a [.., H, .., D] head-split tensor: runs of
        VEC (dividing D and every stride) stay in one head, so loads / stores vectorise."""
        col = (offs_j // D).to(tl.int64) * stride_h + offs_j % D
        return tl.max_contiguous(tl.multiple_of(col, VEC), VEC)

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong: fp32 operands there
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)
        return tl.dot(a, b, acc, input_precision=DOT_PREC)

    @triton.jit
    def _time_qkv_fwd_kernel(
        X,       # [B, N, C] tokens (rows strided, unit channel stride)
        W,       # [3C', C] spatial weight, rows q | k | v
        WSUM,    # [3C'] fp32 row sums of W: the LayerNorm fold (HAS_LN)
        CB,      # [B, 3C'] fp32 per-sample bias: bias + temb W_t^T + b_t (HAS_CB; B stride 0 ok)
        OUT,     # [B * N, 3C'] = [B, N, 3, H, D]: q, k, v are strided views of it
        MEAN,    # [B * N] fp32 row means, for the backward (HAS_LN)
        RSTD,    # [B * N] fp32 row 1/std (HAS_LN)
        M, N, C, CP, eps,
        stride_x_b, stride_x_n,
        stride_w_j, stride_w_c,
        stride_cb_b,
        OVEC: tl.constexpr, XVEC: tl.constexpr, WVEC: tl.constexpr,
        HAS_LN: tl.constexpr, HAS_CB: tl.constexpr, CB_ROWS: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        tiles_seg = tl.cdiv(CP, BLOCK_N)  # column tiles never straddle q | k | v
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), 3 * tiles_seg, GROUP_M)
        seg = pid_n // tiles_seg
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = (pid_n - seg * tiles_seg) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_j = offs_j < CP
        b = offs_m // N
        n = offs_m - b * N
        x_row = tl.multiple_of(b * stride_x_b + n * stride_x_n, XVEC)
        # [BLOCK_M, BLOCK_K]
        x_ptrs = X + x_row[:, None] + offs_k[None, :]
        # [BLOCK_K, BLOCK_N]: W^T
        w_row = tl.multiple_of((seg * CP + offs_j).to(tl.int64) * stride_w_j, WVEC)
        w_ptrs = W + w_row[None, :] + offs_k[:, None] * stride_w_c
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        shift = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_LN:
            # the row's first element: shifted sums keep var = E[(x-s)^2] - E[x-s]^2 exact-ish
            shift = tl.load(X + x_row, mask=mask_m, other=0.0).to(tl.float32)
        for k0 in range(0, C, BLOCK_K):
            mask_k = offs_k < C - k0
            if EVEN_K:
                x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=mask_j[None, :], other=0.0)
            else:
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            if HAS_LN:
                # [BLOCK_M, BLOCK_K]: x - x[m, 0], the statistics' operand and the MMA's
                xc = tl.where(mask_k[None, :], x.to(tl.float32) - shift[:, None], 0.0)
                s1 += tl.sum(xc, axis=1)
                s2 += tl.sum(xc * xc, axis=1)
                x = xc.to(X.dtype.element_ty)
            acc = _dot(x, w, acc, UPCAST, DOT_PREC)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_w_c
        # [BLOCK_M, BLOCK_N]
        if HAS_LN:
            mean_c = s1 / C
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / C - mean_c * mean_c, 0.0) + eps)
            wsum = tl.load(WSUM + seg * CP + offs_j, mask=mask_j, other=0.0)
            acc = (acc - mean_c[:, None] * wsum[None, :]) * rstd[:, None]
            if pid_n == 0:
                tl.store(MEAN + offs_m, shift + mean_c, mask=mask_m)
                tl.store(RSTD + offs_m, rstd, mask=mask_m)
        mask = mask_m[:, None] & mask_j[None, :]
        if HAS_CB:
            # Each [BLOCK_N] row of cb costs ~32 values + 32 addresses per thread in the MMA
            # layout, so the gather is avoided where the tile's samples are known: one sample
            # (N % BLOCK_M == 0, DiffiT's token counts), two (N > BLOCK_M), else a 2-D gather.
            cb_col = seg * CP + offs_j
            b_lo = (pid_m.to(tl.int64) * BLOCK_M) // N
            if CB_ROWS == 1:
                acc += tl.load(CB + b_lo * stride_cb_b + cb_col, mask=mask_j, other=0.0)[None, :]
            elif CB_ROWS == 2:
                cb_lo = tl.load(CB + b_lo * stride_cb_b + cb_col, mask=mask_j, other=0.0)
                b_hi = tl.minimum(b_lo + 1, (M - 1) // N)
                cb_hi = tl.load(CB + b_hi * stride_cb_b + cb_col, mask=mask_j, other=0.0)
                acc += tl.where((b == b_lo)[:, None], cb_lo[None, :], cb_hi[None, :])
            else:
                acc += tl.load(CB + (b * stride_cb_b)[:, None] + cb_col[None, :], mask=mask,
                               other=0.0)
        # a plain row-major store; q, k, v are strided views of it. (Storing head-split
        # [3, B, H, N, D] took a 64-bit address per element pair and spilled: compile report)
        o_row = tl.multiple_of(offs_m * (3 * CP), OVEC)
        tl.store(OUT + o_row[:, None] + (seg * CP + offs_j)[None, :], acc.to(OUT.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _dx_segment(acc, G, g_row, stride_g_h, mask_m, W, j0, CP, offs_c, mask_c,
                    stride_w_j, stride_w_c, D: tl.constexpr, VEC: tl.constexpr, WVEC: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += g [BLOCK_M, C'] @ W[j0 : j0 + C', offs_c] for one of q | k | v."""
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, CP, BLOCK_K):
            offs_j = k0 + offs_k
            mask_j = offs_j < CP
            # [BLOCK_M, BLOCK_K]
            g = tl.load(G + g_row[:, None] + _head_cols(offs_j, stride_g_h, D, VEC)[None, :],
                        mask=mask_m[:, None] & mask_j[None, :], other=0.0)
            # [BLOCK_K, BLOCK_N]
            w_row = tl.multiple_of((j0 + offs_j).to(tl.int64) * stride_w_j, WVEC)
            w = tl.load(W + w_row[:, None] + offs_c[None, :] * stride_w_c,
                        mask=mask_j[:, None] & mask_c[None, :], other=0.0)
            acc = _dot(g, w, acc, UPCAST, DOT_PREC)
        return acc

    @triton.jit
    def _time_qkv_bwd_kernel_dx(
        GQ, GK, GV,  # [B, H, N, D] gradients of q, k, v (own strides, unit last stride)
        W,           # [3C', C]
        DX,          # [B * N, C] out: grad of LN(x) (HAS_LN: the row kernel finishes it) or x
        M, N, C, CP,
        stride_gq_b, stride_gq_h, stride_gq_n,
        stride_gk_b, stride_gk_h, stride_gk_n,
        stride_gv_b, stride_gv_h, stride_gv_n,
        stride_w_j, stride_w_c,
        D: tl.constexpr, VEC: tl.constexpr, WVEC: tl.constexpr, UPCAST: tl.constexpr,
        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_c = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_N),
                                GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_c = offs_c < C
        b = offs_m // N
        n = offs_m - b * N
        # [BLOCK_M, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _dx_segment(acc, GQ, tl.multiple_of(b * stride_gq_b + n * stride_gq_n, VEC),
                          stride_gq_h, mask_m, W, 0, CP, offs_c, mask_c, stride_w_j, stride_w_c,
                          D, VEC, WVEC, UPCAST, DOT_PREC, BLOCK_K)
        acc = _dx_segment(acc, GK, tl.multiple_of(b * stride_gk_b + n * stride_gk_n, VEC),
                          stride_gk_h, mask_m, W, CP, CP, offs_c, mask_c, stride_w_j, stride_w_c,
                          D, VEC, WVEC, UPCAST, DOT_PREC, BLOCK_K)
        acc = _dx_segment(acc, GV, tl.multiple_of(b * stride_gv_b + n * stride_gv_n, VEC),
                          stride_gv_h, mask_m, W, 2 * CP, CP, offs_c, mask_c, stride_w_j,
                          stride_w_c, D, VEC, WVEC, UPCAST, DOT_PREC, BLOCK_K)
        tl.store(DX + offs_m[:, None] * C + offs_c[None, :], acc.to(DX.dtype.element_ty),
                 mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _time_qkv_bwd_kernel_dw(
        GQ, GK, GV,  # [B, H, N, D] gradients of q, k, v
        X,           # [B, N, C] forward input
        MEAN,        # [B * N] fp32 (HAS_LN)
        RSTD,        # [B * N] fp32 (HAS_LN)
        DW,          # [SPLIT, 3C', C] out: fp32 partials when SPLIT > 1, else dweight itself
        SPART,       # [B * TPS, 3C'] out: fp32 sums of g over each row block (PER_SAMPLE)
        M, N, C, CP, T, TPS,
        stride_gq_b, stride_gq_h, stride_gq_n,
        stride_gk_b, stride_gk_h, stride_gk_n,
        stride_gv_b, stride_gv_h, stride_gv_n,
        stride_x_b, stride_x_n,
        stride_dw_s, stride_dw_j,
        D: tl.constexpr, VEC: tl.constexpr, XVEC: tl.constexpr,
        HAS_LN: tl.constexpr, PER_SAMPLE: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # K loop over row blocks t. PER_SAMPLE: t = (b, n-block), rows never straddle samples
        # (no per-row division, and sum(g) per block is the per-sample sum S); else flat rows.
        tiles_seg = tl.cdiv(CP, BLOCK_N)
        num_c = tl.cdiv(C, BLOCK_C)
        pid = tl.program_id(0)
        pid_j = pid // num_c
        pid_c = pid - pid_j * num_c
        seg = pid_j // tiles_seg
        offs_j = (pid_j - seg * tiles_seg) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_K)
        mask_j = offs_j < CP
        mask_c = offs_c < C
        G = tl.where(seg == 0, GQ, tl.where(seg == 1, GK, GV))
        stride_g_b = tl.where(seg == 0, stride_gq_b, tl.where(seg == 1, stride_gk_b, stride_gv_b))
        stride_g_h = tl.where(seg == 0, stride_gq_h, tl.where(seg == 1, stride_gk_h, stride_gv_h))
        stride_g_n = tl.where(seg == 0, stride_gq_n, tl.where(seg == 1, stride_gk_n, stride_gv_n))
        g_cols = _head_cols(offs_j, stride_g_h, D, VEC)
        per_split = tl.cdiv(T, tl.num_programs(1))
        t0 = tl.program_id(1) * per_split
        t1 = tl.minimum(t0 + per_split, T)
        # [BLOCK_C, BLOCK_N]: dW^T tile
        acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        for t in range(t0, t1):
            t64 = tl.cast(t, tl.int64)
            if PER_SAMPLE:
                b = (t // TPS).to(tl.int64)
                n = (t - b * TPS) * BLOCK_K + offs_r
                mask_r = n < N
            else:
                rows = t64 * BLOCK_K + offs_r
                mask_r = rows < M
                b = rows // N
                n = rows - b * N
            # [BLOCK_K, BLOCK_N]
            g_row = tl.multiple_of(b * stride_g_b + n * stride_g_n, VEC)
            g = tl.load(G + g_row[:, None] + g_cols[None, :],
                        mask=mask_r[:, None] & mask_j[None, :], other=0.0)
            # [BLOCK_K, BLOCK_C]
            x_row = tl.multiple_of(b * stride_x_b + n * stride_x_n, XVEC)
            x = tl.load(X + x_row[:, None] + offs_c[None, :],
                        mask=mask_r[:, None] & mask_c[None, :], other=0.0)
            if HAS_LN:
                # LN(x) rebuilt and rounded to the input dtype, as the GEMM it replaces saw it
                mean = tl.load(MEAN + b * N + n, mask=mask_r, other=0.0)
                rstd = tl.load(RSTD + b * N + n, mask=mask_r, other=0.0)
                x = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None]).to(X.dtype.element_ty)
            if PER_SAMPLE:
                if pid_c == 0:
                    tl.store(SPART + t64 * (3 * CP) + seg * CP + offs_j,
                             tl.sum(g.to(tl.float32), axis=0), mask=mask_j)
            acc = _dot(tl.trans(x), g, acc, UPCAST, DOT_PREC)
        dw_ptrs = DW + tl.program_id(1).to(tl.int64) * stride_dw_s \
            + ((seg * CP + offs_j).to(tl.int64) * stride_dw_j)[None, :] + offs_c[:, None]
        tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask_c[:, None] & mask_j[None, :])

    @triton.jit
    def _time_qkv_bwd_kernel_ln(
        DX,      # [B * N, C] in: grad of LN(x); out: grad of x (in place, row by row)
        X,       # [B, N, C] forward input
        MEAN,    # [B * N] fp32
        RSTD,    # [B * N] fp32
        N, C,
        stride_x_b, stride_x_n,
        NUM_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // N
        x_row = X + b * stride_x_b + (row - b * N) * stride_x_n
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        offs = tl.arange(0, BLOCK_C)
        if NUM_CHUNKS == 1:
            mask_c = offs < C
            dxn = tl.load(DX + row * C + offs, mask=mask_c, other=0.0).to(tl.float32)
            xhat = tl.where(mask_c, (tl.load(x_row + offs, mask=mask_c, other=0.0)
                                     .to(tl.float32) - mean) * rstd, 0.0)
            c1 = tl.sum(dxn * xhat, axis=0) / C
            c2 = tl.sum(dxn, axis=0) / C
            tl.store(DX + row * C + offs, ((dxn - xhat * c1 - c2) * rstd).to(DX.dtype.element_ty),
                     mask=mask_c)
        else:  # wide rows: sums over chunks first, then a second walk writes dx
            c1 = 0.0
            c2 = 0.0
            for ci in range(NUM_CHUNKS):
                offs_c = ci * BLOCK_C + offs
                mask_c = offs_c < C
                dxn = tl.load(DX + row * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                xhat = tl.where(mask_c, (tl.load(x_row + offs_c, mask=mask_c, other=0.0)
                                         .to(tl.float32) - mean) * rstd, 0.0)
                c1 += tl.sum(dxn * xhat, axis=0)
                c2 += tl.sum(dxn, axis=0)
            c1 = c1 / C
            c2 = c2 / C
            for ci in range(NUM_CHUNKS):
                offs_c = ci * BLOCK_C + offs
                mask_c = offs_c < C
                dxn = tl.load(DX + row * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                xhat = (tl.load(x_row + offs_c, mask=mask_c, other=0.0).to(tl.float32) - mean) \
                    * rstd
                tl.store(DX + row * C + offs_c, ((dxn - xhat * c1 - c2) * rstd)
                         .to(DX.dtype.element_ty), mask=mask_c)
