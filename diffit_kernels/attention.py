"""tmsa_attention: flash attention with a learnable relative-position bias table, fwd + bwd.

Per head, with scale c = d^-1/2 (or the user's), logits in log2 units for exp2:
    s[a, b] = q_a . k_b * c + B[a, b],   B = table[index(a, b), h] or a dense bias
    p = softmax_b(s),  o = p v,  lse_a = log2 sum_b 2^(s log2e)      (saved: O(N) memory)
Backward (FlashAttention 2), delta_a = sum_d do[a] * o[a]:
    dp = do v^T,  ds = p * (dp - delta)   (the gradient of s, natural units)
    dv = p^T do,  dk = ds^T q * c,  dq = ds k * c,  dB = ds,  dtable[r, h] = sum_{index(a,b)=r} ds
Windows: with window=(gh, gw) over grid=(Gh, Gw) the kernels walk tokens in a window-major
*virtual* order v = w * n + t (n = gh*gw) and map v to its row of the [B, H, N, D] tensors
((w // nWw * gh + t // gw) * Gw + w % nWw * gw + t % gw), so no partition / reverse copy is
made; a tile may hold several small windows, masked block-diagonally. The kernels read each
virtual token's row, code and window from an int32 table built once per geometry
(_token_lut): three vector loads where the arithmetic took three integer divisions by runtime
values per token (the windowed loops issue 33-48% fewer instructions, compile report). The
relative index is code(a) - code(b) + const with code(t) = (t // gw) * (2gw - 1) + t % gw: no
[N, N] index exists. Global attention on 16-bit inputs and grids 16, 32, 64... tokens wide
can read the table through per-head slabs of gw x gw matrices, one per relative grid row, that
one launch expands per call (see _table_arg): the same numbers, bitwise the same results, with
a vector load per tile where the gather costs index arithmetic per score; the card times both
at a shape's first forward (TABLE_READ).

Head dims: tl.arange needs powers of two, so d is covered by one power-of-two chunk D0 or by
D0 + D1 (e.g. 72 = 64 + 16 with 8 columns masked: 10% padding where 128 would waste 44%);
the worst case over d = 16, 24, ..., 128 is 25% (d = 24 -> 32). Every dot over d is two dots.

Deterministic dtable (no atomics): ds must be summed along relative offsets, which no tile
order can do elementwise, so it is accumulated where the element -> offset map is the same on
every iteration of a program and reduced once at the end:
  * spans of <= 32 tokens (4x4 image-space windows, tiny grids; 16 at d >= 56, none for
    fp32): one fused kernel does the whole backward of a window group (dq, dk, dv: 5 dots,
    no recompute) and sums ds over all the (batch, window) units it owns in a [32, 32] fp32
    register tile (64-token tiles spill on sm_80);
  * larger spans: FlashAttention-2 dK/dV and dQ kernels, by one of several plans the card
    chooses between by timing them (_choose_plan). The dK/dV kernel can sum ds where it
    makes it: the batch is cut into shares (a few, as many as keep ~4 programs per SM, or
    one per sample), and the program of (head, key tile, share) adds its fp32 ds tiles into
    a [BLOCK_N, span] slice of a partial that only that share writes, one launch per sample
    of the share (the first stores, the next ones add: no atomics, no [B, H, N, N]; a loop
    over the share inside the kernel spilled badly under Triton 3.6).
    The partials (O(H * groups * N * span), at most 4M elements per head and group) are summed
    over groups, then [BN, BN] blocks with the same offset map (a block diagonal when gw | BN)
    are summed, then gathered by offset. Or a second pass recomputes p and dp (2 dots) for
    the tile pairs of one "slot" (a tile pair, or a whole square-tile diagonal when gw divides
    the tile) over windows and batch: the only way for longer spans. 16-bit windows of up to
    64 tokens can also take the fused kernel, one window per tile.
torch sums the partials and gathers them by relative offset in a fixed order (a padded
[rows, k] index). deterministic=False takes the same path (no atomic variant is shipped). A
dense bias shared by the batch (any shape broadcastable to [B, H, N, N] with B-dim 1) takes
the dbias pass (slot = tile pair), never a [B, H, N, N] buffer; a per-sample bias gets ds
stored by the dQ kernel; either is then summed over the bias's broadcast dims. fp32 inputs
use exact (ieee) FMA dots with small tiles; TF32 only when the user enabled it for CUDA
matmuls. With several windows packed in one tile a NaN key or value can also reach
the neighbouring window's rows (0 * NaN in the tile's dot); finite inputs are unaffected.
For 16-bit inputs over spans longer than the fused kernel's, dq, dk and dv come out as
[B, H, N, D] views of one [B, N, 3, H, D] buffer: the layout of time_qkv's output, whose
backward then reads them as one [M, 3C'] matrix without a copy (_packs).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _attention_kernels as _kernels
from . import _attention_plans as _plans  # read at call time: the tests and benchmarks set them
from . import reference
from ._attention_index import _Geom, _dbias_plan, _ds_table_plan, _fused_bins, _reduce_slots
from ._attention_kernels import LOG2E
from ._attention_launch import (DELTA_BLOCK_M, DELTA_WARPS, _card_list, _check_head_dim,
                                _configs, _ds_layout, _fused_launch, _head_split, _launch,
                                _launch_window, _log, _packed_span, _programs_per_head,
                                _wide_configs)
from ._attention_launch import HEAD_DIMS, _emulate_card  # noqa: F401 (the op's, for callers)
from ._attention_layout import (_bias_grad, _bias_rows, _bias_strides, _grad_views, _grads_shape,
                                _out_layout, _packs, _packs_for, _rows_aligned, _rows_of,
                                _strides3, _within_i32)
from ._common import (batch_slices, call_op, cdiv, check_kernel_dtype, dispatch, dot_upcast,
                      empty, next_power_of_2, on_tensor_device, recordable, resolve_backend,
                      unit_last_stride)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 is exact (ieee) unless the user opted into TF32 for CUDA matmuls."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _prep_table(table: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # [R, H] any dtype -> [H, R] fp32 in log2 units: tiny, and gathered per element in-kernel
    if table is None:
        return like
    return (table.float() * LOG2E).t().contiguous()


# Global attention reads its table through a copy expanded once per call (one launch), where
# the [H, R] table costs a gather per score element and its index arithmetic (a division by
# the grid width per column included). The bias of query i and key j depends on their grid
# rows only through ri - rj, and on their columns ci, cj: so per head a slab of 2gh - 1
# matrices [gw, gw] (relative row r: [ci, cj] -> table[(r, ci - cj)]), fp32, pre-scaled by
# log2(e). A tile's bias is one unmasked load at gw * i + j - rj * gw * (gw + 1) from the
# middle matrix: contiguous along the keys in runs of gw, vectorised as 16-byte loads when gw
# is a power of two >= 16 (DiffiT's latent grids: 16 at 256 px, 32 at 512 px), the condition
# for this path. The slab is (2gh - 1) / gh^2 of a dense [N, N] copy: 0.5 MiB at 256 px and
# 4 MiB at 512 px for 16 heads (a dense copy: 4 and 64 MiB, past the 50 MiB of an H100 /
# H200's L2, which every query tile of every sample reads through). Windows, other grids and
# float32 inputs (FMA dots, whose small configs were chosen under the gather's registers)
# gather from [H, R].
SLAB_MAX_BYTES = 64 << 20
SLAB_BLOCK_I, SLAB_BLOCK_J = 64, 16


def _slab_rows(N: int, gw: int) -> int:
    """Rows of one head's slab: 2gh - 1 matrices of gw rows (gh = N // gw), each gw wide."""
    return (2 * (N // gw) - 1) * gw


def _slab_ok(table: Optional[torch.Tensor], geom: _Geom, N: int, elsize: int) -> bool:
    if table is None or geom.windowed or elsize != 2:
        return False
    gw = geom.gw
    if gw < 16 or gw & (gw - 1):
        return False
    return table.shape[1] * _slab_rows(N, gw) * gw * 4 <= SLAB_MAX_BYTES


# Where the slabs can serve (_slab_ok), the kernels can still gather from [H, R] instead, as
# windows do: bitwise the same numbers. Per tile the slabs cost one contiguous fp32 tile load
# (16 KB for 64 x 64, from L2), the gather index arithmetic and a masked load per score from a
# small, L1-resident table: which is faster is the card's to say. The first forward of each
# shape times both (_choose_plan) and the backward reads the table the same way;
# TABLE_READ forces one ("slabs" / "gather").
TABLE_READ: Optional[str] = None


def _table_key(q: torch.Tensor, geometry: Sequence[int]) -> tuple:
    return (q.device, "table", q.dtype, *q.shape, tuple(geometry))  # the device first


def _shape_text(q: torch.Tensor) -> str:
    """'B=32 H=16 N=256 D=72 bfloat16': the start of a timed choice's key in autotune.csv."""
    B, H, N, D = q.shape
    return f"B={B} H={H} N={N} D={D} {str(q.dtype).split('.')[-1]}"


def _reads_slabs(table: Optional[torch.Tensor], q: torch.Tensor, geom: _Geom,
                 geometry: Sequence[int], run=None) -> bool:
    """Whether the kernels read the table through its slabs: where they can, as forced, as the
    card chose for this shape, or (not timed) yes. run(slabs) (the forward) times both reads
    where the shape has no choice yet (_choose_plan)."""
    if not _slab_ok(table, geom, q.shape[2], q.element_size()):
        return False
    if TABLE_READ is not None:
        return TABLE_READ == "slabs"
    key = _table_key(q, geometry)
    if run is None:
        return _plans._PLAN_CHOICE.get(key, "slabs") == "slabs"
    return _plans._choose_plan(
        ["slabs", "gather"], key, lambda p: run(p == "slabs"),
        lambda: f"{_shape_text(q)} table grid={geometry[0]}x{geometry[1]}",
        "tmsa_attention table read", "table") == "slabs"


def _table_arg(table: Optional[torch.Tensor], like: torch.Tensor, geom: _Geom,
               N: int, slabs: bool) -> Tuple[torch.Tensor, int, int, bool]:
    """(the kernels' TAB argument, slab, gw_log2, on_slabs): global attention's [H, 2gh - 1, gw,
    gw] slabs where asked (slabs; _slab_ok must hold; slab: elements per head), else the [H, R]
    table."""
    if not slabs:
        return _prep_table(table, like), 0, 0, False
    H, gw = table.shape[1], geom.gw
    n_rows = _slab_rows(N, gw)
    out = empty((H, n_rows, gw), torch.float32, table.device)
    _log("table-slab", (SLAB_BLOCK_I, SLAB_BLOCK_J))
    _kernels._tmsa_attention_table_slab_kernel[
        (cdiv(n_rows, SLAB_BLOCK_I), cdiv(gw, SLAB_BLOCK_J), H)](
        table, out, table.stride(0), table.stride(1), n_rows, gw,
        BLOCK_I=SLAB_BLOCK_I, BLOCK_J=SLAB_BLOCK_J, num_warps=4)
    return out, n_rows * gw, gw.bit_length() - 1, True


# the table-gradient gather: [TABLE_BLOCK_R rows, TABLE_BLOCK_K elements] per step, 4 warps
TABLE_BLOCK_R, TABLE_BLOCK_K = 16, 128


def _table_grad(src: torch.Tensor, bins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[H, L] fp32 ds partial sums -> the [R, H] table gradient in `dtype`: one launch, each
    table row summing its elements (bins [R, K] into L, padded with L) in a fixed order."""
    H, L = src.shape
    R, K = bins.shape
    out = empty((R, H), dtype, src.device)
    block_k = min(TABLE_BLOCK_K, max(16, next_power_of_2(K)))
    _log("table", (TABLE_BLOCK_R, block_k))
    _kernels._tmsa_attention_table_grad_kernel[(cdiv(R, TABLE_BLOCK_R), H)](
        src, bins, out, L, K, R, H, src.stride(0), BLOCK_R=TABLE_BLOCK_R, BLOCK_K=block_k,
        num_warps=4)
    return out


def _common_kwargs(q, geom: _Geom, table, bias):
    D0, D1, HAS_D1 = _head_split(q.shape[-1])
    return dict(HAS_TABLE=table is not None, HAS_BIAS=bias is not None, WINDOWED=geom.windowed,
                D0=D0, D1=D1, HAS_D1=HAS_D1, UPCAST=dot_upcast(q.dtype),
                PRECISION=_precision(q.dtype, q.device))


@on_tensor_device
def _tmsa_attention_fwd(q, k, v, table, bias, geometry, scale):
    geom = _Geom(q.shape[2], geometry)
    slabs = _reads_slabs(table, q, geom, geometry,
                         lambda s: _fwd_run(q, k, v, table, bias, geom, scale, s))
    return _fwd_run(q, k, v, table, bias, geom, scale, slabs)


def _fwd_run(q, k, v, table, bias, geom: _Geom, scale, slabs: bool):
    B, H, N, D = q.shape
    o = _out_layout(B, H, N, D, q.dtype, q.device)
    lse = empty((B, H, N), torch.float32, q.device)
    tab, slab, gw_log2, on_slabs = _table_arg(table, q, geom, N, slabs)
    kw = dict(_common_kwargs(q, geom, table, bias), SLAB_TAB=on_slabs)
    rest = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *_bias_strides(bias),
            H, N, D, geom.R, slab, gw_log2, *geom.args(q.device), geom.rel_off,
            float(scale) * LOG2E,
            next_power_of_2(N), next_power_of_2(geom.n_win))
    kind = "fwd-win" if geom.windowed else "fwd"
    configs = _configs(kind, kw["D0"], kw["D1"], kw["HAS_D1"], q.element_size(), bias is not None)
    for b0, b1 in batch_slices(B, H):   # a program per (sample, head) on the grid's y axis
        q_, k_, v_, o_, lse_ = _rows_of(b0, b1, B, q, k, v, o, lse)
        _launch(_kernels._tmsa_attention_fwd_kernel, kind, configs,
                lambda bm, bn, n=b1 - b0: (cdiv(N, bm), n * H),
                (q_, k_, v_, tab, _bias_rows(b0, b1, B, bias, q_), o_, lse_, *rest), kw)
    return o, lse


@on_tensor_device
def _tmsa_attention_bwd(do, q, k, v, o, lse, table, bias, geometry, scale, need_extra):
    B, H, N, D = q.shape
    dev = q.device
    do, o = _rows_aligned(do), _rows_aligned(o)
    key = (dev, q.dtype, B, H, N, D, tuple(geometry), table is not None,
           None if bias is None else tuple(bias.shape), need_extra)
    plan = None if _plans.BWD_PLAN is not None else _plans._PLAN_CHOICE.get(key)
    if plan is None:
        geom = _Geom(N, geometry)
        shape = (*_head_split(D), q.element_size(), bias is not None)
        plans = _plans._bwd_plans(geom, shape, B, H, N, dev, table is not None and need_extra)

        def describe():
            what = "table" if table is not None else "bias" if bias is not None else "plain"
            win = "x".join(map(str, geometry[2:])) if geom.windowed else "global"
            return (f"{_shape_text(q)} {what} window={win}"
                    + ("" if need_extra else " no-extra-grad"))

        plan = _plans._choose_plan(plans, key, lambda p: _bwd_run(
            p, do, q, k, v, o, lse, table, bias, geometry, scale, need_extra), describe)
    return _bwd_run(plan, do, q, k, v, o, lse, table, bias, geometry, scale, need_extra)


class _Bwd(NamedTuple):
    """One backward call: its tensors and what every plan's launches share."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor
    table: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    geom: _Geom
    geometry: Sequence[int]
    scale: float
    kw: dict          # the kernels' common constexprs (_common_kwargs)
    shape: tuple      # (D0, D1, HAS_D1, element size, dense bias): the config lists' key
    packs: bool       # dq, dk, dv views of one [B, N, 3, H, D] buffer (_packs)
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dbias: Optional[torch.Tensor]   # [B, H, N, N] per-sample ds (store_ds)
    acc_table: bool   # the table's gradient: ds summed into partials
    acc_dense: bool   # a bias shared by the batch: ds summed over B ([H, N, N])
    store_ds: bool    # a per-sample bias: ds stored per sample ([B, H, N, N])
    strides: tuple    # q, k, v, dO, and the bias broadcast to [B, H, N, N]

    @property
    def bias_arg(self) -> torch.Tensor:
        return self.bias if self.bias is not None else self.q

    def geo(self, *slab_args: int) -> tuple:
        """The kernels' geometry arguments, with (slab, gw_log2) where the kernel takes them."""
        B, H, N, D = self.q.shape
        g = self.geom
        return (H, N, D, g.R, *slab_args, *g.args(self.q.device), g.rel_off,
                self.scale * LOG2E)


def _bwd_run(plan, do, q, k, v, o, lse, table, bias, geometry, scale, need_extra):
    """The backward by one plan (_bwd_plans names them); do and o rows aligned: the gradient
    buffer of dq, dk, dv (_grad_views) and the table's or bias's gradient (empty if none)."""
    B, H, N, D = q.shape
    geom = _Geom(N, geometry)
    _log("plan", plan)
    kw = _common_kwargs(q, geom, table, bias)
    shape = (kw["D0"], kw["D1"], kw["HAS_D1"], q.element_size(), bias is not None)
    packs = _packs(q.dtype, geom.n_win, _packed_span(*shape))
    grads = empty(_grads_shape(q, packs), q.dtype, q.device)
    # a bias shared by the batch gets ds summed over B ([H, N, N]); a per-sample one ds per
    # sample ([B, H, N, N]); either is then summed over the bias's other broadcast dims
    per_sample = bias is not None and bias.dim() == 4 and bias.shape[0] > 1
    store_ds = per_sample and need_extra
    exact = store_ds and tuple(bias.shape) == (B, H, N, N)  # else summed afterwards: in fp32
    dbias = (empty((B, H, N, N), bias.dtype if exact else torch.float32, q.device)
             if store_ds else None)
    bw = _Bwd(q, k, v, do, o, lse, table, bias, geom, geometry, float(scale), kw, shape, packs,
              *_grad_views(grads, packs), dbias, table is not None and need_extra,
              bias is not None and not per_sample and need_extra, store_ds,
              (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do),
               *_bias_strides(bias)))
    dextra = (_bwd_fused if plan in ("fused", "wide") else _bwd_flash)(bw, plan)
    if bw.acc_dense:  # (a table's gradient comes out of _table_grad in its dtype and layout)
        return grads, _bias_grad(dextra, bias)
    if store_ds:
        return grads, _bias_grad(dbias, bias)
    return grads, dextra


def _bwd_fused(bw: _Bwd, plan: str) -> torch.Tensor:
    """Plans "fused" (spans packed into the fused kernel's tiles) and "wide" (one window per
    64-wide tile): one kernel writes dq, dk, dv and ds partial sums per program; the table's
    or shared bias's gradient from them (empty if neither)."""
    q, geom = bw.q, bw.geom
    B, H, N, _ = q.shape
    dev = q.device
    n, narrow = geom.n_win, _packed_span(*bw.shape)
    G = max(1, min(narrow // n, geom.nW))   # windows packed per tile (1 past narrow)
    BLOCK = max(16, next_power_of_2(G * n))
    groups = cdiv(geom.nW, G)
    units = B * groups
    acc = bw.acc_table or bw.acc_dense
    P = min(units, _programs_per_head(dev, H)) if acc else units
    per_prog = cdiv(units, P)
    P = cdiv(units, per_prog)
    partial = empty((H, P, BLOCK, BLOCK), torch.float32, dev) if acc else q
    args = (q, bw.k, bw.v, bw.do, _prep_table(bw.table, q), bw.bias_arg, bw.lse, bw.dq, bw.dk,
            bw.dv, bw.dbias if bw.dbias is not None else q, partial, *bw.strides, *bw.geo(),
            bw.scale, units, groups, G * n, per_prog, P)
    kwargs = dict(ACC_DS=acc, STORE_DS=bw.store_ds, BLOCK=BLOCK, PACKED=bw.packs, **bw.kw)
    if n <= narrow:
        cfg = _card_list("window", *bw.shape)[0]   # never tuned: a card runs the first
        warps, stages = _fused_launch(BLOCK, cfg, q.element_size())
        _log("window", cfg)
        _kernels._tmsa_attention_bwd_kernel_window[(P, H)](*args, **kwargs, num_warps=warps,
                                                           num_stages=stages)
    else:  # "wide": one window per tile
        _launch_window(_wide_configs(*bw.shape, True), (P, H), args, kwargs)
    if bw.acc_table:
        return _table_grad(partial.sum(1).reshape(H, BLOCK * BLOCK),
                           _fused_bins(n, G, BLOCK, geom.gh, geom.gw, str(dev)), bw.table.dtype)
    if bw.acc_dense:
        return partial.sum(1)[:, :N, :N]
    return q.new_empty(0)


def _bwd_flash(bw: _Bwd, plan: str) -> torch.Tensor:
    """FlashAttention-2's backward: delta = rowsum(O * dO), then dK / dV per key tile and dQ
    per query tile. The table's gradient: summed into partials in dK / dV ("shares": a few
    batch shares, "samples": one per sample), or a pass of its own ("separate", "separate-64",
    _dbias_pass), which a bias shared by the batch takes too."""
    q, k, v, do, lse, bias, geom = bw.q, bw.k, bw.v, bw.do, bw.lse, bw.bias, bw.geom
    B, H, N, D = q.shape
    dev = q.device
    tab, slab, gw_log2, on_slabs = _table_arg(bw.table, q, geom, N,
                                              _reads_slabs(bw.table, q, geom, bw.geometry))
    geo_p = bw.geo(slab, gw_log2)
    kw = dict(bw.kw, SLAB_TAB=on_slabs, PACKED=bw.packs)
    delta = empty((B, H, N), torch.float32, dev)
    for b0, b1 in batch_slices(B, H):   # a program per (sample, head) on y, as dQ below
        o_, do_, delta_ = _rows_of(b0, b1, B, bw.o, do, delta)
        _kernels._tmsa_attention_bwd_kernel_delta[(cdiv(N, DELTA_BLOCK_M), (b1 - b0) * H)](
            o_, do_, delta_, *_strides3(bw.o), *_strides3(do), H, N, D, BLOCK_M=DELTA_BLOCK_M,
            D0=kw["D0"], D1=kw["D1"], HAS_D1=kw["HAS_D1"], num_warps=DELTA_WARPS)
    buckets = (next_power_of_2(N), next_power_of_2(geom.n_win))
    win = "-win" if geom.windowed else ""
    acc_ds = plan in ("shares", "samples")   # dS summed into table partials in dK/dV
    kind = "dkdv" + win + ("-acc" if acc_ds else "")
    if acc_ds:
        # sized for any candidate of the card's list, as on the card, whichever one runs
        cands = _card_list(kind, *bw.shape)
        span_pad, tiles = _ds_layout(N, geom.n_win, tuple(c[:2] for c in cands))
        per_b = 1 if plan == "samples" else _plans._share_size(dev, B, H, N, cands)
        groups = cdiv(B, per_b)
        _log("ds-shares", (groups, per_b))
        partial = empty((H * groups * tiles * span_pad,), torch.float32, dev)
    else:
        # span_pad is read under ACC_DS only; 0 types as the JIT types any multiple of 16
        per_b, partial, span_pad = 1, q, 0
    # ACC_DS: a launch per sample step of the shares (share g's `step`: the first stores),
    # groups <= GRID_YZ_MAX on z (_bwd_plans); else a sample per z, a launch per run of them
    runs = ([(0, B, step) for step in range(per_b)] if acc_ds
            else [(b0, b1, 0) for b0, b1 in batch_slices(B, 1)])
    for b0, b1, step in runs:
        live = cdiv(B - step, per_b) if acc_ds else b1 - b0   # shares with a sample `step`
        q_, k_, v_, do_, lse_, delta_, dk_, dv_ = _rows_of(
            b0, b1, B, q, k, v, do, lse, delta, bw.dk, bw.dv)
        bm, bn = _launch(_kernels._tmsa_attention_bwd_kernel_dkdv, kind,
                         _configs(kind, *bw.shape), lambda bm, bn, z=live: (cdiv(N, bn), H, z),
                         (q_, k_, v_, do_, tab, _bias_rows(b0, b1, B, bias, q_), lse_, delta_,
                          dk_, dv_, partial, *bw.strides, *geo_p, bw.scale, per_b, step,
                          groups if acc_ds else live, span_pad, *buckets),
                         dict(kw, ACC_DS=acc_ds))
    for b0, b1 in batch_slices(B, H):   # a program per (sample, head) on y
        q_, k_, v_, do_, lse_, delta_, dq_, dbias_ = _rows_of(
            b0, b1, B, q, k, v, do, lse, delta, bw.dq, bw.dbias)
        _launch(_kernels._tmsa_attention_bwd_kernel_dq, "dq" + win,
                _configs("dq" + win, *bw.shape), lambda bm, bn, n=b1 - b0: (cdiv(N, bm), n * H),
                (q_, k_, v_, do_, tab, _bias_rows(b0, b1, B, bias, q_), lse_, delta_, dq_,
                 dbias_ if dbias_ is not None else q_, *bw.strides, *geo_p, bw.scale, *buckets),
                dict(kw, STORE_DS=bw.store_ds))
    if acc_ds:
        bins, L = _ds_table_plan(N, geom.n_win, geom.gh, geom.gw, bn, span_pad, str(dev))
        # [H, groups, key tiles * BN * span_pad] summed over the batch groups in order
        return _table_grad(partial[:H * groups * L].view(H, groups, L).sum(1), bins,
                           bw.table.dtype)
    if bw.acc_table or bw.acc_dense:
        # this pass gathers from the [H, R] table
        return _dbias_pass(bw, plan, _prep_table(bw.table, q) if on_slabs else tab, delta)
    return q.new_empty(0)


def _dbias_pass(bw: _Bwd, plan: str, tab: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The table's (or a shared bias's) gradient in a pass of its own over pairs of tiles,
    each program summing its pairs' ds into its own partial, then reduced in a fixed order."""
    q, geom = bw.q, bw.geom
    B, H, N, D = q.shape
    dev = q.device
    # the plan picks the tile (not an emulated card's pick: the pass is never tuned)
    BM, BN, warps, stages = _card_list("dbias", *bw.shape)[plan == "separate-64"]
    _log("dbias", (BM, BN, warps, stages))
    # the pairs of one tile diagonal share their relative offsets only when both tiles
    # step by the same whole number of grid rows (square tiles, gw | BM)
    group = bw.acc_table and BM == BN and BM % geom.gw == 0
    pairs, slots, slot_index, bins, P = _dbias_plan(
        geom.n_win, geom.nW, B, BM, BN, group, _programs_per_head(dev, H),
        (geom.gh, geom.gw) if bw.acc_table else None, str(dev))
    partial = empty((H, P, BM, BN), torch.float32, dev)
    _kernels._tmsa_attention_bwd_kernel_dbias[(P, H)](
        q, bw.k, bw.v, bw.do, tab, bw.bias_arg, bw.lse, delta, pairs, slots, partial,
        *bw.strides, H, N, D, geom.R, geom.n_win, geom.nW, *geom.args(dev)[1:],
        geom.rel_off, bw.scale * LOG2E, P, BLOCK_M=BM, BLOCK_N=BN,
        num_warps=warps, num_stages=stages, **bw.kw)
    if bw.acc_table:
        return _table_grad(partial.view(H, P * BM * BN), bins, bw.table.dtype)
    return _reduce_slots(partial, slot_index, N)


# ---------------------------------------------------------------------------------------------
# The ops' names carry a version. torch.compile's on-disk caches (AOTAutograd's, inductor's FX
# graph cache) key a compiled graph on its code, which names the forward op only, and keep the
# backward compiled with it: when the forward's outputs or the backward's change, both names
# change, or a graph compiled by an older release is found and asserts the old layout or calls
# an op that no longer exists. v2 ("tmsa_attention_fwd_bnhd"): o over [B, N, H, D] memory
# (_out_layout). v3: the backward returns one gradient buffer, [B, N, 3, H, D] (dq | dk | dv)
# where _packs (custom ops may not return aliases of each other, so the autograd formula makes
# the views).
_FWD_OP = "tmsa_attention_fwd_v3"
_BWD_OP = "tmsa_attention_bwd_v3"


@torch.library.custom_op("diffit_kernels::" + _FWD_OP, mutates_args=())
def _tmsa_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           table: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           geometry: List[int], scale: float,
                           deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _tmsa_attention_fwd(q, k, v, table, bias, geometry, scale)


@_tmsa_attention_fwd_op.register_fake
def _(q, k, v, table, bias, geometry, scale, deterministic):
    B, H, N, D = q.shape
    return (q.new_empty((B, N, H, D)).transpose(1, 2),
            q.new_empty((B, H, N), dtype=torch.float32))


@torch.library.custom_op("diffit_kernels::" + _BWD_OP, mutates_args=())
def _tmsa_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, lse: torch.Tensor, table: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], geometry: List[int], scale: float,
                           need_extra: bool, deterministic: bool) -> List[torch.Tensor]:
    # deterministic=False takes the same fixed-order path: no atomic variant is shipped
    return list(_tmsa_attention_bwd(do, q, k, v, o, lse, table, bias, geometry, scale,
                                    need_extra))


@_tmsa_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, table, bias, geometry, scale, need_extra, deterministic):
    extra = q.new_empty(0)
    if need_extra and table is not None:
        extra = table.new_empty(table.shape)
    elif need_extra and bias is not None:
        extra = bias.new_empty(bias.shape)
    return [q.new_empty(_grads_shape(q, _packs_for(q, geometry, bias))), extra]


def _setup_context(ctx, inputs, output):
    q, k, v, table, bias, geometry, scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, table, bias)
    ctx.geometry, ctx.scale, ctx.deterministic = list(geometry), scale, deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    if do is None:  # o unused (the direct path does not materialise zero gradients)
        return (None,) * 8
    q, k, v, o, lse, table, bias = ctx.saved_tensors
    need_extra = bool(ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    grads, dextra = dispatch(
        _BWD_OP, getattr(ctx, "direct", False), _tmsa_attention_bwd_op,
        lambda *a: _tmsa_attention_bwd(*a[:-1]),
        do, q, k, v, o, lse, table, bias, ctx.geometry, ctx.scale, need_extra, ctx.deterministic)
    dq, dk, dv = _grad_views(grads, _packs_for(q, ctx.geometry, bias))
    dtable = dextra if (table is not None and ctx.needs_input_grad[3]) else None
    dbias = dextra if (bias is not None and ctx.needs_input_grad[4]) else None
    return dq, dk, dv, dtable, dbias, None, None, None


_tmsa_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _fwd_impl(*args):
    """_tmsa_attention_fwd with the op's arguments (`deterministic` last: every path is)."""
    return _tmsa_attention_fwd(*args[:-1])


class _TmsaAttentionDirect(torch.autograd.Function):
    """Eager calls (see _common.direct_call): the op's implementation and autograd formula
    without the custom op's dispatcher round trips; bitwise the same results."""

    @staticmethod
    def forward(ctx, *args):  # the op's arguments
        o, lse = dispatch(_FWD_OP, True, None, _fwd_impl, *args)
        _setup_context(ctx, args, (o, lse))
        ctx.direct = True
        ctx.set_materialize_grads(False)  # no zero-filled gradient of lse per call
        return o, lse

    backward = staticmethod(_backward)


# ---------------------------------------------------------------------------------------------
@recordable("tmsa_attention")
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
    """TMSA attention: O = softmax(q k^T * scale + B_rel) v per head, flash-style.

    B_rel[h, a, b] = table[index(a, b), h] with Swin's relative index over a gh x gw window,
    gathered from token coordinates (for global attention on grids 16, 32, 64... wide, from
    per-head slabs of gw x gw matrices expanded once per call); or a dense additive `bias`.

    Args:
        q, k, v: [B, H, N, D] float32 / float16 / bfloat16, the same dtype and device; any
            strides with a unit last-dim stride (views of one packed qkv buffer are not copied).
            The Triton path takes D = 8, 16, ..., 128, and N x 3 x H x D and a dense
            bias's N x N under 2^31 (its row offsets are 32-bit).
        table: [(2gh-1)(2gw-1), H] learnable relative-position table (any float dtype; its
            gradient is accumulated in float32). Needs grid.
        grid: (Gh, Gw) token grid, Gh * Gw == N, tokens row-major.
        window: (gh, gw) non-overlapping attention windows dividing the grid, all sharing the
            table; None = the whole grid (global attention).
        bias: dense additive bias broadcastable to [B, H, N, N] ([H, N, N], [1, H, N, N],
            [B, 1, N, N], [N, N], ...: size-1 dims are read with stride 0, not copied),
            exclusive with table; its gradient has its own shape (a bias shared by the batch
            is reduced over it without a [B, H, N, N] buffer).
        scale: logit scale, default D ** -0.5.
        deterministic: bitwise-reproducible gradients (the default; every path is
            deterministic, the flag is kept for API stability). Across processes the
            autotuned tiles and backward plan may differ; DIFFIT_KERNELS_AUTOTUNE=0 pins them
            (see diffit_kernels._common.AUTOTUNE).
        backend: "auto" | "triton" | "torch" (see diffit_kernels._common.resolve_backend).
    Returns:
        o [B, H, N, D] in q's dtype, differentiable w.r.t. q, k, v, table and bias. The
        Triton path lays it over [B, N, H, D] memory, so o.transpose(1, 2).reshape(B, N, H * D)
        (the heads merged into tokens) is a view, not a copy.
    """
    geometry = _geometry(q, k, v, table, grid, window, bias)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if resolve_backend(backend, q, k, v, table, bias) == "torch":
        return reference.tmsa_attention(q, k, v, table=table, grid=grid, window=window,
                                        bias=bias, scale=scale)
    check_kernel_dtype("q", q)
    for name, t in (("table", table), ("bias", bias)):
        if t is not None:
            check_kernel_dtype(name, t)
    _check_head_dim(q.shape[-1])
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    q, k, v = (_rows_aligned(t) for t in (q, k, v))
    bias = _within_i32(q, unit_last_stride(bias) if bias is not None else None)
    return call_op(_FWD_OP, _tmsa_attention_fwd_op, _fwd_impl, _TmsaAttentionDirect,
                   (q, k, v, table, bias, geometry, scale, bool(deterministic)),
                   (q, k, v, table, bias))[0]


def _geometry(q, k, v, table, grid, window, bias) -> List[int]:
    """The kernels' geometry argument of a call ([Gh, Gw, gh, gw] where a grid is used, else
    []), its inputs checked (reference.check_attention_inputs)."""
    gh, gw, Gh, Gw = reference.check_attention_inputs(q, k, v, table, grid, window, bias)
    uses_grid = grid is not None and (table is not None or window is not None)
    return [Gh, Gw, gh, gw] if uses_grid else []


def call_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  table: Optional[torch.Tensor] = None, grid=None, window=None,
                  bias: Optional[torch.Tensor] = None, backward: bool = True,
                  table_grad: bool = True) -> List[Tuple[Optional[str], Optional[str]]]:
    """The (table read, backward plan) pairs the Triton path can take for a call of these
    arguments on their device: each a card may choose by timing (None where there is no
    choice, or no backward). TABLE_READ and _plans.BWD_PLAN force one (the kernel check
    runs every pair: diffit_kernels.testing.check_call)."""
    geometry = _geometry(q, k, v, table, grid, window, bias)
    B, H, N, D = q.shape
    geom = _Geom(N, geometry)
    reads = (["slabs", "gather"] if _slab_ok(table, geom, N, q.element_size())
             else [None])
    plans: List[Optional[str]] = [None]
    if backward:
        shape = (*_head_split(D), q.element_size(), bias is not None)
        plans = list(_plans._bwd_plans(geom, shape, B, H, N, q.device,
                                       table is not None and table_grad))
    return [(r, p) for r in reads for p in plans]


def aot_specs():
    """The configs the launchers can pick, for the compile gate (_attention_aot)."""
    from ._attention_aot import aot_specs as specs  # it reads this module's constants

    return specs()


def check_cases(device: torch.device):
    """Shapes for `python -m diffit_kernels check`: the latent model's global table (d = 72),
    image-space windows, and a dense bias; small enough for the interpreter."""
    from ._check import CheckCase

    def case(label, B, H, N, D, grid=None, window=None, table=False, bias=False):
        def leaves():
            t = {n: torch.randn(B, H, N, D, device=device) for n in ("q", "k", "v")}
            if table:
                gh, gw = window or grid
                t["table"] = torch.randn((2 * gh - 1) * (2 * gw - 1), H, device=device)
            if bias:
                t["bias"] = torch.randn(H, N, N, device=device)
            return t

        def build(t):
            return dict(q=t["q"], k=t["k"], v=t["v"], table=t.get("table"), grid=grid,
                        window=window, bias=t.get("bias"))

        grads = ("q", "k", "v") + (("table",) if table else ()) + (("bias",) if bias else ())
        return CheckCase("tmsa_attention", label, tmsa_attention, reference.tmsa_attention,
                         leaves, build, ("o",), grads)

    return [
        case("B2 H2 N64 D72 table grid 8x8", 2, 2, 64, 72, grid=(8, 8), table=True),
        case("B2 H2 N64 D40 table 8x8 win 4x4", 2, 2, 64, 40, grid=(8, 8), window=(4, 4),
             table=True),
        case("B2 H2 N17 D16 bias [H,N,N]", 2, 2, 17, 16, bias=True),
    ]
