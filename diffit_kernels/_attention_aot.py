"""tmsa_attention's configs for the compile gate (_aot): every config its launchers can
pick, built with the int arguments of an example launch, as Triton's JIT types them.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from . import _attention_kernels as _kernels
from ._attention_index import _Geom
from ._attention_launch import (DELTA_BLOCK_M, DELTA_WARPS, _CONFIG_TABLE, _ds_layout,
                                _even_blocks, _fused_launch, _head_split)
from ._common import cdiv, next_power_of_2
from .attention import SLAB_BLOCK_I, SLAB_BLOCK_J, TABLE_BLOCK_K, TABLE_BLOCK_R, _slab_rows

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
    # warpgroups builds HGMMA on sm_90a today (Triton 3.6, 3.8, 3.9), and tcgen05 MMAs on
    # sm_100a (the same tiles exactly, Triton 3.9: the others build HMMA there)
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
