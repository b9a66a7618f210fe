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

import contextlib
import functools
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from . import _attention_kernels as _kernels
from . import reference
from ._attention_index import _Geom, _dbias_plan, _ds_table_plan, _fused_bins, _reduce_slots
from ._attention_kernels import LOG2E
from ._common import (autotune_enabled, autotuner_repeats, call_op, cdiv, check_kernel_dtype,
                      dispatch, dot_upcast, empty, interpreting, launch_tuned, next_power_of_2,
                      on_tensor_device, overriding, planned_sms, record_choice, resolve_backend,
                      unit_last_stride)

try:
    import triton
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None

HEAD_DIMS = tuple(range(8, 129, 8))  # d = 8 (the tiny presets) runs in a 16-wide chunk
FUSED_MAX_SPAN = 32   # attention spans up to this many tokens take the fused backward
# 16-bit windows of FUSED_MAX_SPAN < n <= WIDE_SPAN tokens (8x8 windows: 64, the image-space
# U-Nets'; not global spans, see _wide_configs) can take the fused backward too, one window per
# [64, 64] tile (the "window-wide" configs; the backward plan "wide"), instead of delta + dK/dV
# + dQ, which compute P twice, read q, k, v and dO twice, sum dS into table partials across
# programs and launch three kernels. It writes dq, dk, dv packed like them (_packs), so
# time_qkv's backward still reads them in place. Its tile holds ~250 registers in 4 warps:
# spill-free for sm_90a (Triton 3.6, 3.8, 3.9) and sm_80 at d 64; at d 72 up to 108 bytes spill
# for sm_80 (and 24 for sm_90a under 3.6 at one stage). The card's measurement chooses it or
# not (_choose_plan).
WIDE_SPAN = 64


def _head_split(D: int) -> Tuple[int, int, bool]:
    """(D0, D1, HAS_D1): one power-of-two chunk, or two (D0 + D1 >= D) when that pads less.
    Every chunk is >= 16 wide because a dot's reduction dim must be >= 16 on the tensor cores
    (d = 8 loads a 16-wide chunk whose upper half is masked to zero)."""
    one = max(16, next_power_of_2(D))
    d0 = one // 2
    d1 = max(16, next_power_of_2(D - d0)) if D > d0 else 0
    if d1 and d0 >= 16 and d0 + d1 < one:
        return d0, d1, True
    return one, 16, False


def _check_head_dim(D: int) -> None:
    if D not in HEAD_DIMS:
        raise NotImplementedError(
            f"tmsa_attention's Triton kernels take head dims 8, 16, ..., 128 (multiples of 8), "
            f"got D={D}; use backend='torch' for it")


# Test hook (never set by library code): emulate a card under the interpreter. "sms": the SM
# count launch plans are sized for; "elt": run the CUDA config table of this element size (2 or
# 4) instead of the interpreter's one config, entry "pick" (modulo its length) of each list;
# "log": a list that collects (kind, config) of every launch.
_CARD = {"sms": None, "elt": None, "pick": 0, "log": None}


@contextlib.contextmanager
def _emulate_card(sms: int, elt: Optional[int] = None, pick: int = 0,
                  log: Optional[list] = None):
    with overriding(_CARD, sms=sms, elt=elt, pick=pick, log=log):
        yield


def _sms(device: torch.device) -> Optional[int]:
    return planned_sms(device, _CARD["sms"])


def _programs_per_head(device: torch.device, H: int) -> int:
    """Programs per head of the kernels that write partials: ~4 per SM in all; two under the
    interpreter, so the partial reduction is exercised."""
    sms = _sms(device)
    if sms is None:
        return 2
    return max(1, cdiv(4 * sms, H))


def _batch_groups(device: torch.device, B: int, programs: int) -> int:
    """Batch shares of the dK/dV kernel that sums dS into the table: as few as keep ~4
    programs per SM (each share's partial is reduced afterwards); two under the interpreter."""
    sms = _sms(device)
    want = 2 if sms is None else cdiv(4 * sms, programs)
    return max(1, min(B, want))


# The backward plan "samples" (one batch share per sample: a single dK/dV launch whose fp32
# table partials are only stored) is offered while the partials of all samples take at most
# this many bytes; "shares" read-modify-writes the few L2-sized shares of _batch_groups instead,
# one launch per sample of a share (per query tile a load, two layout conversions through
# shared memory, and +26% SASS instructions in the loop at d 72, sm_90a, Triton 3.9).
SAMPLES_MAX_BYTES = 512 << 20


# the dK/dV kernel sums dS into the table when its partial of one head and batch group has at
# most this many elements (N <= 2048 global); larger spans take the separate dbias pass
_DS_MAX_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=64)
def _ds_layout(N: int, n_win: int, tiles: tuple) -> Tuple[int, int]:
    """(span_pad, rows): the dK/dV partial's row length, which holds the query span of any
    key tile at any candidate (BLOCK_M, BLOCK_N) (a multiple of every block), and the most key
    rows (key tiles * BLOCK_N) of a candidate."""
    widest = max(max(bm, bn) for bm, bn in tiles)
    span = 0
    for _, bn in tiles:
        for i in range(cdiv(N, bn)):
            lo = (i * bn // n_win) * n_win
            hi = ((min(i * bn + bn, N) - 1) // n_win + 1) * n_win
            span = max(span, hi - lo)
    return cdiv(span, widest) * widest, max(cdiv(N, bn) * bn for _, bn in tiles)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 is exact (ieee) unless the user opted into TF32 for CUDA matmuls."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# Launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, dense bias or not,
# element size and head-dim chunks (D0, D1 or 0). Chosen offline by compiling candidate lists
# (largest tiles first) for sm_80 and sm_90a and keeping the first spill-free ones under every
# Triton we support (3.4, 3.6, 3.8, 3.9: their ptxas differ, a config clean under one spills
# under another); aot_specs() lists exactly these, so the compile report re-checks each with the
# installed Triton. Under the interpreter one config.
_CONFIG_TABLE = {  # (kind, dense bias, element size): (default list, {(D0, D1): list})
    ("fwd", False, 2): (
        [(128, 64, 8, 3), (128, 64, 8, 2)],
        {(32, 0): [(128, 32, 8, 3), (128, 64, 8, 3)],
         (32, 16): [(128, 32, 8, 3), (128, 32, 8, 2)],
         # d 64: 64x64 w4 issues what 128x64 w8 does per score and fills a 64-token grid
         # (the U-Net's 8x8 level, global) where 128-row tiles are half masked
         (64, 0): [(128, 64, 8, 3), (64, 64, 4, 3)],
         # d 72: the last two give more warps per SM than the H200's pick (64x64 w4 s3: 102 KB
         # of shared memory, 2 programs = 8 warps per SM, sm_90a, Triton 3.6): 64x64 s2 66 KB,
         # 12 warps; 64x32 s2 38 KB and 124 registers, 16 warps. The H200 chose one stage for
         # both backward kernels where offered (more programs per SM), so the card measures
         # whether warps in flight beat pipelining here too (autotune.csv)
         (64, 16): [(128, 32, 8, 3), (128, 32, 8, 1), (64, 64, 4, 3), (128, 64, 8, 2),
                    (64, 64, 4, 2), (64, 32, 4, 2)],
         (64, 32): [(128, 32, 8, 3)],
         (128, 0): [(64, 32, 4, 3), (64, 32, 4, 2)]}),
    # windowed at d = 64 (the U-Net's heads) and 72: 4-warp candidates after the 8-warp first
    # ones, whose two warpgroups split each tile's keys; per score element they issue 40-55%
    # fewer instructions (compile report's loop column x warps / tile, sm_90a, 8x8 windows:
    # fwd d 72 64x64 w4 s2 18.0, 64x32 w4 24.2 against 41.1 for 64x32 w8, Triton 3.9; 21.5 /
    # 31.5 / 47.1 under 3.6), spill-free for sm_80 and sm_90a under both: the card measures.
    # The forward's 16x16 one-warp tile is for 4x4 windows (16 tokens): one whole window per
    # tile, unmasked (EVEN), where a 64-row tile holds four windows and computes 4x the scores
    # it keeps (whole kernel's SASS at img32-win4's launch, sm_90a, 3.9: ~3.9 warp-instructions
    # per kept score against 13.3 for 64x32 w8, 7.7 for 64x64 w4); HMMA, as M < 64
    ("fwd-win", False, 2): (
        [(64, 32, 4, 3)],
        {(16, 0): [(64, 64, 8, 1)], (32, 16): [(64, 32, 8, 3)],
         (64, 0): [(64, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (16, 16, 1, 2)],
         (64, 16): [(64, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (16, 16, 1, 2)],
         (64, 32): [(64, 32, 8, 3)], (128, 0): [(32, 16, 4, 2)]}),
    ("dkdv", False, 2): (
        [(32, 128, 8, 1), (32, 64, 4, 3)],
        {(32, 0): [(32, 128, 8, 2)],
         (32, 16): [(32, 128, 8, 1), (32, 64, 4, 3)],
         (64, 0): [(32, 128, 8, 1), (32, 64, 4, 3)], (64, 16): [(32, 64, 8, 1), (16, 64, 8, 3)],
         (64, 32): [(16, 64, 8, 1)], (128, 0): [(16, 64, 8, 3), (16, 64, 8, 2)]}),
    # dK/dV summing dS into the table partials (ACC_DS): one [BLOCK_N, BLOCK_M] fp32 tile more.
    # At d = 72 two larger-tile candidates after the others: per score element they issue
    # ~40% fewer instructions (loop column of the compile report, the dense table at DiffiT-XL's
    # launch, sm_90a, Triton 3.9: 32x128 w8 0.98, 32x64 w4 0.97 warp-instructions per score,
    # against 1.57 for 32x64 w8 and 2.70 for 16x64 w8); clean for sm_90a under Triton 3.6 and
    # 3.9, they spill 12-36 bytes for sm_80: the card measures
    ("dkdv-acc", False, 2): (
        [(16, 128, 8, 1)],
        {(16, 0): [(32, 128, 8, 2)], (32, 0): [(32, 128, 8, 1)],
         (64, 0): [(32, 64, 8, 1), (16, 64, 4, 1)],  # 30 instructions per score against 45
         # d 72, the last two: the H200's pick (32x64 w8 s1: 165 registers, one program = 8
         # warps per SM, every load of its loop exposed) with Q / dO prefetched a tile ahead
         # (s2: 158 registers, 56 KB), and 16x64 w4 s2 (168 registers, 38 KB: 3 programs = 12
         # warps per SM, prefetched); sm_90a, Triton 3.6
         (64, 16): [(16, 64, 8, 3), (32, 64, 8, 1), (32, 128, 8, 2), (32, 64, 4, 2),
                    (32, 64, 8, 2), (16, 64, 4, 2)],
         (64, 32): [(16, 64, 8, 1)],
         (128, 0): [(16, 64, 8, 1)]}),
    # (16x64 w4: 34.5 per score against 75.0 for w8 at d 72, 29.0 against 69.0 at d 64)
    ("dkdv-win-acc", False, 2): (
        [(16, 64, 8, 1), (16, 64, 4, 1)],
        {(16, 0): [(32, 64, 8, 1)], (32, 0): [(32, 64, 8, 1)], (32, 16): [(16, 64, 8, 1)],
         (64, 0): [(16, 64, 8, 2), (16, 64, 4, 1)], (64, 32): [(16, 16, 8, 1)],
         (128, 0): [(16, 16, 4, 1)]}),
    ("dkdv-win", False, 2): (
        [(32, 64, 4, 2)],
        {(32, 0): [(32, 64, 8, 1)], (32, 16): [(32, 64, 8, 1)], (64, 0): [(16, 64, 8, 1)],
         (64, 16): [(16, 64, 8, 1)], (64, 32): [(16, 16, 8, 1)], (128, 0): [(16, 16, 4, 1)]}),
    ("dq", False, 2): (
        [(128, 32, 8, 2), (64, 32, 4, 3)],
        {(64, 0): [(128, 32, 8, 1), (64, 32, 4, 3)],
         # d 72: 128x32 w8 s2 last, the H200's pick (128x32 w8 s1: 130 registers, one
         # program = 8 warps per SM) with K / V prefetched a tile ahead, which Triton builds in
         # 119 registers (76 KB): two programs, 16 warps per SM (sm_90a, Triton 3.6)
         (64, 16): [(128, 32, 8, 1), (64, 32, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2),
                    (128, 32, 8, 2)],
         (64, 32): [(128, 32, 8, 1), (64, 32, 4, 3)], (128, 0): [(128, 16, 8, 2), (64, 32, 8, 3)]}),
    # (64x32 w4: 22.2 per score against 63.0 for 64x16 w8 at d 72, 17.6 against 32.1 for
    # 64x32 w8 at d 64)
    ("dq-win", False, 2): (
        [(64, 32, 4, 3)],
        {(32, 0): [(64, 32, 8, 3)], (32, 16): [(64, 32, 8, 3)],
         (64, 0): [(64, 32, 8, 2), (64, 32, 4, 3)], (64, 16): [(64, 16, 8, 3), (64, 32, 4, 3)],
         (64, 32): [(64, 16, 8, 3)], (128, 0): [(32, 16, 4, 2)]}),
    # d 72's second entry is the backward plan "separate-64" (the table-gradient pass on 64x64
    # tiles): HGMMA and 0.86 warp-instructions per score on sm_90a against 1.97 for 32x32 w4
    # (HMMA), spill-free there (Triton 3.9); 12 bytes spill for sm_80. The pass's tile fixes its
    # partials' layout, so it is chosen as a plan, not autotuned. The first is single-stage: two
    # stages spilled 20 bytes for sm_90a under Triton 3.4 (windowed)
    ("dbias", False, 2): (
        [(64, 64, 4, 2)],
        {(64, 0): [(64, 64, 4, 1)], (64, 16): [(32, 32, 4, 1), (64, 64, 4, 1)],
         (64, 32): [(32, 32, 4, 2)], (128, 0): [(16, 16, 2, 1)]}),
    # the "wide" plan's tile: the whole 8x8 window, 4 warps (one warpgroup: HGMMA on sm_90a);
    # the second stage prefetches the program's next window (sm_90a, Triton 3.9: 210 / 236
    # registers and 88 / 104 KB at d 64 / 72, still two programs per SM; it spills for sm_80)
    ("window-wide", False, 2): ([], {(64, 0): [(64, 64, 4, 1), (64, 64, 4, 2)],
                                     (64, 16): [(64, 64, 4, 1), (64, 64, 4, 2)]}),
    ("window", False, 2): (
        [(32, 32, 2, 1)],
        {(32, 16): [(32, 32, 4, 1)], (64, 0): [(16, 16, 1, 1)], (64, 16): [(16, 16, 1, 1)],
         (64, 32): [(16, 16, 1, 1)], (128, 0): [(16, 16, 4, 1)]}),
    ("fwd", True, 2): (
        [(64, 32, 4, 3), (64, 32, 4, 2)],
        {(64, 16): [(64, 32, 8, 3), (64, 32, 8, 2)]}),
    ("dkdv", True, 2): (
        [(16, 64, 4, 2), (16, 64, 8, 3)],
        {(128, 0): [(32, 64, 8, 3), (32, 64, 8, 2)]}),
    ("dq", True, 2): ([(64, 16, 4, 3), (32, 16, 2, 2)], {}),
    ("dbias", True, 2): (
        [(32, 32, 2, 2)],
        {(128, 0): [(16, 32, 2, 1)]}),
    ("window", True, 2): ([(16, 16, 1, 1)], {}),
    # fp32 is exact (ieee): FMA dots hold whole head-dim slices per thread, so small tiles
    ("fwd", False, 4): (
        [(32, 32, 8, 1)],
        {(64, 16): [(32, 16, 4, 1)]}),
    # d 72: 32x16 (32x32 spilled 56 bytes for sm_90a under Triton 3.4, in masked windows)
    ("fwd-win", False, 4): ([(32, 32, 8, 1)], {(64, 16): [(32, 16, 4, 1)]}),
    ("dkdv", False, 4): (
        [(16, 16, 4, 1)],
        {(32, 0): [(16, 16, 4, 1)], (32, 16): [(32, 32, 8, 1)]}),
    ("dkdv-acc", False, 4): (
        [(16, 16, 4, 1)],
        {(16, 0): [(16, 16, 2, 1)], (32, 16): [(16, 16, 4, 1)], (64, 32): [(16, 16, 8, 1)],
         (128, 0): [(16, 16, 4, 1)]}),
    ("dkdv-win-acc", False, 4): (
        [(16, 16, 2, 1)],
        {(16, 0): [(16, 16, 2, 1)], (32, 16): [(16, 32, 8, 1)], (64, 16): [(16, 16, 8, 1)],
         (64, 32): [(16, 16, 4, 1)]}),
    ("dkdv-win", False, 4): (
        [(16, 16, 2, 1)],
        {(32, 0): [(16, 16, 4, 1)], (32, 16): [(16, 16, 4, 1)], (64, 16): [(16, 32, 8, 1)]}),
    ("dq", False, 4): (
        [(16, 16, 2, 1)],
        {(32, 16): [(16, 16, 8, 1)], (64, 16): [(16, 16, 4, 1)], (128, 0): [(16, 16, 8, 1)]}),
    ("dq-win", False, 4): (
        [(16, 16, 2, 1)],
        {(32, 16): [(16, 16, 1, 1)], (64, 16): [(16, 16, 8, 1)], (128, 0): [(16, 16, 8, 1)]}),
    ("dbias", False, 4): (
        [(16, 16, 2, 1)],
        {(64, 16): [(32, 16, 4, 1)]}),
    ("window", False, 4): ([], {}),
    ("fwd", True, 4): (
        [(32, 32, 4, 1)],
        {(32, 16): [(32, 16, 4, 1)], (64, 0): [(32, 32, 8, 1)], (128, 0): [(16, 16, 16, 1)]}),
    ("dkdv", True, 4): (
        [(16, 16, 2, 1)],
        {(64, 16): [(16, 32, 4, 1)]}),
    # d 72: 16x32 w4, d 128: 16x16 w8 (32x32 w8 and 32x16 w8 spilled 32 / 12 bytes under
    # Triton 3.4; 32x16 w8 at d 72 12-24 under 3.6-3.9)
    ("dq", True, 4): (
        [(32, 32, 8, 1)],
        {(16, 0): [(32, 32, 8, 1)], (64, 16): [(16, 32, 4, 1)], (128, 0): [(16, 16, 8, 1)]}),
    ("dbias", True, 4): ([(16, 16, 2, 1)], {}),
    ("window", True, 4): ([], {}),
}
# rowsum(dO * O): 64 rows over 8 warps (4 spill 16 bytes for float32 d 72 under Triton 3.9)
DELTA_BLOCK_M, DELTA_WARPS = 64, 8
_INTERP = {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1),
           "dbias": (32, 32, 2, 1), "window": (32, 32, 2, 1)}


def _card_list(kind: str, D0: int, D1: int, HAS_D1: bool, elt: int,
               has_bias: bool) -> List[tuple]:
    """The whole candidate list of one kernel for one (dense bias, dtype size, head dim) on a
    card (the emulated card's under _emulate_card; [the interpreter's config] under the plain
    interpreter): what a CUDA launch tunes over, and so what sizes the buffers and work splits
    that must suit whichever candidate the card picks.
    kinds "fwd-win", "dkdv-win", "dq-win": the windowed variants (their index arithmetic
    needs registers of its own; small query tiles also waste less on other windows' keys)."""
    if _CARD["elt"] is None and interpreting():
        return [_INTERP[kind.split("-")[0]]]
    default, per_shape = _CONFIG_TABLE[(kind, has_bias, _CARD["elt"] or elt)]
    return per_shape.get((D0, D1 if HAS_D1 else 0), default)


def _configs(kind: str, D0: int, D1: int, HAS_D1: bool, elt: int, has_bias: bool) -> List[tuple]:
    """The configs a launch takes: the card's list (_card_list), or under _emulate_card the
    one of it the test picks (the interpreter runs one config)."""
    cfgs = _card_list(kind, D0, D1, HAS_D1, elt, has_bias)
    if _CARD["elt"] is not None:
        return [cfgs[_CARD["pick"] % len(cfgs)]] if cfgs else []
    return cfgs


def _fused_launch(BLOCK: int, cfg: tuple, elt: int) -> Tuple[int, int]:
    """(num_warps, num_stages) of the fused kernel at a tile of BLOCK <= cfg's block: spans
    of <= 16 tokens run a 16-wide tile (one warp for tensor-core dots, two for fp32's FMA)."""
    if BLOCK == cfg[0]:
        return cfg[2], cfg[3]
    return (1 if elt == 2 else 2), 1


def _packed_span(D0: int, D1: int, HAS_D1: bool, elt: int, has_bias: bool) -> int:
    """Largest span the fused backward packs into its "window" config's tiles (0: none). Its
    dots are chained, for which Triton stacks the warps along M, so its configs start from one
    warp per 16 rows (more where that spills)."""
    cfgs = _card_list("window", D0, D1, HAS_D1, elt, has_bias)  # never tuned: the first runs
    return min(FUSED_MAX_SPAN, cfgs[0][0]) if cfgs else 0


def _wide_configs(D0: int, D1: int, HAS_D1: bool, elt: int, has_bias: bool,
                  windowed: bool) -> List[tuple]:
    """The fused backward's configs for one window per tile past _packed_span (the "wide"
    plan: 16-bit windows, no dense bias; [] elsewhere). Global spans stay on dK/dV and dQ: the
    tile's global token arithmetic spills 420-2100 bytes even at d 64 (sm_80 and sm_90a,
    Triton 3.6 and 3.9). elt: the inputs' element size (a test's emulated card decides the
    lists)."""
    if not windowed or (_CARD["elt"] or elt) != 2 or has_bias:
        return []
    return _configs("window-wide", D0, D1, HAS_D1, elt, has_bias)


def _log(kind: str, *configs: tuple) -> None:
    if _CARD["log"] is not None:
        _CARD["log"].append((kind,) + configs)


_EVEN_OK = True  # the tests turn the unmasked variant off to compare it bit for bit


def _even_blocks(n_win: int, bm: int, bn: int) -> bool:
    """EVEN: the span a query attends over (N, or a window of n_win tokens; N is a multiple of
    it) is a multiple of both blocks, so every tile is whole and inside one window and the
    kernel builds no row, key or window masks (DiffiT's latent grids, N 256 and 1024; 8x8
    windows under 64-token tiles)."""
    return _EVEN_OK and n_win % bm == 0 and n_win % bn == 0


def _even(meta: dict) -> bool:
    """_even_blocks as the autotuner's heuristic (its launch arguments by name)."""
    return _even_blocks(meta["n_win"], meta["BLOCK_M"], meta["BLOCK_N"])


@functools.lru_cache(maxsize=None)
def _arg_index(kernel, name: str) -> int:
    return kernel.arg_names.index(name)


def _resource_errors() -> tuple:
    """Triton's errors for a kernel config past the card's shared memory or registers (raised
    when the kernel loads, before it runs)."""
    if triton is None:
        return ()
    from triton.runtime import errors
    return tuple(getattr(errors, n) for n in ("OutOfResources", "PTXASError")
                 if hasattr(errors, n))


_FIRST_FIT: dict = {}  # (kernel, kind, list) -> index of the list's first config the card runs


def _first_fit(key: tuple, configs: List[tuple], launch):
    """DIFFIT_KERNELS_AUTOTUNE=0 with several candidates: launch(config) with the list's first
    config this card can run (the first of every list fits sm_80 / sm_90a; on a card with less
    shared memory per block, e.g. 99 KB, a later one), remembered per list."""
    i = _FIRST_FIT.get(key, 0)
    while True:
        try:
            out = launch(configs[i])
        except _resource_errors():
            if i + 1 == len(configs):
                raise
            i += 1
            continue
        _FIRST_FIT[key] = i
        return out


def _launch_one(kernel, kind: str, cfg: tuple, grid_of, args: tuple, kwargs: dict):
    bm, bn, w, s = cfg
    if "EVEN" in kernel.arg_names:
        even = _even_blocks(args[_arg_index(kernel, "n_win")], bm, bn)
        kwargs = dict(kwargs, EVEN=even)
        if even:
            _log("even", kind)
    kernel[grid_of(bm, bn)](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                            num_stages=s)
    return bm, bn


def _launch_list(kernel, kind: str, configs: List[tuple], keys: List[str], args: tuple,
                 kwargs: dict, one, tuned):
    """A candidate list launched as a card launches it: one config by one(config) (its key's
    first launch repeated where testing.autotuner_repeats asks); several with autotuning off,
    the first the card can load (_first_fit); else tuned(), the cached autotuner (CUDA)."""
    if len(configs) == 1:
        for _ in range(autotuner_repeats(kernel, keys, args, kwargs)):
            one(configs[0])
        return one(configs[0])
    if not autotune_enabled():
        return _first_fit((kernel.fn.__name__, kind, tuple(configs)), configs, one)
    return tuned()


def _launch(kernel, kind: str, configs: List[tuple], grid_of, args: tuple, kwargs: dict):
    """One config: launch it. Several (CUDA only): a cached autotuner over exactly that list,
    keyed on the sequence-length bucket, span bucket, head dim and windowing (plus dtypes), or
    with autotuning off the first that fits the card (_first_fit); EVEN is set per launch from
    the config's blocks (kernels that take it)."""
    _log(kind, *configs)
    has_even = "EVEN" in kernel.arg_names
    flags = ("HAS_TABLE", "HAS_BIAS", "SLAB_TAB") + (("ACC_DS",) if "ACC_DS" in kwargs else ())
    keys = ["N_BUCKET", "SPAN_BUCKET", "D", "WINDOWED", *flags]

    def build():
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in configs]
        # the autotuner repeats a key's first launch, which needs no reset: every output is
        # stored once per launch, but for the dK/dV pass's later batch-share steps, which add
        # into the table partials and never start a key (step 0 stores; the interpreter tests
        # repeat first launches too: testing.autotuner_repeats)
        inner = triton.heuristics({"EVEN": _even})(kernel) if has_even else kernel
        return triton.autotune(cfgs, key=keys)(inner)

    def tuned():
        name = kernel.fn.__name__
        tuner = launch_tuned((name, kind, tuple(configs), flags), build, name, kind,
                             lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"]), args,
                             kwargs)
        best = tuner.best_config.kwargs
        return best["BLOCK_M"], best["BLOCK_N"]

    return _launch_list(kernel, kind, configs, keys, args, kwargs,
                        lambda cfg: _launch_one(kernel, kind, cfg, grid_of, args, kwargs), tuned)


def _launch_window(configs: List[tuple], grid: tuple, args: tuple, kwargs: dict) -> None:
    """The fused backward kernel at one window per tile (plan "wide"): one config, or (CUDA)
    a cached autotuner over the list's warps and stages, keyed on the span's tile, the head dim
    and the windowing; every output is stored once per launch (each program's partial
    included), so the tuner's repeated launches need no reset."""
    kernel = _kernels._tmsa_attention_bwd_kernel_window
    _log("window-wide", *configs)

    def one(cfg):
        kernel[grid](*args, **kwargs, num_warps=cfg[2], num_stages=cfg[3])

    keys = ["BLOCK", "D", "WINDOWED", "HAS_TABLE", "ACC_DS"]

    def tuned():
        name = kernel.fn.__name__
        launch_tuned((name, "window-wide", tuple(configs)),
                     lambda: triton.autotune([triton.Config({}, num_warps=w, num_stages=st)
                                              for _, _, w, st in configs], key=keys)(kernel),
                     name, "window-wide", grid, args, kwargs)

    _launch_list(kernel, "window-wide", configs, keys, args, kwargs, one, tuned)


def _rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """Unit last stride and every other stride (of a dim > 1) a multiple of 8, as the kernels'
    vector-load hints assume; anything else is copied."""
    t = unit_last_stride(t)
    if any(st % 8 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        t = t.contiguous()
    return t


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


def _bias_grad(ds: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ds [H, N, N] (summed over the batch) or [B, H, N, N] -> the bias's own shape."""
    ds = ds.reshape((1,) * (4 - ds.dim()) + tuple(ds.shape))
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    dims = [d for d in range(4) if shape[d] == 1 and ds.shape[d] != 1]
    if dims:
        ds = ds.sum(dims, keepdim=True)
    return ds.reshape(bias.shape).to(bias.dtype).contiguous()


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
        return _PLAN_CHOICE.get(key, "slabs") == "slabs"
    return _choose_plan(["slabs", "gather"], key, lambda p: run(p == "slabs"),
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
    args = (q, k, v, tab, bias if bias is not None else q, o, lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *_bias_strides(bias),
            H, N, D, geom.R, slab, gw_log2, *geom.args(q.device), geom.rel_off,
            float(scale) * LOG2E,
            next_power_of_2(N), next_power_of_2(geom.n_win))
    kind = "fwd-win" if geom.windowed else "fwd"
    configs = _configs(kind, kw["D0"], kw["D1"], kw["HAS_D1"], q.element_size(), bias is not None)
    _launch(_kernels._tmsa_attention_fwd_kernel, kind, configs,
            lambda bm, bn: (cdiv(N, bm), B * H), args, kw)
    return o, lse


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


# ---- the backward's plan ------------------------------------------------------------------------
# Spans past the fused kernel's packed tiles have several exact, deterministic ways through the
# backward, and which is fastest depends on the shape and the card (the H200 at ec83eac: the
# table gradient summed in the dK/dV pass took 1.6x the time of a pass of its own at
# latent256-B64, and 0.85x at latent512-B8):
#   "shares"    delta, dK/dV summing dS into the fp32 table partials of a few batch shares
#               (read-modify-written, one launch per sample of a share), dQ
#   "samples"   the same with one share per sample: one dK/dV launch that only stores its
#               partials, B / shares times more bytes of them (up to SAMPLES_MAX_BYTES)
#   "separate"  delta, dK/dV, dQ, and the table's (or a dense bias's) gradient, where asked,
#               in a pass of its own that recomputes P and dP: the only way past
#               _DS_MAX_ELEMENTS, for a dense bias, and where no table gradient is asked
#   "separate-64" the same with the table's pass on the second tile of its config list where
#               one is listed (d 72: 64x64, HGMMA on sm_90a, for the first's 32x32)
#   "wide"      16-bit windows of FUSED_MAX_SPAN + 1 to WIDE_SPAN tokens: the fused kernel at
#               one window per 64-wide tile
# ("fused": spans of at most _packed_span tokens, the fused kernel's packed tiles, the only
# plan there.) On CUDA the first backward of each shape times every plan it can take and keeps
# the fastest for the process (_choose_plan), as the kernels' autotuners keep configs; on
# other devices, under the interpreter and while a CUDA graph is being captured, the first
# plan of _bwd_plans' list (what ran before plans were measured), as with
# DIFFIT_KERNELS_AUTOTUNE=0 (_common.AUTOTUNE). BWD_PLAN forces one plan
# wherever it is among a shape's plans (the benchmark's A/B rows, the tests).
BWD_PLAN: Optional[str] = None
PLAN_TUNING = True
PLAN_SLEEP_CYCLES = 2_000_000   # ~1 ms of GPU sleep while the timed calls are launched
_PLAN_CHOICE: dict = {}         # (device, shape, dtype, flags) -> the plan the card chose
                                # (and _table_key -> "slabs" or "gather")


def _bwd_plans(geom: _Geom, shape: tuple, B: int, H: int, N: int, device: torch.device,
               acc_table: bool) -> List[str]:
    """The backward plans a shape can take (see above), the one to run untimed first."""
    if geom.n_win <= _packed_span(*shape):
        return ["fused"]
    plans = []
    if acc_table:
        cfgs = _card_list("dkdv" + ("-win" if geom.windowed else "") + "-acc", *shape)
        span_pad, tiles = _ds_layout(N, geom.n_win, tuple(c[:2] for c in cfgs))
        if tiles * span_pad <= _DS_MAX_ELEMENTS:
            plans.append("shares")
            if _share_size(device, B, H, N, cfgs) > 1 \
                    and H * B * tiles * span_pad * 4 <= SAMPLES_MAX_BYTES:
                plans.append("samples")
    plans.append("separate")
    if acc_table and len(_card_list("dbias", *shape)) > 1:
        plans.append("separate-64")
    if geom.n_win <= WIDE_SPAN and _wide_configs(*shape, geom.windowed):
        plans.append("wide")
    return plans


def _share_size(device: torch.device, B: int, H: int, N: int, cfgs: List[tuple]) -> int:
    """Samples per batch share of the "shares" plan (the dK/dV launches it makes)."""
    return cdiv(B, _batch_groups(device, B, H * min(cdiv(N, c[1]) for c in cfgs)))


def _plans_of(B: int, H: int, N: int, D: int, dtype: torch.dtype, geometry: Sequence[int],
              device, table: bool = True) -> List[str]:
    """_bwd_plans of a shape without its tensors (the benchmark's plan rows): a table whose
    gradient is asked, or (table=False) no bias at all."""
    elt = torch.empty((), dtype=dtype).element_size()
    return _bwd_plans(_Geom(N, geometry), (*_head_split(D), elt, False), B, H, N,
                      torch.device(device), table)


def _plan_tunable(device: torch.device) -> bool:
    return (PLAN_TUNING and autotune_enabled() and device.type == "cuda" and not interpreting()
            and not torch.cuda.is_current_stream_capturing())


def _time_plan(plan: str, run) -> float:
    """GPU milliseconds of one call of run() (one plan's whole backward): a first call, in
    which its kernels compile and autotune, then the least of three means of three calls
    queued behind a ~1 ms GPU sleep, so the host's launch work does not show (training replays
    CUDA graphs by default)."""
    run()
    best = math.inf
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda._sleep(PLAN_SLEEP_CYCLES)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 3)
    return best


def _misfits() -> tuple:
    """The exceptions that mean a plan does not fit the card: CUDA out of memory, or (Triton)
    a kernel config past the card's shared memory or registers, e.g. the wide tile's 104 KB on
    a card with 100 KB per block."""
    return (torch.cuda.OutOfMemoryError,) + _resource_errors()


def _compile_errors() -> tuple:
    """Triton's compile-time errors (a kernel this Triton release cannot build)."""
    if triton is None:
        return ()
    from triton.compiler.errors import CompilationError
    return (CompilationError,)


def _choose_plan(plans: List[str], key: tuple, run, describe,
                 what: str = "tmsa_attention backward", kind: str = "plan") -> str:
    """BWD_PLAN where it is among plans; else the plan chosen for key before; else, where
    _plan_tunable, each plan timed (_time_plan; one that does not fit the card, _misfits,
    counts as infinitely slow), the fastest kept for key and recorded with every plan's time
    (autotune.csv's rows: kernel `what`, kind `kind`); else plans[0]. A plan other than the
    first that fails to compile is left out with a warning (the first's error is raised, as
    untimed). (The forward's table read uses it too, with its own key, what and kind.)"""
    if BWD_PLAN in plans:
        return BWD_PLAN
    if key in _PLAN_CHOICE:
        return _PLAN_CHOICE[key]
    if len(plans) == 1 or not _plan_tunable(key[0]):
        return plans[0]
    times = {}
    for plan in plans:
        try:
            times[plan] = _time_plan(plan, lambda: run(plan))
        except _misfits():
            times[plan] = math.inf
        except _compile_errors() as e:
            if plan == plans[0]:  # what runs untimed: its error is the op's
                raise
            # a plan the card was only offered: the op goes on without it, and says why
            warnings.warn(f"{what}: plan {plan!r} did not compile with this Triton and is "
                          f"left out: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                          RuntimeWarning, stacklevel=2)
            times[plan] = math.inf
    best = min(plans, key=lambda p: times[p])
    _PLAN_CHOICE[key] = best
    record_choice(what, kind, describe(), best, [(p, times[p]) for p in plans])
    return best


@on_tensor_device
def _tmsa_attention_bwd(do, q, k, v, o, lse, table, bias, geometry, scale, need_extra):
    B, H, N, D = q.shape
    dev = q.device
    do, o = _rows_aligned(do), _rows_aligned(o)
    key = (dev, q.dtype, B, H, N, D, tuple(geometry), table is not None,
           None if bias is None else tuple(bias.shape), need_extra)
    plan = None if BWD_PLAN is not None else _PLAN_CHOICE.get(key)
    if plan is None:
        geom = _Geom(N, geometry)
        shape = (*_head_split(D), q.element_size(), bias is not None)
        plans = _bwd_plans(geom, shape, B, H, N, dev, table is not None and need_extra)

        def describe():
            what = "table" if table is not None else "bias" if bias is not None else "plain"
            win = "x".join(map(str, geometry[2:])) if geom.windowed else "global"
            return (f"{_shape_text(q)} {what} window={win}"
                    + ("" if need_extra else " no-extra-grad"))

        plan = _choose_plan(plans, key, lambda p: _bwd_run(
            p, do, q, k, v, o, lse, table, bias, geometry, scale, need_extra), describe)
    return _bwd_run(plan, do, q, k, v, o, lse, table, bias, geometry, scale, need_extra)


def _bwd_run(plan, do, q, k, v, o, lse, table, bias, geometry, scale, need_extra):
    """The backward by one plan (_bwd_plans names them); do and o rows aligned."""
    B, H, N, D = q.shape
    geom = _Geom(N, geometry)
    dev = q.device
    _log("plan", plan)
    kw = _common_kwargs(q, geom, table, bias)
    shape = (kw["D0"], kw["D1"], kw["HAS_D1"], q.element_size(), bias is not None)
    narrow = _packed_span(*shape)
    packs = _packs(q.dtype, geom.n_win, narrow)
    grads = empty(_grads_shape(q, packs), q.dtype, dev)
    dq, dk, dv = _grad_views(grads, packs)
    packed = dict(PACKED=packs)
    acc_table = table is not None and need_extra
    # a bias shared by the batch gets ds summed over B ([H, N, N]); a per-sample one ds per
    # sample ([B, H, N, N]); either is then summed over the bias's other broadcast dims
    per_sample = bias is not None and bias.dim() == 4 and bias.shape[0] > 1
    acc_dense = bias is not None and not per_sample and need_extra
    store_ds = per_sample and need_extra
    exact = store_ds and tuple(bias.shape) == (B, H, N, N)  # else summed afterwards: in fp32
    dbias = empty((B, H, N, N), bias.dtype if exact else torch.float32, dev) if store_ds else None
    bias_arg = bias if bias is not None else q
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_bias_strides(bias))
    geo = (H, N, D, geom.R, *geom.args(dev), geom.rel_off, float(scale) * LOG2E)
    dextra = q.new_empty(0)

    if plan in ("fused", "wide"):
        n = geom.n_win
        G = max(1, min(narrow // n, geom.nW))   # windows packed per tile (1 past narrow)
        BLOCK = max(16, next_power_of_2(G * n))
        groups = cdiv(geom.nW, G)
        units = B * groups
        acc = acc_table or acc_dense
        P = min(units, _programs_per_head(dev, H)) if acc else units
        per_prog = cdiv(units, P)
        P = cdiv(units, per_prog)
        partial = empty((H, P, BLOCK, BLOCK), torch.float32, dev) if acc else q
        tab = _prep_table(table, q)
        args = (q, k, v, do, tab, bias_arg, lse, dq, dk, dv, dbias if dbias is not None else q,
                partial, *strides, *geo, float(scale), units, groups, G * n, per_prog, P)
        kwargs = dict(ACC_DS=acc, STORE_DS=store_ds, BLOCK=BLOCK, **kw, **packed)
        if n <= narrow:
            cfg = _card_list("window", *shape)[0]   # never tuned: a card runs the first
            warps, stages = _fused_launch(BLOCK, cfg, q.element_size())
            _log("window", cfg)
            _kernels._tmsa_attention_bwd_kernel_window[(P, H)](*args, **kwargs, num_warps=warps,
                                                               num_stages=stages)
        else:  # "wide": one window per tile
            _launch_window(_wide_configs(*shape, True), (P, H), args, kwargs)
        if acc_table:
            dextra = _table_grad(partial.sum(1).reshape(H, BLOCK * BLOCK),
                                 _fused_bins(n, G, BLOCK, geom.gh, geom.gw, str(dev)),
                                 table.dtype)
        elif acc_dense:
            dextra = partial.sum(1)[:, :N, :N]
    else:
        tab, slab, gw_log2, on_slabs = _table_arg(table, q, geom, N,
                                                  _reads_slabs(table, q, geom, geometry))
        geo_p = (H, N, D, geom.R, slab, gw_log2, *geom.args(dev), geom.rel_off,
                 float(scale) * LOG2E)
        delta = empty((B, H, N), torch.float32, dev)
        _kernels._tmsa_attention_bwd_kernel_delta[(cdiv(N, DELTA_BLOCK_M), B * H)](
            o, do, delta, *_strides3(o), *_strides3(do), H, N, D, BLOCK_M=DELTA_BLOCK_M,
            D0=kw["D0"], D1=kw["D1"], HAS_D1=kw["HAS_D1"], num_warps=DELTA_WARPS)
        buckets = (next_power_of_2(N), next_power_of_2(geom.n_win))
        win = "-win" if geom.windowed else ""
        acc_ds = plan in ("shares", "samples")   # dS summed into table partials in dK/dV
        dkdv_cfgs = _configs("dkdv" + win + ("-acc" if acc_ds else ""), *shape)
        if acc_ds:
            # sized for any candidate of the card's list, as on the card, whichever one runs
            cands = _card_list("dkdv" + win + "-acc", *shape)
            span_pad, tiles = _ds_layout(N, geom.n_win, tuple(c[:2] for c in cands))
            per_b = 1 if plan == "samples" else _share_size(dev, B, H, N, cands)
            groups = cdiv(B, per_b)
            _log("ds-shares", (groups, per_b))
            partial = empty((H * groups * tiles * span_pad,), torch.float32, dev)
        else:
            # span_pad is read under ACC_DS only; 0 types as the JIT types any multiple of 16
            groups, per_b, partial, span_pad = B, 1, q, 0
        for step in range(per_b):  # ACC_DS: share g's sample step (the first stores)
            live = cdiv(B - step, per_b)   # the shares that have a sample `step`
            bm, bn = _launch(_kernels._tmsa_attention_bwd_kernel_dkdv,
                             "dkdv" + win + ("-acc" if acc_ds else ""), dkdv_cfgs,
                             lambda bm, bn: (cdiv(N, bn), H, live),
                             (q, k, v, do, tab, bias_arg, lse, delta, dk, dv, partial, *strides,
                              *geo_p, float(scale), per_b, step, groups, span_pad, *buckets),
                             dict(kw, ACC_DS=acc_ds, SLAB_TAB=on_slabs, **packed))
        _launch(_kernels._tmsa_attention_bwd_kernel_dq, "dq" + win, _configs("dq" + win, *shape),
                lambda bm, bn: (cdiv(N, bm), B * H),
                (q, k, v, do, tab, bias_arg, lse, delta, dq, dbias if dbias is not None else q,
                 *strides, *geo_p, float(scale), *buckets),
                dict(kw, STORE_DS=store_ds, SLAB_TAB=on_slabs, **packed))
        if acc_ds:
            bins, L = _ds_table_plan(N, geom.n_win, geom.gh, geom.gw, bn, span_pad, str(dev))
            # [H, groups, key tiles * BN * span_pad] summed over the batch groups in order
            dextra = _table_grad(partial[:H * groups * L].view(H, groups, L).sum(1), bins,
                                 table.dtype)
        elif acc_table or acc_dense:
            # the plan picks the tile (not an emulated card's pick: the pass is never tuned)
            BM, BN, warps, stages = _card_list("dbias", *shape)[plan == "separate-64"]
            _log("dbias", (BM, BN, warps, stages))
            # the pairs of one tile diagonal share their relative offsets only when both tiles
            # step by the same whole number of grid rows (square tiles, gw | BM)
            group = acc_table and BM == BN and BM % geom.gw == 0
            pairs, slots, slot_index, bins, P = _dbias_plan(
                geom.n_win, geom.nW, B, BM, BN, group, _programs_per_head(dev, H),
                (geom.gh, geom.gw) if acc_table else None, str(dev))
            partial = empty((H, P, BM, BN), torch.float32, dev)
            if on_slabs:  # this pass gathers from the [H, R] table
                tab = _prep_table(table, q)
            _kernels._tmsa_attention_bwd_kernel_dbias[(P, H)](
                q, k, v, do, tab, bias_arg, lse, delta, pairs, slots, partial, *strides,
                H, N, D, geom.R, geom.n_win, geom.nW, *geom.args(dev)[1:],
                geom.rel_off, float(scale) * LOG2E, P, BLOCK_M=BM, BLOCK_N=BN,
                num_warps=warps, num_stages=stages, **kw)
            if acc_table:
                dextra = _table_grad(partial.view(H, P * BM * BN), bins, table.dtype)
            else:
                dextra = _reduce_slots(partial, slot_index, N)
    if acc_dense:  # (a table's gradient comes out of _table_grad in its dtype and layout)
        dextra = _bias_grad(dextra, bias)
    elif store_ds:
        dextra = _bias_grad(dbias, bias)
    return grads, dextra


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
            The Triton path takes D = 16, 24, ..., 128.
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
    gh, gw, Gh, Gw = reference.check_attention_inputs(q, k, v, table, grid, window, bias)
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
    uses_grid = grid is not None and (table is not None or window is not None)
    geometry = [Gh, Gw, gh, gw] if uses_grid else []
    q, k, v = (_rows_aligned(t) for t in (q, k, v))
    bias = unit_last_stride(bias) if bias is not None else None
    return call_op(_FWD_OP, _tmsa_attention_fwd_op, _fwd_impl, _TmsaAttentionDirect,
                   (q, k, v, table, bias, geometry, scale, bool(deterministic)),
                   (q, k, v, table, bias))[0]


# ---------------------------------------------------------------------------------------------
_FP32_PTRS = ("TAB", "LSE", "DELTA", "PARTIAL", "PART_SUM", "SLABS")
_I32_PTRS = ("PLAN", "SLOTS", "BINS", "TOK")
_FLOATS = ("qk_scale", "sm_scale")
_INTS = ("H", "N", "D", "R", "P")


def _spec(fn, dt: str, constexprs: dict, warps: int, stages: int, label: str,
          dot: bool = True, example: Optional[dict] = None):
    from ._aot import AotSpec

    sig = {}
    ints = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name.isupper() and name not in _INTS:
            sig[name] = "*fp32" if name in _FP32_PTRS else "*i32" if name in _I32_PTRS else f"*{dt}"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            ints[name] = (example or {})[name]
    # fp32 is exact (ieee): FMA, not tensor cores; 16-bit rows load vectorised (MAX_SCALAR16)
    return AotSpec(fn.__name__, fn, sig, constexprs, warps, stages, label, dot and dt != "fp32",
                   example=ints, vector16=dot and dt != "fp32")


@functools.lru_cache(maxsize=None)
def _example(D: int, windowed: bool, bm: int = 64, bn: int = 64, bias: bool = False,
             odd: bool = False) -> dict:
    """An example launch's int arguments, which the compile gate types as Triton's JIT types
    them (divisibility by 16 and constants change the code): DiffiT-XL/2 at 256 px (B 32, 16
    heads, a 16x16 token grid) for global attention, a 64x64 image-space map in 8x8 windows
    (B 16, 4 heads) for windowed; odd: a 15x16 grid (N 240), 6x6 windows of a 48x48 map,
    whose tiles are masked (EVEN off). q, k, v are head-split views of the packed [B, N, 3C]
    projection (time_qkv's), o and dO over [B, N, H, D] memory; on 132 SMs."""
    B, H, Gh, Gw, gh, gw = {(False, False): (32, 16, 16, 16, 16, 16),
                            (False, True): (32, 16, 15, 16, 15, 16),
                            (True, False): (16, 4, 64, 64, 8, 8),
                            (True, True): (16, 4, 48, 48, 6, 6)}[windowed, odd]
    N = Gh * Gw
    geom = _Geom(N, [Gh, Gw, gh, gw])
    C3 = 3 * H * D
    n_win, gw, _, n_lut = geom.args(torch.device("cpu"))
    P = 4 * 132 // H  # partial-writing programs per head (_programs_per_head)
    gw_log2 = max(0, gw.bit_length() - 1)
    n_rows = _slab_rows(N, Gw)  # global attention's table slab (_table_arg)
    ex = dict(H=H, N=N, D=D, R=geom.R, slab=n_rows * Gw, gw_log2=gw_log2, n_rows=n_rows,
              n_win=n_win, gw=gw, n_lut=n_lut, rel_off=geom.rel_off, nW=geom.nW,
              N_BUCKET=next_power_of_2(N), SPAN_BUCKET=next_power_of_2(n_win),
              # dK/dV's batch shares (_batch_groups) and a sample step past the first two
              per_b=4, step=2, n_groups=8, span_pad=_ds_layout(N, n_win, ((bm, bn),))[0],
              # a dense bias [H, N, N] shared by the batch (none: zero strides)
              stride_bias_b=0, stride_bias_h=N * N * bias, stride_bias_m=N * bias,
              stride_bias_n=int(bias),
              # o over [B, N, H, D] memory (_out_layout), and dO so too: the gradient of the
              # head merge the model does next (a view of the projection's input gradient)
              stride_o_b=N * H * D, stride_o_h=D, stride_o_n=H * D,
              stride_do_b=N * H * D, stride_do_h=D, stride_do_n=H * D,
              # partial-writing programs and the fused kernel's units
              P=P, units=B * geom.nW, groups=geom.nW, group_tokens=n_win,
              per_prog=cdiv(B * geom.nW, P),
              # the table-gradient gather over a head's partial
              n_elems=N * N, n_bins=4 * N, stride_ps_h=N * N,
              # the learnable [R, H] table, row-major
              stride_t_r=H, stride_t_h=1)
    for t in "qkv":
        ex.update({f"stride_{t}_b": N * C3, f"stride_{t}_h": D, f"stride_{t}_n": C3})
    return ex


_AOT_FLAGS = {  # label -> (HAS_TABLE, HAS_BIAS, WINDOWED, STORE_DS)
    "table": (True, False, False, False),
    "table-win": (True, False, True, False),
    "bias": (False, True, False, True),
    "plain": (False, False, False, False),
    "slab": (True, False, False, False),   # the table read through its slabs (_table_arg)
    "plain-win": (False, False, True, False),
}
_KERNEL_NAMES = {  # config kind, "-win" stripped -> kernel
    "fwd": "_tmsa_attention_fwd_kernel", "dkdv": "_tmsa_attention_bwd_kernel_dkdv",
    "dq": "_tmsa_attention_bwd_kernel_dq", "dbias": "_tmsa_attention_bwd_kernel_dbias",
    "window": "_tmsa_attention_bwd_kernel_window"}
_SHAPE_D = {(16, 0): 16, (32, 0): 32, (32, 16): 40, (64, 0): 64, (64, 16): 72, (64, 32): 88,
            (128, 0): 128}  # one head dim per chunk shape (every D in HEAD_DIMS maps to one)


def _kernel_spec(kind: str, dt: str, D: int, flags: str, cfg: tuple, spill_ok: bool = False,
                 odd: bool = False, fits_99kb: bool = True):
    table, bias, windowed, store = _AOT_FLAGS[flags]
    D0, D1, HAS_D1 = _head_split(D)
    bm, bn, w, s = cfg
    c = dict(HAS_TABLE=table, HAS_BIAS=bias, WINDOWED=windowed, D0=D0, D1=D1, HAS_D1=HAS_D1,
             UPCAST=False, PRECISION="ieee")
    base = kind.split("-")[0]
    if base == "window":
        c.update(ACC_DS=table or bias, STORE_DS=store, BLOCK=bm)
    else:
        c.update(BLOCK_M=bm, BLOCK_N=bn)
    if base in ("fwd", "dkdv", "dq"):
        c["SLAB_TAB"] = flags == "slab"
        c["EVEN"] = _even_blocks(_example(D, windowed, odd=odd)["n_win"], bm, bn)
    if base in ("dkdv", "dq", "window"):
        c["PACKED"] = dt != "fp32" and (base != "window" or kind == "window-wide")  # _packs
    if base == "dq":
        c.update(STORE_DS=store)
    if base == "dkdv":
        c.update(ACC_DS=kind.endswith("-acc"))
    if bias:
        c["stride_bias_n"] = 1  # the launcher makes the bias unit-stride: Triton specialises 1
    fn = getattr(_kernels, _KERNEL_NAMES[base])
    acc = "-acc" if kind.endswith("-acc") else ""
    example = _example(D, windowed, bm, bn, bias, odd)
    spec = _spec(fn, dt, c, w, s, f"{dt} D={D} {flags}{acc} {bm}x{bn} w{w} s{s}"
                 + (f" n_win {example['n_win']}" if odd else ""), example=example)
    spec.spill_ok = spill_ok
    spec.fits_99kb = fits_99kb
    # wgmma's tiles: 64 rows per warpgroup; every 16-bit tile with a 64+ side in one or more
    # warpgroups builds HGMMA on sm_90a today (Triton 3.6, 3.8, 3.9)
    spec.hgmma_expected = spec.uses_dot and w >= 4 and max(bm, bn) >= 64
    return spec


def _delta_spec(dt: str, D: int):
    D0, D1, HAS_D1 = _head_split(D)
    return _spec(_kernels._tmsa_attention_bwd_kernel_delta, dt,
                 dict(BLOCK_M=DELTA_BLOCK_M, D0=D0, D1=D1, HAS_D1=HAS_D1), DELTA_WARPS, 1,
                 f"{dt} D={D} {DELTA_BLOCK_M} w{DELTA_WARPS}", dot=False,  # row sums, no dot
                 example=_example(D, False))


def _fits_99kb(kind: str, cfgs: List[tuple], cfg: tuple) -> bool:
    """Whether cfg is the config of its list a 99 KB card (sm_86 / sm_89) relies on, so its
    build must fit (_aot.SMEM_99KB): an autotuned list's last (the tuner, or _first_fit with
    tuning off, passes over candidates that do not fit); the table pass's first (its plan
    "separate" runs untimed; "separate-64" is timed, and one that does not fit counts as
    slowest) and the fused kernel's (never tuned: its first runs); none of the wide plan's
    tiles (a timed plan). Lists run largest tiles first."""
    if kind == "window-wide":
        return False
    return cfg == (cfgs[0] if kind in ("dbias", "window") else cfgs[-1])


def aot_specs():
    """The launch configs the launchers can pick, representative but complete: every config
    of every list at d = 72 and of every per-head-dim list at its own chunk shape, the first
    config of the 16-bit bias-free default lists at every other chunk shape, the fused
    kernel's 16-token tile wherever its list's tile is larger; fp16 beside bf16, and the
    bias-free / windowed variants, at d = 72."""
    specs = []
    for (kind, has_bias, elt), (default, per_shape) in _CONFIG_TABLE.items():
        dt = "bf16" if elt == 2 else "fp32"
        flags = "bias" if has_bias else ("table-win" if kind in (
            "window", "window-wide", "fwd-win", "dkdv-win", "dq-win", "dkdv-win-acc")
            else "table")
        wide = kind == "window-wide"  # a measured plan ("wide"): its tile may spill
        for shape, D in _SHAPE_D.items():
            cfgs = per_shape.get(shape, default)
            if D == 72 or shape in per_shape:
                pick = cfgs
            elif elt == 2 and not has_bias:
                pick = cfgs[:1]
            else:
                continue

            def add(dt_, flags_, cfg, **kw):  # a config of this list (cfgs)
                specs.append(_kernel_spec(kind, dt_, D, flags_, cfg,
                                          fits_99kb=_fits_99kb(kind, cfgs, cfg), **kw))

            for i, cfg in enumerate(pick):
                add(dt, flags, cfg, spill_ok=i > 0 or wide)
                if flags == "table" and D == 72 and elt == 2 and kind in ("fwd", "dkdv", "dkdv-acc",
                                                                          "dq"):
                    # global attention's table through its slabs (_table_arg)
                    add(dt, "slab", cfg, spill_ok=i > 0)
            if kind == "window" and cfgs and cfgs[0][0] > 16:
                specs.append(_kernel_spec(kind, dt, D, flags,
                                          (16, 16) + _fused_launch(16, cfgs[0], elt)))
            if D != 72 or not cfgs:
                continue
            if elt == 2:
                add("fp16", flags, cfgs[0], spill_ok=wide)
            if kind.split("-")[0] in ("fwd", "dkdv", "dq"):
                # the masked variant (EVEN off): an odd grid or window, as the examples are not
                odd_flags = "slab" if elt == 2 and flags == "table" else flags
                add(dt, odd_flags, cfgs[0], odd=True)
            if not has_bias and kind in ("fwd", "dkdv", "dq", "dbias"):
                add(dt, "plain", cfgs[0])
            if not has_bias and kind == "dbias":  # windows past the partials' limit too
                for i, cfg in enumerate(cfgs):
                    add(dt, "table-win", cfg, spill_ok=i > 0)
            if not has_bias and kind == "window":
                add(dt, "table", cfgs[0])
    for dt in ("bf16", "fp32"):
        for D in (72, 128):
            specs.append(_delta_spec(dt, D))
        for bk in (16, 32, 64, TABLE_BLOCK_K):  # the table-gradient gather (see _table_grad)
            specs.append(_spec(_kernels._tmsa_attention_table_grad_kernel, dt,
                               dict(BLOCK_R=TABLE_BLOCK_R, BLOCK_K=bk), 4, 1,
                               f"{dt} table {TABLE_BLOCK_R}x{bk}", dot=False,
                               example=_example(72, False)))
        # global attention's table slabs (_table_arg), from a table in either dtype
        specs.append(_spec(_kernels._tmsa_attention_table_slab_kernel, dt,
                           dict(BLOCK_I=SLAB_BLOCK_I, BLOCK_J=SLAB_BLOCK_J), 4, 1,
                           f"{dt} table -> slab {SLAB_BLOCK_I}x{SLAB_BLOCK_J}", dot=False,
                           example=_example(72, False)))
    unique = {(s.kernel, s.config): s for s in specs}  # fwd and fwd-win lists may share one
    return list(unique.values())


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
