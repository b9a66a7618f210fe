"""tmsa_attention's launch configs and how they launch (the op and its docstring: attention.py).

The head dim's split into power-of-two chunks; the card's candidate list of each kernel (per
kernel kind, dense bias, element size and head-dim chunks), chosen offline by the compile gate;
the work splits sized from a whole list (the fused kernel's packed span, the dK/dV partials'
layout, programs and batch shares per head); and one launch of a list: one config, or with
autotuning off the first the card can load, or a cached autotuner over exactly that list.
Under the interpreter one config, or a card's own lists under _emulate_card (the tests).
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Tuple

import torch

from . import _attention_kernels as _kernels
from . import _common
from ._common import (autotune_enabled, autotuner, autotuner_repeats, cdiv, interpreting,
                      launch_tuned, next_power_of_2, overriding, planned_sms,
                      untuned_while_capturing)

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
    programs per SM (each share's partial is reduced afterwards); two under the interpreter.
    A share per z of the launch grid: at most GRID_YZ_MAX."""
    sms = _sms(device)
    want = 2 if sms is None else cdiv(4 * sms, programs)
    return max(1, min(B, want, _common.GRID_YZ_MAX))


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
    # d 128: 16x32 w8 (16x16 w8, as many scores a thread, spilled 8 bytes with the table on
    # sm_90a under Triton 3.9, read from the shipped cubin)
    ("dq", False, 4): (
        [(16, 16, 2, 1)],
        {(32, 16): [(16, 16, 8, 1)], (64, 16): [(16, 16, 4, 1)], (128, 0): [(16, 32, 8, 1)]}),
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
                 kwargs: dict, one, tuner_key, tuned):
    """A candidate list launched as a card launches it: one config by one(config) (its key's
    first launch repeated where testing.autotuner_repeats asks); several with autotuning off,
    or a key not yet tuned inside a CUDA graph capture (untuned_while_capturing), the first
    the card can load (_first_fit); else tuned(), the cached autotuner _TUNERS[tuner_key]
    (CUDA)."""
    if len(configs) == 1:
        for _ in range(autotuner_repeats(kernel, keys, args, kwargs)):
            one(configs[0])
        return one(configs[0])
    if not autotune_enabled() or untuned_while_capturing(tuner_key, kernel, keys, args, kwargs):
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
        return autotuner(cfgs, keys, inner)

    name = kernel.fn.__name__
    tuner_key = (name, kind, tuple(configs), flags)

    def tuned():
        tuner = launch_tuned(tuner_key, build, name, kind,
                             lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"]), args,
                             kwargs)
        best = tuner.best_config.kwargs
        return best["BLOCK_M"], best["BLOCK_N"]

    return _launch_list(kernel, kind, configs, keys, args, kwargs,
                        lambda cfg: _launch_one(kernel, kind, cfg, grid_of, args, kwargs),
                        tuner_key, tuned)


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
    name = kernel.fn.__name__
    tuner_key = (name, "window-wide", tuple(configs))

    def tuned():
        launch_tuned(tuner_key,
                     lambda: autotuner([triton.Config({}, num_warps=w, num_stages=st)
                                        for _, _, w, st in configs], keys, kernel),
                     name, "window-wide", grid, args, kwargs)

    _launch_list(kernel, "window-wide", configs, keys, args, kwargs, one, tuner_key, tuned)
