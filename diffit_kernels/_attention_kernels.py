"""The @triton.jit kernels of tmsa_attention. diffit_kernels/attention.py gives their math (the
window-major token order, the head-dim split, the deterministic dtable) and launches them;
_attention_index.py builds the geometry arguments and the reduction plans they take.

Conventions shared by every kernel: tokens are walked in the virtual window-major order and
mapped to rows of the [B, H, N, D] tensors by `_tokens`; the head dim d travels as two
power-of-two column chunks (D0, then D1 when HAS_D1), so a [rows, d] operand is two tensors and
a dot over d is two dots; logits are in log2 units (exp2), with the table pre-scaled by log2(e).
"""
from __future__ import annotations

LOG2E = 1.4426950408889634

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None


if triton is not None:
    _LOG2E = tl.constexpr(LOG2E)

    @triton.jit
    def _tokens(offs, gw, TOK, n_lut, WINDOWED: tl.constexpr, HAS_TABLE: tl.constexpr):
        """Virtual token index -> (row in the [N] token axis, relative-position code, window).
        Windows: read from TOK [3, n_lut] int32 (row | code | window of every virtual token,
        padded past the last tile; see _attention_index._token_lut), which costs three vector loads
        where the arithmetic costs three integer divisions by runtime values per token."""
        if WINDOWED:
            row = tl.load(TOK + offs)
            code = tl.load(TOK + n_lut + offs)
            w = tl.load(TOK + 2 * n_lut + offs)
        else:
            w = offs * 0
            row = offs
            if HAS_TABLE:
                code = offs + (offs // gw) * (gw - 1)
            else:
                code = offs * 0
        return row, code, w

    @triton.jit
    def _row_offsets(PTR, base, rows, stride_n):
        """[len(rows), 1] element offsets of rows, hinted: the launcher guarantees strides that
        are multiples of 8, so every offset is one. 16-bit rows claim it on both dims, which
        Triton 3.6 needs to vectorise the column loads (with [8, 1] it loaded every K / V row
        as scalar 16-bit LDGs through registers; 3.9 vectorised either way); float32 rows keep
        [8, 1], the register allocation their configs were chosen under."""
        offs = base + rows[:, None] * stride_n
        if PTR.dtype.element_ty.primitive_bitwidth == 16:
            offs = tl.multiple_of(offs, [8, 8])
        else:
            offs = tl.multiple_of(offs, [8, 1])
        return offs

    @triton.jit
    def _load_rows(PTR, base, rows, mask, stride_n, D, D0: tl.constexpr, D1: tl.constexpr,
                   HAS_D1: tl.constexpr):
        """[len(rows), D] rows of a strided tensor as two column chunks (D0, then D1)."""
        offs0 = tl.arange(0, D0)
        ptrs = PTR + _row_offsets(PTR, base, rows, stride_n)
        x0 = tl.load(ptrs + offs0[None, :], mask=mask[:, None] & (offs0[None, :] < D), other=0.0)
        x1 = x0
        if HAS_D1:
            offs1 = D0 + tl.arange(0, D1)
            x1 = tl.load(ptrs + offs1[None, :], mask=mask[:, None] & (offs1[None, :] < D),
                         other=0.0)
        return x0, x1

    @triton.jit
    def _store_rows(PTR, base, rows, mask, stride_n, D, x0, x1, D0: tl.constexpr,
                    D1: tl.constexpr, HAS_D1: tl.constexpr):
        offs0 = tl.arange(0, D0)
        ptrs = PTR + _row_offsets(PTR, base, rows, stride_n)
        tl.store(ptrs + offs0[None, :], x0.to(PTR.dtype.element_ty),
                 mask=mask[:, None] & (offs0[None, :] < D))
        if HAS_D1:
            offs1 = D0 + tl.arange(0, D1)
            tl.store(ptrs + offs1[None, :], x1.to(PTR.dtype.element_ty),
                     mask=mask[:, None] & (offs1[None, :] < D))

    @triton.jit
    def _grad_rows(b, h, bh, H, N, D, PACKED: tl.constexpr):
        """(offset of sample b's head h, row stride) in the backward's gradient buffer, the
        launcher's own: PACKED [B, N, 3, H, D] (dq | dk | dv, DQ, DK, DV at its three slots),
        else three contiguous [B, H, N, D] (bh = b * H + h, as the float32 configs were
        chosen under: other arithmetic made some spill)."""
        if PACKED:
            return b * (N * 3 * H * D) + h * D, 3 * H * D
        return bh * N * D, D

    @triton.jit
    def _mm(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # the interpreter's bf16 dot is wrong: upcast there (values already rounded to bf16)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _mm_nt(a0, a1, b0, b1, HAS_D1: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
        """a @ b^T over the split head dim: [R, D] x [C, D] -> [R, C] fp32."""
        s = _mm(a0, tl.trans(b0), None, UPCAST, PRECISION)
        if HAS_D1:
            s = _mm(a1, tl.trans(b1), s, UPCAST, PRECISION)
        return s

    @triton.jit
    def _logits(a0, a1, b0, b1, TAB_H, BIAS_BH, row_a, code_a, win_a, mask_a, row_b, code_b,
                win_b, mask_b, stride_bias_a, stride_bias_b, rel_off, qk_scale, gw, gw_log2,
                HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, WIN_MASK: tl.constexpr,
                KEYS_FIRST: tl.constexpr, HAS_D1: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, SLAB_TAB: tl.constexpr, EVEN: tl.constexpr):
        """Logits (log2 units) of a [rows a, cols b] tile and the mask of pairs that attend.
        KEYS_FIRST: the rows are keys (the transposed tile of the dK/dV kernel). EVEN: both
        tiles whole and inside one window, so every pair attends.
        SLAB_TAB (global attention on a grid gw = 2^gw_log2 >= 16 wide): TAB_H points at the
        head's [2gh - 1, gw, gw] slab (attention._table_arg), at its relative grid row 0, where
        the bias of query i and key j is TAB_H[gw * i + j - (j // gw) * gw * (gw + 1)]: one
        unmasked vector load per tile, contiguous along the keys in runs of gw."""
        # [A, B]
        s = _mm_nt(a0, a1, b0, b1, HAS_D1, UPCAST, PRECISION) * qk_scale
        valid = mask_a[:, None] & mask_b[None, :]
        if WIN_MASK:
            if not EVEN:
                valid = valid & (win_a[:, None] == win_b[None, :])
        if HAS_TABLE and SLAB_TAB:
            # tokens past N (masked tiles) read entries of the first grid row's tokens, which are
            # then dropped: a query token 0's, a key the token of its own column (kt mod gw), so
            # an aligned run of 16 keys reads 16 consecutive entries, as the hints below claim
            # (N is a multiple of gw >= 16: each run is whole or wholly masked)
            if KEYS_FIRST:
                qt, kt, mq, mk = row_b, row_a, mask_b, mask_a
            else:
                qt, kt, mq, mk = row_a, row_b, mask_a, mask_b
            if not EVEN:
                qt = tl.where(mq, qt, 0)
                kt = tl.where(mk, kt, kt & (gw - 1))
            qpart = tl.multiple_of(qt * gw, 16)
            kpart = tl.max_contiguous(tl.multiple_of(kt - (kt >> gw_log2) * (gw * gw + gw), 16),
                                      16)
            if KEYS_FIRST:
                s += tl.load(TAB_H + kpart[:, None] + qpart[None, :])
            else:
                s += tl.load(TAB_H + qpart[:, None] + kpart[None, :])
        elif HAS_TABLE:
            if KEYS_FIRST:
                idx = code_b[None, :] - code_a[:, None] + rel_off
            else:
                idx = code_a[:, None] - code_b[None, :] + rel_off
            s += tl.load(TAB_H + idx, mask=valid, other=0.0)
        if HAS_BIAS:
            bias = tl.load(BIAS_BH + row_a[:, None] * stride_bias_a
                           + row_b[None, :] * stride_bias_b, mask=valid, other=0.0)
            s += bias.to(tl.float32) * _LOG2E
        return s, valid

    @triton.jit
    def _table_head(TAB, h, R, slab, gw, SLAB_TAB: tl.constexpr):
        """Head h's table: its [R] row of the [H, R] table, or (SLAB_TAB) its slab of
        (2gh - 1) gw x gw matrices at the one of relative grid row 0 (the middle)."""
        if SLAB_TAB:
            return TAB + h * slab + (slab - gw * gw) // 2
        return TAB + h * R

    @triton.jit
    def _inside(offs, end, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        """offs < end, or (EVEN: every tile is whole and inside one window, the launcher
        checked) a constant true that the compiler folds away with the masks and selects built
        on it."""
        if EVEN:
            return tl.full([BLOCK], 1, tl.int1)
        return offs < end

    @triton.jit
    def _span(start, BLOCK: tl.constexpr, N, n_win, WINDOWED: tl.constexpr):
        """[lo, hi): the virtual tokens that the tile [start, start + BLOCK) attends to."""
        if WINDOWED:
            lo = (start // n_win) * n_win
            hi = ((tl.minimum(start + BLOCK, N) - 1) // n_win + 1) * n_win
        else:
            lo = start * 0
            hi = N
        return lo, hi

    @triton.jit
    def _tmsa_attention_fwd_kernel(
        Q,      # [B, H, N, D] strided, unit last stride
        K,      # [B, H, N, D]
        V,      # [B, H, N, D]
        TAB,    # [H, R] fp32 table * log2(e) (HAS_TABLE), or [H, slab] (SLAB_TAB)
        BIAS,   # [B or 1, H, N, N] dense bias, any strides (HAS_BIAS)
        O,      # [B, H, N, D] out, strided (the launcher's: [B, N, H, D] memory)
        LSE,    # [B, H, N] fp32 out: log2 of the softmax denominators
        stride_q_b, stride_q_h, stride_q_n,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_o_b, stride_o_h, stride_o_n,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        H, N, D, R, slab, gw_log2, n_win, gw, TOK, n_lut, rel_off, qk_scale,
        N_BUCKET, SPAN_BUCKET,  # autotune keys only
        HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, WINDOWED: tl.constexpr,
        SLAB_TAB: tl.constexpr, EVEN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
        HAS_D1: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # EVEN (the attended span, N or a window, a multiple of both blocks): no masks
        D = D // 8 * 8  # D % 8 == 0 (checked): lets the compiler vectorize the row masks
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // H
        h = pid_bh % H
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = _inside(offs_m, N, BLOCK_M, EVEN)
        row_m, code_m, win_m = _tokens(offs_m, gw, TOK, n_lut, WINDOWED, HAS_TABLE)
        lo, hi = _span(start_m, BLOCK_M, N, n_win, WINDOWED)
        q0, q1 = _load_rows(Q, b * stride_q_b + h * stride_q_h, row_m, mask_m, stride_q_n, D,
                            D0, D1, HAS_D1)
        k_bh = b * stride_k_b + h * stride_k_h
        v_bh = b * stride_v_b + h * stride_v_h
        TAB_H = _table_head(TAB, h, R, slab, gw, SLAB_TAB)
        BIAS_BH = BIAS + b * stride_bias_b + h * stride_bias_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = _inside(offs_n, hi, BLOCK_N, EVEN)
            row_n, code_n, win_n = _tokens(offs_n, gw, TOK, n_lut, WINDOWED, HAS_TABLE)
            k0, k1 = _load_rows(K, k_bh, row_n, mask_n, stride_k_n, D, D0, D1, HAS_D1)
            v0, v1 = _load_rows(V, v_bh, row_n, mask_n, stride_v_n, D, D0, D1, HAS_D1)
            # [BLOCK_M, BLOCK_N]
            s, valid = _logits(q0, q1, k0, k1, TAB_H, BIAS_BH, row_m, code_m, win_m, mask_m,
                               row_n, code_n, win_n, mask_n, stride_bias_m, stride_bias_n,
                               rel_off, qk_scale, gw, gw_log2, HAS_TABLE, HAS_BIAS, WINDOWED,
                               False, HAS_D1, UPCAST, PRECISION, SLAB_TAB, EVEN)
            if not EVEN:
                s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing to attend to yet (tile of another window) keeps p = 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = p.to(Q.dtype.element_ty)
            acc0 = _mm(pv, v0, acc0 * alpha[:, None], UPCAST, PRECISION)
            if HAS_D1:
                acc1 = _mm(pv, v1, acc1 * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new
        # rows past N attend to nothing (l = 0); NaN stays NaN
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        inv = 1.0 / l_i
        _store_rows(O, b * stride_o_b + h * stride_o_h, row_m, mask_m, stride_o_n, D,
                    acc0 * inv[:, None], acc1 * inv[:, None], D0, D1, HAS_D1)
        tl.store(LSE + pid_bh * N + row_m, m_i + tl.math.log2(l_i), mask=mask_m)

    @triton.jit
    def _tmsa_attention_bwd_kernel_delta(
        O,      # [B, H, N, D] strided forward output, unit last stride
        DO,     # [B, H, N, D] strided, unit last stride
        DELTA,  # [B, H, N] fp32 out: rowsum(do * o)
        stride_o_b, stride_o_h, stride_o_n,
        stride_do_b, stride_do_h, stride_do_n,
        H, N, D,
        BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    ):
        D = D // 8 * 8  # D % 8 == 0 (checked): lets the compiler vectorize the row masks
        pid_bh = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        b = pid_bh // H
        h = pid_bh % H
        o0, o1 = _load_rows(O, b * stride_o_b + h * stride_o_h, offs_m, mask_m, stride_o_n, D,
                            D0, D1, HAS_D1)
        do0, do1 = _load_rows(DO, b * stride_do_b + h * stride_do_h, offs_m, mask_m,
                              stride_do_n, D, D0, D1, HAS_D1)
        delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
        if HAS_D1:
            delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
        tl.store(DELTA + pid_bh * N + offs_m, delta, mask=mask_m)

    @triton.jit
    def _dkdv_sample(Q, K, V, DO, TAB_H, BIAS, LSE, DELTA, DK, DV, PART, b, h, first,
                     row_n, code_n, win_n, mask_n, lo, hi,
                     stride_q_b, stride_q_h, stride_q_n, stride_k_b, stride_k_h, stride_k_n,
                     stride_v_b, stride_v_h, stride_v_n, stride_do_b, stride_do_h, stride_do_n,
                     stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
                     H, N, D, gw_log2, n_win, gw, TOK, n_lut, rel_off, qk_scale, sm_scale,
                     HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, WINDOWED: tl.constexpr,
                     SLAB_TAB: tl.constexpr, EVEN: tl.constexpr, ACC_DS: tl.constexpr,
                     PACKED: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                     HAS_D1: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """dK, dV of one key tile of one (sample b, head h); ACC_DS: ds added to PART
        ([BLOCK_N, span] row-major, stored when `first`, else accumulated)."""
        pid_bh = b * H + h
        k0, k1 = _load_rows(K, b * stride_k_b + h * stride_k_h, row_n, mask_n, stride_k_n, D,
                            D0, D1, HAS_D1)
        v0, v1 = _load_rows(V, b * stride_v_b + h * stride_v_h, row_n, mask_n, stride_v_n, D,
                            D0, D1, HAS_D1)
        q_bh = b * stride_q_b + h * stride_q_h
        do_bh = b * stride_do_b + h * stride_do_h
        BIAS_BH = BIAS + b * stride_bias_b + h * stride_bias_h
        dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
        dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = _inside(offs_m, hi, BLOCK_M, EVEN)
            row_m, code_m, win_m = _tokens(offs_m, gw, TOK, n_lut, WINDOWED, HAS_TABLE)
            q0, q1 = _load_rows(Q, q_bh, row_m, mask_m, stride_q_n, D, D0, D1, HAS_D1)
            do0, do1 = _load_rows(DO, do_bh, row_m, mask_m, stride_do_n, D, D0, D1, HAS_D1)
            lse = tl.load(LSE + pid_bh * N + row_m, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + pid_bh * N + row_m, mask=mask_m, other=0.0)
            # [BLOCK_N, BLOCK_M]: keys are rows
            sT, valid = _logits(k0, k1, q0, q1, TAB_H, BIAS_BH, row_n, code_n, win_n, mask_n,
                                row_m, code_m, win_m, mask_m, stride_bias_n, stride_bias_m,
                                rel_off, qk_scale, gw, gw_log2, HAS_TABLE, HAS_BIAS, WINDOWED,
                                True, HAS_D1, UPCAST, PRECISION, SLAB_TAB, EVEN)
            pT = tl.math.exp2(sT - lse[None, :])
            if not EVEN:
                pT = tl.where(valid, pT, 0.0)
            pTc = pT.to(Q.dtype.element_ty)
            dv0 = _mm(pTc, do0, dv0, UPCAST, PRECISION)
            if HAS_D1:
                dv1 = _mm(pTc, do1, dv1, UPCAST, PRECISION)
            dsT = pT * (_mm_nt(v0, v1, do0, do1, HAS_D1, UPCAST, PRECISION) - delta[None, :])
            dsTc = dsT.to(Q.dtype.element_ty)
            dk0 = _mm(dsTc, q0, dk0, UPCAST, PRECISION)
            if HAS_D1:
                dk1 = _mm(dsTc, q1, dk1, UPCAST, PRECISION)
            if ACC_DS:
                # the share's first sample stores, the others add
                again = (tl.zeros([BLOCK_N, BLOCK_M], tl.int32) + first) == 0
                prev = tl.load(PART + start_m, mask=again, other=0.0)
                tl.store(PART + start_m, prev + dsT)
        g_bh, g_n = _grad_rows(b, h, pid_bh, H, N, D, PACKED)
        _store_rows(DK, g_bh, row_n, mask_n, g_n, D, dk0 * sm_scale, dk1 * sm_scale,
                    D0, D1, HAS_D1)
        _store_rows(DV, g_bh, row_n, mask_n, g_n, D, dv0, dv1, D0, D1, HAS_D1)

    @triton.jit
    def _tmsa_attention_bwd_kernel_dkdv(
        Q, K, V,  # [B, H, N, D] strided
        DO,       # [B, H, N, D] strided grad of o
        TAB,      # [H, R] fp32 * log2(e) (HAS_TABLE), or [H, slab] (SLAB_TAB)
        BIAS,     # [B or 1, H, N, N] dense bias (HAS_BIAS)
        LSE,      # [B, H, N] fp32
        DELTA,    # [B, H, N] fp32
        DK, DV,   # [B, H, N, D] out: views of one [B, N, 3, H, D] buffer with dq (PACKED)
        PARTIAL,  # [H, n_groups, key tiles, BLOCK_N, span_pad] fp32 out (ACC_DS): ds summed
                  # over the program's samples; column r = query lo + r of the key tile's span
        stride_q_b, stride_q_h, stride_q_n,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_do_b, stride_do_h, stride_do_n,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        H, N, D, R, slab, gw_log2, n_win, gw, TOK, n_lut, rel_off, qk_scale, sm_scale,
        per_b, step, n_groups, span_pad,
        N_BUCKET, SPAN_BUCKET,
        HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, WINDOWED: tl.constexpr,
        SLAB_TAB: tl.constexpr, EVEN: tl.constexpr, ACC_DS: tl.constexpr, PACKED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
        HAS_D1: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        D = D // 8 * 8  # D % 8 == 0 (checked): lets the compiler vectorize the row masks
        # One program: one key tile of one head for one sample: sample g, or (ACC_DS) sample
        # `step` of batch share g, whose ds it adds into a partial slice only this share's
        # programs write, one launch per step (the launcher reduces the partials into the
        # table in a fixed order).
        pid_n = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        g = tl.program_id(2)
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = _inside(offs_n, N, BLOCK_N, EVEN)
        row_n, code_n, win_n = _tokens(offs_n, gw, TOK, n_lut, WINDOWED, HAS_TABLE)
        lo, hi = _span(start_n, BLOCK_N, N, n_win, WINDOWED)
        TAB_H = _table_head(TAB, h, R, slab, gw, SLAB_TAB)
        if ACC_DS:
            # [BLOCK_N, BLOCK_M]: this program's slice, shifted so query start_m is column 0
            part = PARTIAL + ((h * n_groups + g) * tl.num_programs(0) + pid_n) * (
                BLOCK_N * span_pad) + tl.arange(0, BLOCK_N)[:, None] * span_pad \
                + tl.arange(0, BLOCK_M)[None, :] - lo
            # sample `step` of the share: one launch per step (a loop over the share inside
            # the kernel spills hundreds of bytes under Triton 3.6)
            _dkdv_sample(Q, K, V, DO, TAB_H, BIAS, LSE, DELTA, DK, DV, part,
                         h * 0 + g * per_b + step, h, step == 0, row_n, code_n, win_n, mask_n,
                         lo, hi, stride_q_b, stride_q_h, stride_q_n, stride_k_b, stride_k_h,
                         stride_k_n, stride_v_b, stride_v_h, stride_v_n, stride_do_b,
                         stride_do_h, stride_do_n, stride_bias_b, stride_bias_h,
                         stride_bias_m, stride_bias_n, H, N, D, gw_log2, n_win, gw, TOK,
                         n_lut, rel_off, qk_scale, sm_scale, HAS_TABLE, HAS_BIAS, WINDOWED,
                         SLAB_TAB, EVEN, True, PACKED, BLOCK_M, BLOCK_N, D0, D1, HAS_D1, UPCAST,
                         PRECISION)
        else:
            _dkdv_sample(Q, K, V, DO, TAB_H, BIAS, LSE, DELTA, DK, DV, PARTIAL,
                         g.to(tl.int64), h, True, row_n, code_n, win_n, mask_n, lo, hi,
                         stride_q_b, stride_q_h, stride_q_n, stride_k_b, stride_k_h,
                         stride_k_n, stride_v_b, stride_v_h, stride_v_n, stride_do_b,
                         stride_do_h, stride_do_n, stride_bias_b, stride_bias_h,
                         stride_bias_m, stride_bias_n, H, N, D, gw_log2, n_win, gw, TOK,
                         n_lut, rel_off, qk_scale, sm_scale, HAS_TABLE, HAS_BIAS, WINDOWED,
                         SLAB_TAB, EVEN, False, PACKED, BLOCK_M, BLOCK_N, D0, D1, HAS_D1, UPCAST,
                         PRECISION)

    @triton.jit
    def _tmsa_attention_bwd_kernel_dq(
        Q, K, V,  # [B, H, N, D] strided
        DO,       # [B, H, N, D] strided grad of o
        TAB,      # [H, R] fp32 * log2(e) (HAS_TABLE), or [H, slab] (SLAB_TAB)
        BIAS,     # [B or 1, H, N, N] (HAS_BIAS)
        LSE,      # [B, H, N] fp32
        DELTA,    # [B, H, N] fp32
        DQ,       # [B, H, N, D] out: a view of one [B, N, 3, H, D] buffer (PACKED)
        DBIAS,    # [B, H, N, N] out, contiguous (STORE_DS: the per-sample dense bias gradient)
        stride_q_b, stride_q_h, stride_q_n,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_do_b, stride_do_h, stride_do_n,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        H, N, D, R, slab, gw_log2, n_win, gw, TOK, n_lut, rel_off, qk_scale, sm_scale,
        N_BUCKET, SPAN_BUCKET,
        HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DS: tl.constexpr,
        WINDOWED: tl.constexpr, SLAB_TAB: tl.constexpr, EVEN: tl.constexpr, PACKED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
        HAS_D1: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        D = D // 8 * 8  # D % 8 == 0 (checked): lets the compiler vectorize the row masks
        pid_bh = tl.program_id(1).to(tl.int64)
        b = pid_bh // H
        h = pid_bh % H
        start_m = tl.program_id(0) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = _inside(offs_m, N, BLOCK_M, EVEN)
        row_m, code_m, win_m = _tokens(offs_m, gw, TOK, n_lut, WINDOWED, HAS_TABLE)
        lo, hi = _span(start_m, BLOCK_M, N, n_win, WINDOWED)
        q0, q1 = _load_rows(Q, b * stride_q_b + h * stride_q_h, row_m, mask_m, stride_q_n, D,
                            D0, D1, HAS_D1)
        do0, do1 = _load_rows(DO, b * stride_do_b + h * stride_do_h, row_m, mask_m, stride_do_n,
                              D, D0, D1, HAS_D1)
        lse = tl.load(LSE + pid_bh * N + row_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + pid_bh * N + row_m, mask=mask_m, other=0.0)
        k_bh = b * stride_k_b + h * stride_k_h
        v_bh = b * stride_v_b + h * stride_v_h
        TAB_H = _table_head(TAB, h, R, slab, gw, SLAB_TAB)
        BIAS_BH = BIAS + b * stride_bias_b + h * stride_bias_h
        dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
        dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = _inside(offs_n, hi, BLOCK_N, EVEN)
            row_n, code_n, win_n = _tokens(offs_n, gw, TOK, n_lut, WINDOWED, HAS_TABLE)
            k0, k1 = _load_rows(K, k_bh, row_n, mask_n, stride_k_n, D, D0, D1, HAS_D1)
            v0, v1 = _load_rows(V, v_bh, row_n, mask_n, stride_v_n, D, D0, D1, HAS_D1)
            # [BLOCK_M, BLOCK_N]
            s, valid = _logits(q0, q1, k0, k1, TAB_H, BIAS_BH, row_m, code_m, win_m, mask_m,
                               row_n, code_n, win_n, mask_n, stride_bias_m, stride_bias_n,
                               rel_off, qk_scale, gw, gw_log2, HAS_TABLE, HAS_BIAS, WINDOWED,
                               False, HAS_D1, UPCAST, PRECISION, SLAB_TAB, EVEN)
            p = tl.math.exp2(s - lse[:, None])
            if not EVEN:
                p = tl.where(valid, p, 0.0)
            ds = p * (_mm_nt(do0, do1, v0, v1, HAS_D1, UPCAST, PRECISION) - delta[:, None])
            if STORE_DS:
                tl.store(DBIAS + pid_bh * N * N + row_m[:, None] * N + row_n[None, :],
                         ds.to(DBIAS.dtype.element_ty), mask=valid)
            dsc = ds.to(Q.dtype.element_ty)
            dq0 = _mm(dsc, k0, dq0, UPCAST, PRECISION)
            if HAS_D1:
                dq1 = _mm(dsc, k1, dq1, UPCAST, PRECISION)
        g_bh, g_n = _grad_rows(b, h, pid_bh, H, N, D, PACKED)
        _store_rows(DQ, g_bh, row_m, mask_m, g_n, D, dq0 * sm_scale, dq1 * sm_scale,
                    D0, D1, HAS_D1)

    @triton.jit
    def _tmsa_attention_bwd_kernel_dbias(
        Q, K, V, DO,  # [B, H, N, D] strided
        TAB,          # [H, R] fp32 * log2(e) (HAS_TABLE)
        BIAS,         # [B or 1, H, N, N] (HAS_BIAS)
        LSE, DELTA,   # [B, H, N] fp32
        PLAN,         # [P, 3] int32: slot, first iteration, end iteration of each program
        SLOTS,        # [S, 3] int32: first query tile, first key tile, tile pairs in the slot
        PARTIAL,      # [H, P, BLOCK_M, BLOCK_N] fp32 out: ds summed over the program's pairs
        stride_q_b, stride_q_h, stride_q_n,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_do_b, stride_do_h, stride_do_n,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        H, N, D, R, n_win, nW, gw, TOK, n_lut, rel_off, qk_scale, P,
        HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, WINDOWED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
        HAS_D1: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        D = D // 8 * 8  # D % 8 == 0 (checked): lets the compiler vectorize the row masks
        # Every (query tile, key tile) pair of a slot maps its [BLOCK_M, BLOCK_N] elements to
        # the same bias entries, so ds is summed elementwise over pairs, windows and batch in
        # a fixed order: deterministic, and one partial tile per program.
        prog = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        slot = tl.load(PLAN + prog * 3)
        it0 = tl.load(PLAN + prog * 3 + 1)
        it1 = tl.load(PLAN + prog * 3 + 2)
        i0 = tl.load(SLOTS + slot * 3)
        j0 = tl.load(SLOTS + slot * 3 + 1)
        npairs = tl.load(SLOTS + slot * 3 + 2)
        TAB_H = TAB + h * R
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for it in range(it0, it1):
            pair = it % npairs
            w = (it // npairs) % nW
            b = (it // (npairs * nW)).to(tl.int64)
            ta = (i0 + pair) * BLOCK_M + tl.arange(0, BLOCK_M)
            tc = (j0 + pair) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_a = ta < n_win
            mask_c = tc < n_win
            row_a, code_a, win_a = _tokens(w * n_win + ta, gw, TOK, n_lut, WINDOWED,
                                           HAS_TABLE)
            row_c, code_c, win_c = _tokens(w * n_win + tc, gw, TOK, n_lut, WINDOWED,
                                           HAS_TABLE)
            q0, q1 = _load_rows(Q, b * stride_q_b + h * stride_q_h, row_a, mask_a, stride_q_n,
                                D, D0, D1, HAS_D1)
            do0, do1 = _load_rows(DO, b * stride_do_b + h * stride_do_h, row_a, mask_a,
                                  stride_do_n, D, D0, D1, HAS_D1)
            k0, k1 = _load_rows(K, b * stride_k_b + h * stride_k_h, row_c, mask_c, stride_k_n,
                                D, D0, D1, HAS_D1)
            v0, v1 = _load_rows(V, b * stride_v_b + h * stride_v_h, row_c, mask_c, stride_v_n,
                                D, D0, D1, HAS_D1)
            lse = tl.load(LSE + (b * H + h) * N + row_a, mask=mask_a, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * N + row_a, mask=mask_a, other=0.0)
            # [BLOCK_M, BLOCK_N]
            s, valid = _logits(q0, q1, k0, k1, TAB_H, BIAS + b * stride_bias_b + h * stride_bias_h,
                               row_a, code_a, win_a, mask_a, row_c, code_c, win_c, mask_c,
                               stride_bias_m, stride_bias_n, rel_off, qk_scale, gw, 0,
                               HAS_TABLE, HAS_BIAS, False, False, HAS_D1, UPCAST, PRECISION,
                               False, False)
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
            acc += p * (_mm_nt(do0, do1, v0, v1, HAS_D1, UPCAST, PRECISION) - delta[:, None])
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(PARTIAL + (h * P + prog) * (BLOCK_M * BLOCK_N) + offs, acc)

    @triton.jit
    def _tmsa_attention_bwd_kernel_window(
        Q, K, V,  # [B, H, N, D] strided
        DO,       # [B, H, N, D] strided grad of o
        TAB,      # [H, R] fp32 * log2(e) (HAS_TABLE)
        BIAS,     # [B or 1, H, N, N] (HAS_BIAS; global spans only)
        LSE,      # [B, H, N] fp32
        DQ, DK, DV,  # [B, H, N, D] out: views of one [B, N, 3, H, D] buffer (PACKED)
        DBIAS,    # [B, H, N, N] out, contiguous (STORE_DS)
        PARTIAL,  # [H, P, BLOCK, BLOCK] fp32 out: ds summed over the program's units (ACC_DS)
        stride_q_b, stride_q_h, stride_q_n,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_do_b, stride_do_h, stride_do_n,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        H, N, D, R, n_win, gw, TOK, n_lut, rel_off, qk_scale, sm_scale,
        units, groups, group_tokens, per_prog, P,
        HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DS: tl.constexpr,
        STORE_DS: tl.constexpr, WINDOWED: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        D = D // 8 * 8  # D % 8 == 0 (checked): lets the compiler vectorize the row masks
        # One unit = the windows packed in one tile of one (sample, head): all their queries
        # and keys fit, so dq, dk and dv need no recompute and no cross-program reduction.
        prog = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        acc = tl.zeros([BLOCK, BLOCK], tl.float32)
        for u in range(prog * per_prog, tl.minimum(prog * per_prog + per_prog, units)):
            b = (u // groups).to(tl.int64)
            start = (u % groups) * group_tokens
            offs = start + tl.arange(0, BLOCK)
            mask = (offs < start + group_tokens) & (offs < N)
            row, code, win = _tokens(offs, gw, TOK, n_lut, WINDOWED, HAS_TABLE)
            bh = b * H + h
            do0, do1 = _load_rows(DO, b * stride_do_b + h * stride_do_h, row, mask, stride_do_n,
                                  D, D0, D1, HAS_D1)
            lse = tl.load(LSE + bh * N + row, mask=mask, other=0.0)
            q0, q1 = _load_rows(Q, b * stride_q_b + h * stride_q_h, row, mask, stride_q_n, D,
                                D0, D1, HAS_D1)
            k0, k1 = _load_rows(K, b * stride_k_b + h * stride_k_h, row, mask, stride_k_n, D,
                                D0, D1, HAS_D1)
            # [BLOCK, BLOCK]
            s, valid = _logits(q0, q1, k0, k1, TAB + h * R,
                               BIAS + b * stride_bias_b + h * stride_bias_h, row, code, win, mask,
                               row, code, win, mask, stride_bias_m, stride_bias_n, rel_off,
                               qk_scale, gw, 0, HAS_TABLE, HAS_BIAS, WINDOWED, False, HAS_D1,
                               UPCAST, PRECISION, False, False)
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
            pT = tl.trans(p.to(Q.dtype.element_ty))
            dv0 = _mm(pT, do0, None, UPCAST, PRECISION)
            dv1 = dv0
            if HAS_D1:
                dv1 = _mm(pT, do1, None, UPCAST, PRECISION)
            g_bh, g_n = _grad_rows(b, h, bh, H, N, D, PACKED)
            _store_rows(DV, g_bh, row, mask, g_n, D, dv0, dv1, D0, D1, HAS_D1)
            v0, v1 = _load_rows(V, b * stride_v_b + h * stride_v_h, row, mask, stride_v_n, D,
                                D0, D1, HAS_D1)
            dp = _mm_nt(do0, do1, v0, v1, HAS_D1, UPCAST, PRECISION)
            # the whole row is in the tile: delta = rowsum(p * dp) as softmax's own backward
            # (equal to rowsum(do * o), without loading o)
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])
            if ACC_DS:
                acc += ds
            if STORE_DS:
                tl.store(DBIAS + bh * N * N + row[:, None] * N + row[None, :],
                         ds.to(DBIAS.dtype.element_ty), mask=valid)
            dsc = ds.to(Q.dtype.element_ty)
            dq0 = _mm(dsc, k0, None, UPCAST, PRECISION)
            dq1 = dq0
            if HAS_D1:
                dq1 = _mm(dsc, k1, None, UPCAST, PRECISION)
            _store_rows(DQ, g_bh, row, mask, g_n, D, dq0 * sm_scale, dq1 * sm_scale,
                        D0, D1, HAS_D1)
            dsT = tl.trans(dsc)
            dk0 = _mm(dsT, q0, None, UPCAST, PRECISION)
            dk1 = dk0
            if HAS_D1:
                dk1 = _mm(dsT, q1, None, UPCAST, PRECISION)
            _store_rows(DK, g_bh, row, mask, g_n, D, dk0 * sm_scale, dk1 * sm_scale,
                        D0, D1, HAS_D1)
        if ACC_DS:
            offs2 = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
            tl.store(PARTIAL + (h * P + prog) * (BLOCK * BLOCK) + offs2, acc)

    @triton.jit
    def _tmsa_attention_table_grad_kernel(
        PART_SUM,  # [H, n_elems] fp32: one head's ds partial sums (summed over its programs)
        BINS,      # [R, n_bins] int32: per table row, its partial elements in element order
                   # (entries >= n_elems pad the row)
        DTABLE,    # [R, H] out: the table gradient, in the table's dtype
        n_elems, n_bins, R, H, stride_ps_h,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # program (row block, head): each row sums its elements in index order, chunk by chunk
        # (no atomics: the table gradient is bitwise repeatable)
        h = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, n_bins, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = mask_r[:, None] & (ks < n_bins)[None, :]
            e = tl.load(BINS + rows.to(tl.int64)[:, None] * n_bins + ks[None, :], mask=m,
                        other=0)
            m = m & (e < n_elems)
            acc += tl.sum(tl.load(PART_SUM + h.to(tl.int64) * stride_ps_h + e, mask=m,
                                  other=0.0), axis=1)
        tl.store(DTABLE + rows * H + h, acc.to(DTABLE.dtype.element_ty), mask=mask_r)

    @triton.jit
    def _tmsa_attention_table_slab_kernel(
        TABLE,   # [R, H] the learnable table, any float dtype and strides
        SLABS,   # [H, 2gh - 1, gw, gw] fp32 out: [h, r, ci, cj] = table[(r, ci - cj), h] * log2 e
        stride_t_r, stride_t_h, n_rows, gw,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        # global attention's bias as one gw x gw matrix per relative grid row r (the bias of
        # query column ci and key column cj), built once per call: the attention kernels read
        # it as vector loads instead of per-element gathers (see attention._table_arg)
        h = tl.program_id(2).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)   # r * gw + ci
        cj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        valid = (rows < n_rows)[:, None] & (cj < gw)[None, :]
        r = rows // gw
        idx = (r * (2 * gw - 1) + rows - r * gw + gw - 1)[:, None] - cj[None, :]
        val = tl.load(TABLE + idx * stride_t_r + h * stride_t_h, mask=valid, other=0.0)
        tl.store(SLABS + (h * n_rows + rows[:, None]) * gw + cj[None, :],
                 val.to(tl.float32) * _LOG2E, mask=valid)
