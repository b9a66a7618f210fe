"""tmsa_attention's backward plans, and the card's timed choice between them.

Spans past the fused kernel's packed tiles have several exact, deterministic ways through the
backward, and which is fastest depends on the shape and the card (the H200 at ec83eac: the
table gradient summed in the dK/dV pass took 1.6x the time of a pass of its own at
latent256-B64, and 0.85x at latent512-B8):
  "shares"    delta, dK/dV summing dS into the fp32 table partials of a few batch shares
              (read-modify-written, one launch per sample of a share), dQ
  "samples"   the same with one share per sample: one dK/dV launch that only stores its
              partials, B / shares times more bytes of them (up to SAMPLES_MAX_BYTES)
  "separate"  delta, dK/dV, dQ, and the table's (or a dense bias's) gradient, where asked,
              in a pass of its own that recomputes P and dP: the only way past
              _DS_MAX_ELEMENTS, for a dense bias, and where no table gradient is asked
  "separate-64" the same with the table's pass on the second tile of its config list where
              one is listed (d 72: 64x64, HGMMA on sm_90a, for the first's 32x32)
  "wide"      16-bit windows of FUSED_MAX_SPAN + 1 to WIDE_SPAN tokens: the fused kernel at
              one window per 64-wide tile
("fused": spans of at most _packed_span tokens, the fused kernel's packed tiles, the only
plan there.) On CUDA the first backward of each shape times every plan it can take and keeps
the fastest for the process (_choose_plan), as the kernels' autotuners keep configs; on
other devices, under the interpreter and while a CUDA graph is being captured, the first
plan of _bwd_plans' list (what ran before plans were measured), as with
DIFFIT_KERNELS_AUTOTUNE=0 (_common.AUTOTUNE). BWD_PLAN forces one plan
wherever it is among a shape's plans (the benchmark's A/B rows, the tests).
_choose_plan also times the forward's two table reads (attention._reads_slabs).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence

import torch

from . import _common
from ._attention_index import _Geom
from ._attention_launch import (WIDE_SPAN, _batch_groups, _card_list, _ds_layout, _head_split,
                                _packed_span, _resource_errors, _wide_configs)
from ._common import autotune_enabled, cdiv, cuda_capturing, interpreting, record_choice

try:
    import triton
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None

# The backward plan "samples" (one batch share per sample: a single dK/dV launch whose fp32
# table partials are only stored) is offered while the partials of all samples take at most
# this many bytes; "shares" read-modify-writes the few L2-sized shares of _batch_groups instead,
# one launch per sample of a share (per query tile a load, two layout conversions through
# shared memory, and +26% SASS instructions in the loop at d 72, sm_90a, Triton 3.9).
SAMPLES_MAX_BYTES = 512 << 20
# the dK/dV kernel sums dS into the table when its partial of one head and batch group has at
# most this many elements (N <= 2048 global); larger spans take the separate dbias pass
_DS_MAX_ELEMENTS = 1 << 22
BWD_PLAN: Optional[str] = None  # forces a plan (see above)
PLAN_TUNING = True              # False: the first plan, untimed, as off CUDA
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
            # (a share per sample puts B programs on the dK/dV grid's z axis)
            if _share_size(device, B, H, N, cfgs) > 1 and B <= _common.GRID_YZ_MAX \
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
            and not cuda_capturing())


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
