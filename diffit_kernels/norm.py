"""adaln_norm: residual add + LayerNorm (no affine) + per-sample shift/scale/gate + SiLU, fused.

Forward, per row r = (b, n) of C channels, statistics in float32:
    h = residual + gate[b] * x           (with residual; gate optional)     else h = x
    xhat = (h - mean(h)) * rstd,  rstd = 1 / sqrt(var(h) + eps)
    z = xhat * (1 + scale[b]) + shift[b];   y = SiLU(z) if activation == "silu" else z
Backward, with g = dy * SiLU'(z) (or dy) and gx = g * (1 + scale[b]):
    dh = rstd * (gx - mean(gx) - xhat * mean(gx * xhat)) + dh_out      (dh_out: grad of h)
    dresidual = dh,  dx = gate[b] * dh,  dgate[b] = sum_n dh * x
    dshift[b] = sum_n g,  dscale[b] = sum_n g * xhat
The per-sample sums are deterministic: each backward program owns a run of rows of one sample
and writes fp32 partials [B, P, C]; they are summed over P in a fixed order afterwards.
Both kernels walk rows of one sample per program: its [C] modulation vectors are read once,
not per row, and the next row's tensors are loaded before the current row's two reductions
(each a block-wide barrier), so a row's DRAM latency overlaps the previous row's arithmetic
instead of idling the program. How many rows a program takes depends on the card's SM count
(_fwd_rows_per_program, _bwd_rows_per_program); tests set it with _emulate_card.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch

from . import _norm_kernels as _kernels
from . import reference
from ._common import (autotune_enabled, autotuner, autotuner_repeats, call_op, cdiv,
                      check_kernel_dtype, dispatch, empty, interpreting, launch_tuned,
                      next_power_of_2, on_tensor_device, overriding, planned_sms, recordable,
                      resolve_backend, row_warps, unit_last_stride, untuned_while_capturing)

MAX_C = 8192
FWD_MAX_ROWS = 8
FWD_PREFETCH_C = 4096
BWD_BLOCK_C = 2048  # widest row the backward rebuilds in one piece (wider rows spill)
BWD_CHUNK_C = 512  # chunk of wider rows (C > 2048), with BWD_CHUNK_WARPS: 1024 x 8 warps
BWD_CHUNK_WARPS = 8  # spilled under Triton 3.9 for sm_80 at widths that are multiples of 16,
# 512 x 4 under 3.6 at odd widths, 2048-wide chunks under 3.4 / 3.6

try:
    import triton
except ImportError:  # pragma: no cover - triton is a requirement; the torch path still works
    triton = None


# ---------------------------------------------------------------------------------------------
def _row_stride(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _vec_stride(t: Optional[torch.Tensor]) -> int:
    return t.stride(0) if t is not None else 0


# Test hook (library code never sets it): plan launches for a card with this many SMs, also
# under the interpreter, so the CPU tests run the work splits a GPU runs; "pick": launch entry
# `pick` (modulo its length) of each autotune list, never the tuner (None: the first entry
# under the interpreter, the tuner on a GPU).
_CARD = {"sms": None, "pick": None}


@contextlib.contextmanager
def _emulate_card(sms: int, pick: Optional[int] = None):
    with overriding(_CARD, sms=sms, pick=pick):
        yield


def _sms(device: torch.device) -> Optional[int]:
    return planned_sms(device, _CARD["sms"])


def _fwd_rows_per_program(B: int, N: int, sms: Optional[int], wide: bool = False) -> int:
    """Rows per forward program: up to FWD_MAX_ROWS (the modulation vectors are read once per
    program, the row loop prefetches), keeping >= ~16 programs per SM; two on the interpreter
    without a card, so the loop and its prefetch run. WIDE rows: one per program."""
    if wide:
        return 1
    if sms is None:
        return 2
    per_sample = max(1, cdiv(16 * sms, max(B, 1)))
    return max(1, min(FWD_MAX_ROWS, cdiv(N, per_sample)))


def _bwd_rows_per_program(B: int, N: int, sms: Optional[int]) -> int:
    """Rows per backward program: enough programs to fill the card (~4 per SM), but as many
    rows as possible per program so the fp32 partials stay small."""
    if sms is None:
        return max(1, cdiv(N, 2))  # interpreter: two programs per sample exercise the reduction
    target = 4 * sms
    per_sample = max(1, min(N, target // max(B, 1)))
    return max(1, cdiv(N, per_sample))  # N == 0 (empty rows): the launcher divides by it


def _bwd_block(block_c: int) -> int:
    """The backward's BLOCK_C for rows padded to block_c: the whole row, or a chunk of it."""
    return block_c if block_c <= BWD_BLOCK_C else BWD_CHUNK_C


def _bwd_warps(block: int) -> int:
    """The backward keeps ~10 row vectors live: twice the forward's warps to avoid spills."""
    return max(1, min(16, block // 128))


# rows at least this wide get autotune candidates: their programs (>= 4 / 8 warps) fit a few
# times per SM at most, so rows in flight per program decide the bandwidth; narrower rows run
# many small programs per SM
TUNE_MIN_BLOCK = 1024


def candidates(warps: int, tunable: bool) -> List[Tuple[int, int]]:
    """The autotune list (num_warps, AHEAD rows prefetched) of a launch whose plan gives
    `warps`: (warps, 1) first (the interpreter's and the compile gate's spill-free default, so
    no card picks worse), then two and three rows in flight, and half / twice the warps (within
    4..32) with one and two. Measured on the user's card at the first call of each (C, rows per
    program, features) key; `tunable` False keeps the plan's alone. Three rows: at DiffiT's
    C = 1152 one 16-warp backward program fits per SM, and Little's law at an H200's copy rate
    asks ~25-36 KB in flight per SM where a row of its four tensors is 9-14 KB."""
    if not tunable:
        return [(warps, 1)]
    out = [(warps, 1), (warps, 2), (warps, 3)]
    for w in (warps // 2, warps * 2):
        if 4 <= w <= 32 and w != warps:
            out += [(w, 1), (w, 2)]
    return out


def fwd_candidates(C: int, elsize: int = 2) -> List[Tuple[int, int]]:
    """The forward's list for rows of C elements of `elsize` bytes: tuned for 16-bit rows from
    TUNE_MIN_BLOCK up (a float32 row already moves twice the bytes per row in flight), but not
    the WIDE rows (no prefetch there)."""
    block, warps, wide = fwd_plan(C)
    return candidates(warps, elsize == 2 and block >= TUNE_MIN_BLOCK and not wide)


def bwd_candidates(C: int, elsize: int = 2) -> List[Tuple[int, int]]:
    """The backward's list, as fwd_candidates, but never for CHUNKED rows (their partials
    accumulate across chunks: a tuner's repeated launches would add up)."""
    block, chunked, warps = bwd_plan(C)
    return candidates(warps, elsize == 2 and block >= TUNE_MIN_BLOCK and not chunked)


def _launch(kernel, grid: tuple, cfgs: List[Tuple[int, int]], key: List[str], args: tuple,
            kwargs: dict):
    """One candidate (or the interpreter, or DIFFIT_KERNELS_AUTOTUNE=0, or a key not yet tuned
    inside a CUDA graph capture: the first): launch it. Several (CUDA): a cached
    triton.autotune over exactly those (num_warps, AHEAD), keyed on `key`; every output is
    stored once per launch, so the autotuner's repeated launches need no reset."""
    name = kernel.fn.__name__
    tuner_key = (name, tuple(cfgs))
    if len(cfgs) == 1 or interpreting() or _CARD["pick"] is not None or not autotune_enabled() \
            or untuned_while_capturing(tuner_key, kernel, key, args, kwargs):
        warps, ahead = cfgs[(_CARD["pick"] or 0) % len(cfgs)]
        # repeated only where a card tunes: a one-candidate list never is (the chunked
        # backward's, whose partials accumulate across chunks)
        for _ in range(autotuner_repeats(kernel, key, args, kwargs) if len(cfgs) > 1 else 0):
            kernel[grid](*args, **kwargs, AHEAD=ahead, num_warps=warps)
        kernel[grid](*args, **kwargs, AHEAD=ahead, num_warps=warps)
        return
    launch_tuned(tuner_key,
                 lambda: autotuner([triton.Config({"AHEAD": a}, num_warps=w) for w, a in cfgs],
                                   key, kernel),
                 name, "rows", grid, args, kwargs)


def _check_c(C: int) -> int:
    if C > MAX_C:
        raise NotImplementedError(f"adaln_norm's Triton kernel handles C <= {MAX_C} channels in "
                                  f"one row block, got C={C}; use backend='torch'")
    return max(16, next_power_of_2(C))


def fwd_plan(C: int) -> Tuple[int, int, bool]:
    """(BLOCK_C, num_warps, WIDE) of the forward for rows of C channels: WIDE rows (wider than
    FWD_PREFETCH_C) neither prefetch nor keep the modulation vectors (they would spill)."""
    block = _check_c(C)
    return block, row_warps(block), block > FWD_PREFETCH_C


def bwd_plan(C: int) -> Tuple[int, bool, int]:
    """(BLOCK_C, CHUNKED, num_warps) of the backward for rows of C channels."""
    block = _bwd_block(_check_c(C))
    chunked = C > block
    return block, chunked, BWD_CHUNK_WARPS if chunked else _bwd_warps(block)


def plans():
    """{(fwd_plan, bwd_plan): smallest C taking them} over every C the kernels accept: the
    interpreter tests and the compile report walk this, so no plan ships unrun."""
    out = {}
    for C in range(1, MAX_C + 1):
        out.setdefault((fwd_plan(C), bwd_plan(C)), C)
    return out


@on_tensor_device
def _adaln_norm_fwd(x, shift, scale, residual, gate, eps: float, silu: bool):
    B, N, C = x.shape
    BLOCK_C, _, wide = fwd_plan(C)  # the warps: fwd_candidates
    ROWS = _fwd_rows_per_program(B, N, _sms(x.device), wide)
    P = cdiv(N, ROWS)
    y = empty((B, N, C), x.dtype, x.device)
    h = empty((B, N, C), residual.dtype, x.device) if residual is not None else x.new_empty(0)
    mean = empty((B * N,), torch.float32, x.device)
    rstd = empty((B * N,), torch.float32, x.device)
    if B * N:
        dummy = x
        _launch(_kernels._adaln_norm_fwd_kernel, (B * P,), fwd_candidates(C, x.element_size()),
                ["C", "ROWS", "HAS_RES", "HAS_GATE", "HAS_SHIFT", "HAS_SCALE", "SILU"],
                (x, residual if residual is not None else dummy,
                 gate if gate is not None else dummy, shift if shift is not None else dummy,
                 scale if scale is not None else dummy, y, h if residual is not None else dummy,
                 mean, rstd, N, C, ROWS, P, eps, x.stride(0), x.stride(1), *_row_stride(residual),
                 _vec_stride(gate), _vec_stride(shift), _vec_stride(scale)),
                dict(HAS_RES=residual is not None, HAS_GATE=gate is not None,
                     HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, SILU=silu,
                     WIDE=wide, BLOCK_C=BLOCK_C))
    return y, h, mean, rstd


@on_tensor_device
def _adaln_norm_bwd(dy, dh_out, x, shift, scale, residual, gate, mean, rstd, silu: bool):
    B, N, C = x.shape
    block, chunked, _ = bwd_plan(C)  # the warps: bwd_candidates
    dy = unit_last_stride(dy)
    dh_out = unit_last_stride(dh_out) if dh_out is not None else None
    ROWS = _bwd_rows_per_program(B, N, _sms(x.device))
    P = cdiv(N, ROWS)
    dx = empty((B, N, C), x.dtype, x.device)
    dres = empty((B, N, C), residual.dtype, x.device) if residual is not None else None

    def partial(flag):  # chunked rows add into theirs chunk by chunk, whole rows store
        if not flag:
            return None
        if chunked:
            return torch.zeros((B, P, C), dtype=torch.float32, device=x.device)
        return empty((B, P, C), torch.float32, x.device)

    dshift_p, dscale_p, dgate_p = partial(shift is not None), partial(scale is not None), \
        partial(gate is not None)
    dummy = dx
    _launch(_kernels._adaln_norm_bwd_kernel, (B * P,), bwd_candidates(C, x.element_size()),
            ["C", "ROWS", "HAS_RES", "HAS_GATE", "HAS_SHIFT", "HAS_SCALE", "SILU", "HAS_DH_OUT"],
            (dy, dh_out if dh_out is not None else dummy, x,
             residual if residual is not None else dummy, gate if gate is not None else dummy,
             shift if shift is not None else dummy, scale if scale is not None else dummy,
             mean, rstd, dx, dres if dres is not None else dummy,
             dshift_p if dshift_p is not None else mean,
             dscale_p if dscale_p is not None else mean,
             dgate_p if dgate_p is not None else mean,
             N, C, ROWS, P,
             dy.stride(0), dy.stride(1), *_row_stride(dh_out), x.stride(0), x.stride(1),
             *_row_stride(residual), _vec_stride(gate), _vec_stride(shift), _vec_stride(scale)),
            dict(HAS_RES=residual is not None, HAS_GATE=gate is not None,
                 HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, SILU=silu,
                 HAS_DH_OUT=dh_out is not None, CHUNKED=chunked, BLOCK_C=block))

    def reduce(t, like):  # fixed-order sum over the P partials: deterministic
        return t.sum(1).to(like.dtype) if t is not None else None

    return (dx, dres, reduce(dshift_p, shift), reduce(dscale_p, scale),
            reduce(dgate_p, gate))


# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("diffit_kernels::adaln_norm_fwd", mutates_args=())
def _adaln_norm_fwd_op(x: torch.Tensor, shift: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                       gate: Optional[torch.Tensor], eps: float,
                       silu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _adaln_norm_fwd(x, shift, scale, residual, gate, eps, silu)


@_adaln_norm_fwd_op.register_fake
def _(x, shift, scale, residual, gate, eps, silu):
    B, N, C = x.shape
    h = residual.new_empty((B, N, C)) if residual is not None else x.new_empty(0)
    stats = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty((B, N, C)), h, stats, stats.clone()


@torch.library.custom_op("diffit_kernels::adaln_norm_bwd", mutates_args=())
def _adaln_norm_bwd_op(dy: torch.Tensor, dh_out: Optional[torch.Tensor], x: torch.Tensor,
                       shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                       residual: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                       mean: torch.Tensor, rstd: torch.Tensor, silu: bool) -> List[torch.Tensor]:
    outs = _adaln_norm_bwd(dy, dh_out, x, shift, scale, residual, gate, mean, rstd, silu)
    return [t if t is not None else x.new_empty(0) for t in outs]


@_adaln_norm_bwd_op.register_fake
def _(dy, dh_out, x, shift, scale, residual, gate, mean, rstd, silu):
    B, N, C = x.shape

    def vec(t):
        return t.new_empty((B, C)) if t is not None else x.new_empty(0)

    dres = residual.new_empty((B, N, C)) if residual is not None else x.new_empty(0)
    return [x.new_empty((B, N, C)), dres, vec(shift), vec(scale), vec(gate)]


def _setup_context(ctx, inputs, output):
    x, shift, scale, residual, gate, eps, silu = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, residual, gate, mean, rstd)
    ctx.silu = silu
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, dh_out, _dmean, _drstd):
    x, shift, scale, residual, gate, mean, rstd = ctx.saved_tensors
    if residual is None or dh_out is None or dh_out.numel() == 0:
        dh_out = None
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dres, dshift, dscale, dgate = dispatch(
        "adaln_norm_bwd", getattr(ctx, "direct", False), _adaln_norm_bwd_op, _adaln_norm_bwd,
        dy, dh_out, x, shift, scale, residual, gate, mean, rstd, ctx.silu)
    keep = lambda g, t: g if t is not None else None  # noqa: E731
    return (dx, keep(dshift, shift), keep(dscale, scale), keep(dres, residual), keep(dgate, gate),
            None, None)


_adaln_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _AdaLNNormDirect(torch.autograd.Function):
    """Eager calls (see _common.direct_call): the op's implementation and autograd formula
    without the custom op's dispatcher round trips; bitwise the same results."""

    @staticmethod
    def forward(ctx, *args):  # the op's arguments
        out = dispatch("adaln_norm_fwd", True, None, _adaln_norm_fwd, *args)
        _setup_context(ctx, args, out)
        ctx.direct = True
        ctx.set_materialize_grads(False)  # no zero-filled gradients of the statistics per call
        return out

    backward = staticmethod(_backward)


# ---------------------------------------------------------------------------------------------
@recordable("adaln_norm")
def adaln_norm(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    *,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    activation: Optional[str] = None,
    backend: str = "auto",
):
    """Fused residual add + LayerNorm (no affine) + per-sample modulation + optional SiLU.

        h = residual + gate[b] * x  (when residual is given; gate optional)   else h = x
        y = LN(h) * (1 + scale[b]) + shift[b],  then SiLU(y) if activation == "silu"

    Args:
        x: [B, N, C] float32 / float16 / bfloat16; rows may be strided (unit channel stride).
        shift, scale: optional [B, C] per-sample modulation (chunks of one projection are fine).
        residual: optional [B, N, C] residual stream, in x's dtype or, for a 16-bit x, float32
            (autocast's residual stream, read and written as it is: no cast kernels around the
            op); gate: optional [B, C], needs residual. The vectors take x's or residual's dtype.
        eps: LayerNorm epsilon (1e-6 in DiffiT).
        activation: None or "silu".
        backend: "auto" | "triton" | "torch" (see diffit_kernels._common.resolve_backend).
    Returns:
        y [B, N, C] in x's dtype, or (y, h) when residual is given (h: the new residual stream,
        in residual's dtype).
        Gradients flow to x, shift, scale, residual and gate (statistics in float32; the
        per-sample sums of the backward are deterministic).
    """
    reference.check_adaln_inputs(x, shift, scale, residual, gate, eps, activation)  # the spec's
    B, N, C = x.shape
    if resolve_backend(backend, x, shift, scale, residual, gate) == "torch":
        return reference.adaln_norm(x, shift, scale, residual=residual, gate=gate, eps=eps,
                                    activation=activation)
    check_kernel_dtype("x", x)
    _check_c(C)
    x, residual = unit_last_stride(x), unit_last_stride(residual) if residual is not None else None
    shift, scale, gate = (unit_last_stride(t) if t is not None else None for t in (shift, scale, gate))
    y, h, _, _ = call_op("adaln_norm_fwd", _adaln_norm_fwd_op, _adaln_norm_fwd, _AdaLNNormDirect,
                         (x, shift, scale, residual, gate, float(eps), activation == "silu"),
                         (x, shift, scale, residual, gate))
    return (y, h) if residual is not None else y


# ---------------------------------------------------------------------------------------------
def aot_specs():
    """Every launch plan (plans()) with every feature on, the heaviest build, in bf16 and fp32,
    with its 16-bit autotune candidates (fwd_candidates, bwd_candidates) in bf16; fp16 (bf16's
    registers) and the plain variant at the plan edges. Int arguments are an example launch's
    (B 32, N 256 on 132 SMs), typed as the JIT types them: the full builds at a width that is a
    multiple of 16 (every DiffiT width), so rows vectorise as they do on the card; the plain
    and fp16 builds at the odd edge widths (scalar rows)."""
    from ._aot import AotSpec, rows_vectorise

    specs = []
    B, N, SMS = 32, 256, 132
    xl = fwd_plan(1152)[0]
    for dt in ("bf16", "fp16", "fp32"):
        for ((block, warps, wide), (bblock, chunked, bwarps)), C in plans().items():
            # full / plain / (16-bit, DiffiT's widths) a float32 residual stream, full
            variants = [(True, dt), (False, dt)] + (
                [(True, "fp32")] if dt != "fp32" and block == xl else [])
            for full, rt in variants:
                edge = not full or dt == "fp16"
                if edge and rt == dt and C not in (33, 1025, 2049, 4097):
                    continue
                W = C if edge else cdiv(C, 16) * 16  # the example width, inside the plan
                flags = dict(HAS_RES=full, HAS_GATE=full, HAS_SHIFT=full, HAS_SCALE=full,
                             SILU=full)
                label = f"{dt} C{W} " + ("res+gate+mod+silu" if full else "plain") + (
                    " fp32 residual" if rt != dt else "")
                rows_s = (N * W, W) if full else (0, 0)
                vec_s = (6 * W,) * 3 if full else (0, 0, 0)  # chunks of DiffiT's [B, 6C] mod
                rows = _fwd_rows_per_program(B, N, SMS, wide)
                fwd_ints = dict(zip(("N", "C", "ROWS", "P", "stride_x_b", "stride_x_n",
                                     "stride_r_b", "stride_r_n", "stride_g_b", "stride_sh_b",
                                     "stride_sc_b"),
                                    (N, W, rows, cdiv(N, rows), N * W, W, *rows_s, *vec_s)))
                fwd_sig = {"X": f"*{dt}", "RES": f"*{rt}", "GATE": f"*{dt}", "SHIFT": f"*{dt}",
                           "SCALE": f"*{dt}", "Y": f"*{dt}", "H": f"*{rt}", "MEAN": "*fp32",
                           "RSTD": "*fp32", "eps": "fp32"}
                # the autotune candidates after the plan's own (full builds): may spill
                tuned = full and rt == dt and dt == "bf16"  # fp16: bf16's registers
                for w, a in fwd_candidates(C) if tuned else [(warps, 1)]:
                    cand = (w, a) != (warps, 1)
                    specs.append(AotSpec("_adaln_norm_fwd_kernel", _kernels._adaln_norm_fwd_kernel,
                                         fwd_sig, {**flags, "WIDE": wide, "BLOCK_C": block,
                                                   "AHEAD": a}, w, 3,
                                         label + (f" w{w} ahead {a} candidate" if cand else ""),
                                         False, spill_ok=cand, example=fwd_ints,
                                         vector16=rows_vectorise(dt, W)))
                bwd_sig = {"DY": f"*{dt}", "DH_OUT": f"*{rt}", "X": f"*{dt}", "RES": f"*{rt}",
                           "GATE": f"*{dt}", "SHIFT": f"*{dt}", "SCALE": f"*{dt}", "MEAN": "*fp32",
                           "RSTD": "*fp32", "DX": f"*{dt}", "DRES": f"*{rt}", "DSHIFT_P": "*fp32",
                           "DSCALE_P": "*fp32", "DGATE_P": "*fp32"}
                brows = _bwd_rows_per_program(B, N, SMS)
                bwd_ints = {**fwd_ints, "ROWS": brows, "P": cdiv(N, brows), "stride_dy_b": N * W,
                            "stride_dy_n": W, "stride_dh_b": rows_s[0], "stride_dh_n": rows_s[1]}
                for w, a in bwd_candidates(C) if tuned else [(bwarps, 1)]:
                    cand = (w, a) != (bwarps, 1)
                    specs.append(AotSpec("_adaln_norm_bwd_kernel", _kernels._adaln_norm_bwd_kernel,
                                         bwd_sig, {**flags, "HAS_DH_OUT": full, "BLOCK_C": bblock,
                                                   "CHUNKED": chunked, "AHEAD": a}, w, 3,
                                         label + (" chunked" if chunked else "") +
                                         (f" w{w} ahead {a} candidate" if cand else ""),
                                         False, spill_ok=cand, example=bwd_ints,
                                         vector16=rows_vectorise(dt, W)))
    return specs


def check_cases(device: torch.device):
    """Shapes for `python -m diffit_kernels check`: DiffiT's C = 1152 with every feature."""
    from ._check import CheckCase

    def leaves(B, N, C, mod):
        def make():
            g = {"x": torch.randn(B, N, C, device=device),
                 "res": torch.randn(B, N, C, device=device)}
            if mod:
                g["mod"] = torch.randn(B, 3 * C, device=device) * 0.5
            return g
        return make

    def build_full(C):
        def build(t):
            shift, scale, gate = t["mod"].chunk(3, dim=1)  # strided views of one projection
            return dict(x=t["x"], shift=shift, scale=scale, residual=t["res"], gate=gate,
                        activation="silu")
        return build

    return [
        CheckCase("adaln_norm", "B2 N7 C1152 res+gate+shift+scale+silu", adaln_norm,
                  reference.adaln_norm, leaves(2, 7, 1152, True), build_full(1152),
                  ("y", "h"), ("x", "res", "mod")),
        CheckCase("adaln_norm", "B3 N5 C200 plain LN", adaln_norm, reference.adaln_norm,
                  leaves(3, 5, 200, False), lambda t: dict(x=t["x"]), ("y",), ("x",)),
    ]
