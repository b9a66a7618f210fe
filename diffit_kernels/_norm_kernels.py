"""The @triton.jit kernels of adaln_norm: the forward and backward row kernels and their row
loads. diffit_kernels/norm.py holds the math and how the kernels walk rows, the row plans and
the launchers that call them.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None


if triton is not None:

    @triton.jit
    def _limit(n, n_end, C):
        """Channels to load of row n: C while n is one of the program's rows, else none (the
        prefetch past the last row)."""
        return tl.where(n < n_end, C, 0)

    @triton.jit
    def _adaln_norm_fwd_row(X, RES, b, n, offs_c, mask,
                            stride_x_b, stride_x_n, stride_r_b, stride_r_n, HAS_RES: tl.constexpr):
        """Raw loads of one row of x and residual (masked off past the program's rows)."""
        x = tl.load(X + b * stride_x_b + n * stride_x_n + offs_c, mask=mask, other=0.0)
        r = x
        if HAS_RES:
            r = tl.load(RES + b * stride_r_b + n * stride_r_n + offs_c, mask=mask, other=0.0)
        return x, r

    @triton.jit
    def _adaln_norm_mod(GATE, SCALE, SHIFT, b, offs_c, mask_c, stride_g_b, stride_sc_b,
                        stride_sh_b, HAS_GATE: tl.constexpr, HAS_SCALE: tl.constexpr,
                        HAS_SHIFT: tl.constexpr):
        """Sample b's gate, 1 + scale and shift in fp32 (1, 1, 0 where absent or not asked:
        the backward reads shift only to rebuild SiLU's input)."""
        gate = tl.full(offs_c.shape, 1.0, tl.float32)
        scale1 = tl.full(offs_c.shape, 1.0, tl.float32)
        shift = tl.zeros(offs_c.shape, tl.float32)
        if HAS_GATE:
            gate = tl.load(GATE + b * stride_g_b + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_SCALE:
            scale1 += tl.load(SCALE + b * stride_sc_b + offs_c, mask=mask_c,
                              other=0.0).to(tl.float32)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + b * stride_sh_b + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        return gate, scale1, shift

    @triton.jit
    def _adaln_norm_fwd_one(
        GATE, SCALE, SHIFT, Y, H, MEAN, RSTD, b, row, C, eps, offs_c, mask_c, x, r,
        gate, scale1, shift, stride_g_b, stride_sc_b, stride_sh_b,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_SCALE: tl.constexpr, SILU: tl.constexpr, LOAD_MOD: tl.constexpr,
    ):
        """One row from its loaded x / residual: h, the statistics, y. LOAD_MOD: read the
        modulation vectors here, each just before its use (fewer live registers)."""
        h = x.to(tl.float32)
        if HAS_RES:
            if HAS_GATE:
                if LOAD_MOD:
                    gate, _, _ = _adaln_norm_mod(GATE, SCALE, SHIFT, b, offs_c, mask_c,
                                                 stride_g_b, stride_sc_b, stride_sh_b,
                                                 HAS_GATE, False, False)
                h *= gate
            h += r.to(tl.float32)
            tl.store(H + row * C + offs_c, h.to(H.dtype.element_ty), mask=mask_c)
        mean = tl.sum(h, axis=0) / C
        d = tl.where(mask_c, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        if LOAD_MOD:
            _, scale1, shift = _adaln_norm_mod(GATE, SCALE, SHIFT, b, offs_c, mask_c,
                                               stride_g_b, stride_sc_b, stride_sh_b,
                                               False, HAS_SCALE, HAS_SHIFT)
        z = d * rstd * scale1 + shift
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Y + row * C + offs_c, z.to(Y.dtype.element_ty), mask=mask_c)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _adaln_norm_fwd_kernel(
        X,      # [B, N, C] branch input (strided rows, unit channel stride)
        RES,    # [B, N, C] residual stream (HAS_RES)
        GATE,   # [B, C] gate (HAS_GATE), rows strided
        SHIFT,  # [B, C] shift (HAS_SHIFT)
        SCALE,  # [B, C] scale (HAS_SCALE)
        Y,      # [B, N, C] output, contiguous
        H,      # [B, N, C] new residual stream h, contiguous (HAS_RES)
        MEAN,   # [B * N] fp32 row means, for the backward
        RSTD,   # [B * N] fp32 row 1/std
        N, C, ROWS, P, eps,
        stride_x_b, stride_x_n,
        stride_r_b, stride_r_n,
        stride_g_b, stride_sh_b, stride_sc_b,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_SCALE: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr,
        BLOCK_C: tl.constexpr, AHEAD: tl.constexpr,
    ):
        # program = (b, p): rows p*ROWS.. of sample b. Unless WIDE, the sample's modulation
        # vectors are read once and the next AHEAD (1-3) rows' x / residual are loaded before
        # this row's reductions, so a row's memory latency hides behind the arithmetic before.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // P
        n0 = (pid - b * P) * ROWS
        n_end = tl.minimum(n0 + ROWS, N)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if WIDE:  # 8192-wide rows spill with the row loop and prefetch: one row per program
            x_cur, r_cur = _adaln_norm_fwd_row(X, RES, b, n0, offs_c, mask_c, stride_x_b,
                                               stride_x_n, stride_r_b, stride_r_n, HAS_RES)
            _adaln_norm_fwd_one(GATE, SCALE, SHIFT, Y, H, MEAN, RSTD, b, b * N + n0, C, eps,
                                offs_c, mask_c, x_cur, r_cur, offs_c, offs_c, offs_c,
                                stride_g_b, stride_sc_b, stride_sh_b, HAS_RES, HAS_GATE,
                                HAS_SHIFT, HAS_SCALE, SILU, True)
        else:
            gate, scale1, shift = _adaln_norm_mod(GATE, SCALE, SHIFT, b, offs_c, mask_c,
                                                  stride_g_b, stride_sc_b, stride_sh_b,
                                                  HAS_GATE, HAS_SCALE, HAS_SHIFT)
            x_nx, r_nx = _adaln_norm_fwd_row(X, RES, b, n0, offs_c,
                                             offs_c < _limit(n0, n_end, C), stride_x_b,
                                             stride_x_n, stride_r_b, stride_r_n, HAS_RES)
            if AHEAD >= 2:  # a second row in flight
                x_n2, r_n2 = _adaln_norm_fwd_row(X, RES, b, n0 + 1, offs_c,
                                                 offs_c < _limit(n0 + 1, n_end, C), stride_x_b,
                                                 stride_x_n, stride_r_b, stride_r_n, HAS_RES)
            if AHEAD == 3:  # and a third
                x_n3, r_n3 = _adaln_norm_fwd_row(X, RES, b, n0 + 2, offs_c,
                                                 offs_c < _limit(n0 + 2, n_end, C), stride_x_b,
                                                 stride_x_n, stride_r_b, stride_r_n, HAS_RES)
            for n in range(n0, n_end):
                x_cur, r_cur = x_nx, r_nx
                if AHEAD == 3:
                    x_nx, r_nx = x_n2, r_n2
                    x_n2, r_n2 = x_n3, r_n3
                    x_n3, r_n3 = _adaln_norm_fwd_row(X, RES, b, n + 3, offs_c,
                                                     offs_c < _limit(n + 3, n_end, C),
                                                     stride_x_b, stride_x_n, stride_r_b,
                                                     stride_r_n, HAS_RES)
                elif AHEAD == 2:
                    x_nx, r_nx = x_n2, r_n2
                    x_n2, r_n2 = _adaln_norm_fwd_row(X, RES, b, n + 2, offs_c,
                                                     offs_c < _limit(n + 2, n_end, C),
                                                     stride_x_b, stride_x_n, stride_r_b,
                                                     stride_r_n, HAS_RES)
                else:
                    x_nx, r_nx = _adaln_norm_fwd_row(X, RES, b, n + 1, offs_c,
                                                     offs_c < _limit(n + 1, n_end, C),
                                                     stride_x_b, stride_x_n, stride_r_b,
                                                     stride_r_n, HAS_RES)
                _adaln_norm_fwd_one(GATE, SCALE, SHIFT, Y, H, MEAN, RSTD, b, b * N + n, C, eps,
                                    offs_c, mask_c, x_cur, r_cur, gate, scale1, shift,
                                    stride_g_b, stride_sc_b, stride_sh_b, HAS_RES, HAS_GATE,
                                    HAS_SHIFT, HAS_SCALE, SILU, False)

    @triton.jit
    def _adaln_norm_bwd_row(
        DY, DH_OUT, X, RES, b, n, offs_c, mask,
        stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b, stride_x_n,
        stride_r_b, stride_r_n, HAS_RES: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    ):
        """Raw loads of one row (or chunk) of dy, grad of h, x and residual."""
        dy = tl.load(DY + b * stride_dy_b + n * stride_dy_n + offs_c, mask=mask, other=0.0)
        x = tl.load(X + b * stride_x_b + n * stride_x_n + offs_c, mask=mask, other=0.0)
        dho = dy
        r = x
        if HAS_DH_OUT:
            dho = tl.load(DH_OUT + b * stride_dh_b + n * stride_dh_n + offs_c, mask=mask,
                          other=0.0)
        if HAS_RES:
            r = tl.load(RES + b * stride_r_b + n * stride_r_n + offs_c, mask=mask, other=0.0)
        return dy, dho, x, r

    @triton.jit
    def _adaln_norm_bwd_math(
        dy, x, r, gate, scale1, shift, mean, rstd, mask_c,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, SILU: tl.constexpr,
    ):
        """Rebuild xhat and g = dy * SiLU'(z), gx = g * (1 + scale) from one row's loads."""
        xf = x.to(tl.float32)
        h = xf
        if HAS_RES:
            if HAS_GATE:
                h = xf * gate
            h += r.to(tl.float32)
        xhat = tl.where(mask_c, (h - mean) * rstd, 0.0)
        g = dy.to(tl.float32)
        if SILU:
            z = xhat * scale1 + shift
            sig = tl.sigmoid(z)
            g = g * sig * (1.0 + z * (1.0 - sig))
        return xf, xhat, g, g * scale1

    @triton.jit
    def _adaln_norm_bwd_store(
        DX, DRES, row, C, offs_c, mask_c, xhat, gx, gate, rstd, c1, c2, dho,
        HAS_RES: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    ):
        """dh = rstd * (gx - xhat * c1 - c2) (+ grad of h); store dresidual = dh, dx = gate * dh."""
        dh = tl.where(mask_c, (gx - (xhat * c1 + c2)) * rstd, 0.0)
        if HAS_DH_OUT:
            dh += dho.to(tl.float32)
        if HAS_RES:
            tl.store(DRES + row * C + offs_c, dh.to(DRES.dtype.element_ty), mask=mask_c)
        tl.store(DX + row * C + offs_c, (dh * gate).to(DX.dtype.element_ty), mask=mask_c)
        return dh

    @triton.jit
    def _adaln_norm_bwd_chunk(
        DY, DH_OUT, X, RES, GATE, SHIFT, SCALE, b, n, mean, rstd, offs_c, mask_c,
        stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b, stride_x_n,
        stride_r_b, stride_r_n, stride_g_b, stride_sh_b, stride_sc_b,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_SCALE: tl.constexpr, SILU: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    ):
        """One chunk of a wide row: its loads and modulation, then the shared math."""
        dy, dho, x, r = _adaln_norm_bwd_row(
            DY, DH_OUT, X, RES, b, n, offs_c, mask_c, stride_dy_b, stride_dy_n, stride_dh_b,
            stride_dh_n, stride_x_b, stride_x_n, stride_r_b, stride_r_n, HAS_RES, HAS_DH_OUT)
        gate, scale1, shift = _adaln_norm_mod(GATE, SCALE, SHIFT, b, offs_c, mask_c, stride_g_b,
                                              stride_sc_b, stride_sh_b, HAS_GATE, HAS_SCALE,
                                              SILU and HAS_SHIFT)
        xf, xhat, g, gx = _adaln_norm_bwd_math(dy, x, r, gate, scale1, shift, mean, rstd, mask_c,
                                               HAS_RES, HAS_GATE, SILU)
        return gx, xhat, g, xf, gate, dho

    @triton.jit
    def _adaln_norm_bwd_chunked_rows(
        DY, DH_OUT, X, RES, GATE, SHIFT, SCALE, MEAN, RSTD, DX, DRES, DSHIFT_P, DSCALE_P,
        DGATE_P, b, p, n0, n_end, N, C, P, offs,
        stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b, stride_x_n,
        stride_r_b, stride_r_n, stride_g_b, stride_sh_b, stride_sc_b,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_SCALE: tl.constexpr, SILU: tl.constexpr, HAS_DH_OUT: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """The backward's rows n0..n_end of sample b wider than BLOCK_C: each row walked in
        chunks twice (its sums, then its gradients), the modulation sums added into this
        program's zeroed partial rows."""
        for n in range(n0, n_end):
            row = b * N + n
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            c1 = 0.0
            c2 = 0.0
            for ci in range(tl.cdiv(C, BLOCK_C)):
                offs_c = ci * BLOCK_C + offs
                mask_c = offs_c < C
                gx, xhat, g, xf, gate, dho = _adaln_norm_bwd_chunk(
                    DY, DH_OUT, X, RES, GATE, SHIFT, SCALE, b, n, mean, rstd, offs_c, mask_c,
                    stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b,
                    stride_x_n, stride_r_b, stride_r_n, stride_g_b, stride_sh_b, stride_sc_b,
                    HAS_RES, HAS_GATE, HAS_SHIFT, HAS_SCALE, SILU, HAS_DH_OUT)
                c1 += tl.sum(gx * xhat, axis=0)
                c2 += tl.sum(gx, axis=0)
            c1 = c1 / C
            c2 = c2 / C
            for ci in range(tl.cdiv(C, BLOCK_C)):
                offs_c = ci * BLOCK_C + offs
                mask_c = offs_c < C
                gx, xhat, g, xf, gate, dho = _adaln_norm_bwd_chunk(
                    DY, DH_OUT, X, RES, GATE, SHIFT, SCALE, b, n, mean, rstd, offs_c, mask_c,
                    stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b,
                    stride_x_n, stride_r_b, stride_r_n, stride_g_b, stride_sh_b, stride_sc_b,
                    HAS_RES, HAS_GATE, HAS_SHIFT, HAS_SCALE, SILU, HAS_DH_OUT)
                dh = _adaln_norm_bwd_store(DX, DRES, row, C, offs_c, mask_c, xhat, gx, gate,
                                           rstd, c1, c2, dho, HAS_RES, HAS_DH_OUT)
                part = (b * P + p) * C + offs_c
                if HAS_SHIFT:
                    tl.store(DSHIFT_P + part, tl.load(DSHIFT_P + part, mask=mask_c) + g,
                             mask=mask_c)
                if HAS_SCALE:
                    tl.store(DSCALE_P + part, tl.load(DSCALE_P + part, mask=mask_c)
                             + g * xhat, mask=mask_c)
                if HAS_GATE:
                    tl.store(DGATE_P + part, tl.load(DGATE_P + part, mask=mask_c) + dh * xf,
                             mask=mask_c)

    @triton.jit
    def _adaln_norm_bwd_kernel(
        DY,        # [B, N, C] grad of y (strided rows)
        DH_OUT,    # [B, N, C] grad of the returned h (HAS_DH_OUT, strided rows)
        X,         # [B, N, C] forward input x
        RES,       # [B, N, C] forward residual (HAS_RES)
        GATE,      # [B, C] (HAS_GATE)
        SHIFT,     # [B, C] (HAS_SHIFT, needed to rebuild z for SiLU')
        SCALE,     # [B, C] (HAS_SCALE)
        MEAN,      # [B * N] fp32
        RSTD,      # [B * N] fp32
        DX,        # [B, N, C] out, contiguous
        DRES,      # [B, N, C] out, contiguous (HAS_RES)
        DSHIFT_P,  # [B, P, C] fp32 partial sums (HAS_SHIFT); zeroed when CHUNKED
        DSCALE_P,  # [B, P, C] fp32 partial sums (HAS_SCALE)
        DGATE_P,   # [B, P, C] fp32 partial sums (HAS_GATE)
        N, C, ROWS, P,
        stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n,
        stride_x_b, stride_x_n, stride_r_b, stride_r_n,
        stride_g_b, stride_sh_b, stride_sc_b,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_SCALE: tl.constexpr, SILU: tl.constexpr, HAS_DH_OUT: tl.constexpr,
        CHUNKED: tl.constexpr, BLOCK_C: tl.constexpr, AHEAD: tl.constexpr,
    ):
        # program = (b, p): rows p*ROWS.. of sample b. A row of C <= BLOCK_C is one chunk: the
        # sample's modulation vectors are read once, the three per-sample accumulators stay in
        # registers and the next AHEAD (1-3) rows' four tensors are loaded before this row's
        # reductions. Little's law at ~32 GB/s per SM of an H200 and ~0.7 us of DRAM latency:
        # ~25 KB in flight per SM, where one 1152-wide bf16 row of the four tensors is 9 KB and
        # the 16-warp program of that width fits once per SM (86 registers).
        # Wider rows (C > 2048) would spill, so they are walked in BLOCK_C chunks twice (row
        # sums, then gradients) and the accumulators live in this program's own zeroed partial
        # rows, which keeps the sums deterministic.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // P
        p = pid - b * P
        n0 = p * ROWS
        n_end = tl.minimum(n0 + ROWS, N)
        offs = tl.arange(0, BLOCK_C)
        if not CHUNKED:
            mask_c = offs < C
            gate, scale1, shift = _adaln_norm_mod(GATE, SCALE, SHIFT, b, offs, mask_c,
                                                  stride_g_b, stride_sc_b, stride_sh_b,
                                                  HAS_GATE, HAS_SCALE, SILU and HAS_SHIFT)
            acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
            acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
            acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
            dy_nx, dho_nx, x_nx, r_nx = _adaln_norm_bwd_row(
                DY, DH_OUT, X, RES, b, n0, offs, offs < _limit(n0, n_end, C), stride_dy_b,
                stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b, stride_x_n, stride_r_b,
                stride_r_n, HAS_RES, HAS_DH_OUT)
            if AHEAD >= 2:  # a second row's four tensors in flight
                dy_n2, dho_n2, x_n2, r_n2 = _adaln_norm_bwd_row(
                    DY, DH_OUT, X, RES, b, n0 + 1, offs, offs < _limit(n0 + 1, n_end, C),
                    stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b, stride_x_n,
                    stride_r_b, stride_r_n, HAS_RES, HAS_DH_OUT)
            if AHEAD == 3:  # and a third's
                dy_n3, dho_n3, x_n3, r_n3 = _adaln_norm_bwd_row(
                    DY, DH_OUT, X, RES, b, n0 + 2, offs, offs < _limit(n0 + 2, n_end, C),
                    stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b, stride_x_n,
                    stride_r_b, stride_r_n, HAS_RES, HAS_DH_OUT)
            for n in range(n0, n_end):
                dy, dho, x, r = dy_nx, dho_nx, x_nx, r_nx
                if AHEAD == 3:
                    dy_nx, dho_nx, x_nx, r_nx = dy_n2, dho_n2, x_n2, r_n2
                    dy_n2, dho_n2, x_n2, r_n2 = dy_n3, dho_n3, x_n3, r_n3
                    dy_n3, dho_n3, x_n3, r_n3 = _adaln_norm_bwd_row(
                        DY, DH_OUT, X, RES, b, n + 3, offs, offs < _limit(n + 3, n_end, C),
                        stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b,
                        stride_x_n, stride_r_b, stride_r_n, HAS_RES, HAS_DH_OUT)
                elif AHEAD == 2:
                    dy_nx, dho_nx, x_nx, r_nx = dy_n2, dho_n2, x_n2, r_n2
                    dy_n2, dho_n2, x_n2, r_n2 = _adaln_norm_bwd_row(
                        DY, DH_OUT, X, RES, b, n + 2, offs, offs < _limit(n + 2, n_end, C),
                        stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b,
                        stride_x_n, stride_r_b, stride_r_n, HAS_RES, HAS_DH_OUT)
                else:
                    dy_nx, dho_nx, x_nx, r_nx = _adaln_norm_bwd_row(
                        DY, DH_OUT, X, RES, b, n + 1, offs, offs < _limit(n + 1, n_end, C),
                        stride_dy_b, stride_dy_n, stride_dh_b, stride_dh_n, stride_x_b,
                        stride_x_n, stride_r_b, stride_r_n, HAS_RES, HAS_DH_OUT)
                row = b * N + n
                mean = tl.load(MEAN + row)
                rstd = tl.load(RSTD + row)
                xf, xhat, g, gx = _adaln_norm_bwd_math(dy, x, r, gate, scale1, shift, mean, rstd,
                                                       mask_c, HAS_RES, HAS_GATE, SILU)
                c1 = tl.sum(gx * xhat, axis=0) / C
                c2 = tl.sum(gx, axis=0) / C
                dh = _adaln_norm_bwd_store(DX, DRES, row, C, offs, mask_c, xhat, gx, gate, rstd,
                                           c1, c2, dho, HAS_RES, HAS_DH_OUT)
                acc_shift += g
                acc_scale += g * xhat
                acc_gate += dh * xf
            part = (b * P + p) * C + offs
            if HAS_SHIFT:
                tl.store(DSHIFT_P + part, acc_shift, mask=mask_c)
            if HAS_SCALE:
                tl.store(DSCALE_P + part, acc_scale, mask=mask_c)
            if HAS_GATE:
                tl.store(DGATE_P + part, acc_gate, mask=mask_c)
        else:
            _adaln_norm_bwd_chunked_rows(
                DY, DH_OUT, X, RES, GATE, SHIFT, SCALE, MEAN, RSTD, DX, DRES, DSHIFT_P, DSCALE_P,
                DGATE_P, b, p, n0, n_end, N, C, P, offs, stride_dy_b, stride_dy_n, stride_dh_b,
                stride_dh_n, stride_x_b, stride_x_n, stride_r_b, stride_r_n, stride_g_b,
                stride_sh_b, stride_sc_b, HAS_RES, HAS_GATE, HAS_SHIFT, HAS_SCALE, SILU,
                HAS_DH_OUT, BLOCK_C)
