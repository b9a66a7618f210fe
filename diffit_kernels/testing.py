"""Parity machinery shared by the tests and `python -m diffit_kernels check`.

The numerics rule (DESIGN.md section 5, FlashAttention's): for fp16/bf16, with `ref` the
reference in float32 on the same (rounded) inputs, `pt` the reference in the low precision and
`out` the kernel,

    max|out - ref| <= k * max|pt - ref| + k * max|(ref + 0.3 - 0.3) - ref|     (k = 2; 3 for grads)

where the second term is the rounding of the low-precision dtype near the data. For float32,
`ref` is the reference in float64 and the bound tight (FP32_RTOL of the tensor's scale: no
TF32), or k times eager float32's own error where that is larger: where the reference itself
is ill-conditioned in float32 (a LayerNorm over one channel, whose rstd = 1 / sqrt(eps)
amplifies the cancellation in eager's backward to ~1e-4), the kernel is held to eager's
accuracy, not to eager's rounding. Outputs are NaN-filled before every kernel call
(`nan_fill`). Under the interpreter, `interpreter_guard` makes fail what a card would get wrong
and the interpreter would not (out-of-bounds and undefined lanes, races, false compiler hints),
and `autotuner_repeats` repeats launches as a card's autotuner does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import _common
from ._common import overriding

FP32_RTOL = 2e-5  # relative to max|ref| of the tensor: summation order only, no TF32


@dataclasses.dataclass
class ParityRow:
    name: str          # "y", "dx", "d_table", ...
    dtype: str
    err: float         # max|out - ref|
    bound: float       # what the rule allows
    pt_err: float      # max|pt - ref| (eager PyTorch in the same dtype)

    @property
    def ok(self) -> bool:
        return self.err == self.err and self.err <= self.bound  # NaN fails


def rule_bound(ref: torch.Tensor, pt: torch.Tensor, dtype: torch.dtype, factor: float) -> float:
    """The FlashAttention bound for one tensor (see the module docstring)."""
    if ref.numel() == 0:
        return 0.0
    pt_err = max_err(pt, ref)
    if dtype == torch.float32:
        return max(FP32_RTOL * max(1.0, ref.abs().max().item()), factor * pt_err)
    ref = ref.float()
    rounding = ((ref.to(dtype) + 0.3 - 0.3).float() - ref).abs().max().item()
    return factor * pt_err + factor * rounding


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    wide = torch.float64 if torch.float64 in (out.dtype, ref.dtype) else torch.float32
    d = (out.to(wide) - ref.to(wide)).abs()
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item()


@contextlib.contextmanager
def nan_fill(enabled: bool = True):
    """Launchers NaN-fill every output they allocate while this is active."""
    old = _common._NAN_FILL
    _common._NAN_FILL = enabled
    try:
        yield
    finally:
        _common._NAN_FILL = old


def _flatten(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def parity(
    op: Callable,
    ref_op: Callable,
    leaves: Dict[str, torch.Tensor],
    build: Callable[[Dict[str, torch.Tensor]], dict],
    *,
    dtype: torch.dtype,
    out_names: Sequence[str],
    grad_leaves: Sequence[str] = (),
    op_kwargs: Optional[dict] = None,
    seed: int = 0,
    keep_fp32: Sequence[str] = (),
) -> List[ParityRow]:
    """Compare `op` with `ref_op` on the same inputs, outputs and gradients.

    leaves: float32 tensors (fresh random values) that become the inputs after a cast to
        `dtype`; build(leaves) -> the keyword arguments of the call, so inputs may be strided
        views of a leaf (q, k, v sliced from one packed buffer, shift/scale chunks).
    grad_leaves: names of the leaves whose gradients are compared (as "d<name>").
    op_kwargs: extra keywords only `op` takes (backend="triton", deterministic=...).
    keep_fp32: leaves that stay float32 in every run (mixed precision: autocast's float32
        residual stream next to 16-bit activations).
    """
    op_kwargs = op_kwargs or {}

    def run(fn, cast, extra):
        ls = {k: v.detach().to(torch.float32 if k in keep_fp32 else cast)
              .requires_grad_(k in grad_leaves) for k, v in rounded.items()}
        with nan_fill():
            outs = _flatten(fn(**build(ls), **extra))
        return ls, outs

    # the inputs every provider sees: the float32 leaves rounded to `dtype`
    rounded = {k: v.to(dtype) if v.is_floating_point() and k not in keep_fp32 else v
               for k, v in leaves.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    l_out, outs = run(op, dtype, op_kwargs)
    # the truth: float32 for 16-bit runs (the rule's), float64 for float32 ones
    l_ref, refs = run(ref_op, torch.float64 if dtype == torch.float32 else torch.float32, {})
    l_pt, pts = run(ref_op, dtype, {})
    if len(outs) != len(out_names):
        raise AssertionError(f"op returned {len(outs)} outputs, expected {out_names}")
    dys = [torch.randn(r.shape, generator=gen).to(r.device) for r in refs]
    rows = [ParityRow(n, str(dtype).split(".")[-1], max_err(o, r), rule_bound(r, p, dtype, 2.0),
                      max_err(p, r)) for n, o, r, p in zip(out_names, outs, refs, pts)]
    if grad_leaves:
        def grads(ls, os_):
            want = [ls[g] for g in grad_leaves]
            pairs = [(o, dy.to(o.dtype)) for o, dy in zip(os_, dys) if o.requires_grad]
            gs = torch.autograd.grad([o for o, _ in pairs], want, [d for _, d in pairs],
                                     allow_unused=True)
            return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, want)]

        g_out = grads(l_out, outs)
        g_ref = grads(l_ref, refs)
        g_pt = grads(l_pt, pts)
        for name, o, r, p in zip(grad_leaves, g_out, g_ref, g_pt):
            rows.append(ParityRow("d" + name, str(dtype).split(".")[-1], max_err(o, r),
                                  rule_bound(r, p, dtype, 3.0), max_err(p, r)))
    return rows


def model_rows(dtype: torch.dtype, out: tuple, ref: tuple, pt: tuple) -> List[ParityRow]:
    """The rule for a whole model: each argument is (output, {parameter name: gradient}) of one
    run (out: the kernels in `dtype`, ref: eager float32, pt: eager in `dtype`, all from the same
    weights and inputs). The output gets the 2x bound, every parameter gradient the 3x one."""
    (o, g_out), (r, g_ref), (p, g_pt) = out, ref, pt
    if set(g_out) != set(g_ref):
        raise AssertionError(f"gradients differ in which parameters they reach: "
                             f"{sorted(set(g_out) ^ set(g_ref))}")
    dt = str(dtype).split(".")[-1]
    rows = [ParityRow("out", dt, max_err(o, r), rule_bound(r, p, dtype, 2.0), max_err(p, r))]
    for name in g_ref:
        rows.append(ParityRow("d" + name, dt, max_err(g_out[name], g_ref[name]),
                              rule_bound(g_ref[name], g_pt[name], dtype, 3.0),
                              max_err(g_pt[name], g_ref[name])))
    return rows


def assert_parity(rows: Sequence[ParityRow]) -> None:
    bad = [r for r in rows if not r.ok]
    if bad:
        lines = [f"{r.name} ({r.dtype}): max err {r.err:.3e} > bound {r.bound:.3e} "
                 f"(eager {r.dtype} err {r.pt_err:.3e})" for r in bad]
        raise AssertionError("parity with the reference failed:\n  " + "\n  ".join(lines))


# ---- a model's own calls ----------------------------------------------------------------------
# output names of the public ops, in the order they return them
_OUT_NAMES = {"tmsa_attention": ("o",), "time_qkv": ("q", "k", "v"), "adaln_norm": ("y", "h")}
_OP_ONLY = ("backend", "deterministic")  # arguments the reference does not take


@dataclasses.dataclass
class OpCall:
    """One recorded call of a public op (record_calls)."""
    op: str                            # public op name
    fn: Callable                       # the op itself
    tensors: Dict[str, torch.Tensor]   # copies of its tensor arguments, with the call's strides
    others: Dict[str, object]          # its other arguments (None tensors and backend included)
    grads: Tuple[str, ...]             # the floating tensor arguments that required grad
    outputs: int                       # how many tensors it returned

    def label(self) -> str:
        """The call as a log names it: tensors by shape, dtype and strides where not
        contiguous, then the other arguments that shape the work."""
        def one(name, t):
            dt = str(t.dtype).split(".")[-1]
            st = "" if t.is_contiguous() else f" strides {tuple(t.stride())}"
            return f"{name} {list(t.shape)} {dt}{st}"
        rest = [f"{k}={v}" for k, v in self.others.items()
                if v is not None and k not in _OP_ONLY and not isinstance(v, torch.Tensor)]
        return ", ".join([one(n, t) for n, t in self.tensors.items()] + rest)


def _copy_strided(t: torch.Tensor, like: Sequence[int]) -> torch.Tensor:
    """t's values in a new tensor with strides `like` (a view's gaps included; a dim of stride
    0, a broadcast, holds t's first entry along it), differentiable: a model hands the ops
    views of packed buffers, and the kernels take their paths by strides."""
    src = t
    for d, (n, st) in enumerate(zip(t.shape, like)):
        if st == 0 and n > 1:
            src = src.narrow(d, 0, 1)
    out = torch.empty_strided(src.shape, tuple(like), dtype=t.dtype, device=t.device)
    return out.copy_(src).expand(t.shape)


@contextlib.contextmanager
def record_calls() -> Iterator[List[OpCall]]:
    """Collect the public ops' distinct eager calls while active: the first call of each
    (op, tensor shapes, strides, dtypes and requires_grad, other arguments), with copies of its
    inputs taken as it returns. Calls traced by torch.compile are not seen."""
    calls: List[OpCall] = []
    seen = set()

    def record(name, fn, args, kwargs, out):
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        key = [name]
        for k, v in bound.arguments.items():
            key.append((k, (tuple(v.shape), v.stride(), v.dtype, v.requires_grad)
                        if isinstance(v, torch.Tensor) else repr(v)))
        if tuple(key) in seen:
            return
        seen.add(tuple(key))
        tensors = {k: _copy_strided(v.detach(), v.stride()) for k, v in bound.arguments.items()
                   if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
        grads = tuple(k for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)
                      and v.is_floating_point() and v.requires_grad)
        calls.append(OpCall(name, fn, tensors, others, grads, len(_flatten(out))))

    old, _common._CALL_RECORDER = _common._CALL_RECORDER, record
    try:
        yield calls
    finally:
        _common._CALL_RECORDER = old


@contextlib.contextmanager
def module_setting(module, name: str, value):
    """module.name = value for the with-block, then the old value back (the kernel check's
    forced attention variants; the benchmarks' A/B rows)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def check_call(call: OpCall, seed: int = 0, every_variant: bool = False) -> List[ParityRow]:
    """The numerics rule on a recorded call's own inputs, layouts and arguments: the op as it
    was called, against the reference in float32 (float64 for a float32 call) and in the
    call's precision (its lowest floating dtype; float32 tensors of a 16-bit call stay float32,
    as autocast's residual stream and float32 tables do), every output and, where the call
    needed them, the gradients of its inputs for fresh random output gradients. every_variant:
    an attention call once per (table read, backward plan) it can take on its device (a card
    times them and may pick any; attention.call_variants), each row's name followed by them; a
    variant other than the first that the card cannot build or fit is skipped, as its timed
    choice skips it."""
    if every_variant and call.op == "tmsa_attention" and _common.resolve_backend(
            call.others.get("backend"), call.tensors["q"]) == "triton":
        from . import _attention_plans, attention

        t = call.tensors
        pairs = attention.call_variants(
            t["q"], t["k"], t["v"], table=t.get("table"), grid=call.others.get("grid"),
            window=call.others.get("window"), bias=t.get("bias"), backward=bool(call.grads),
            table_grad="table" in call.grads)
        unfit = _attention_plans._misfits() + _attention_plans._compile_errors()
        rows = []
        for read, plan in pairs:
            try:
                with module_setting(attention, "TABLE_READ", read), \
                        module_setting(_attention_plans, "BWD_PLAN", plan):
                    got = check_call(call, seed)
            except unfit:
                if read == pairs[0][0] and plan == pairs[0][1]:
                    raise  # what runs untimed: its error is the op's
                continue  # a variant the card cannot build or fit: its choice skips it too
            what = ", ".join(x for x in (read and f"read {read}", plan and f"plan {plan}") if x)
            rows += [dataclasses.replace(r, name=f"{r.name} [{what}]") if what else r
                     for r in got]
        return rows
    from . import reference

    floats = {k: t for k, t in call.tensors.items() if t.is_floating_point()}
    fixed = {k: t for k, t in call.tensors.items() if not t.is_floating_point()}
    dtype = min((t.dtype for t in floats.values()), key=lambda d: torch.finfo(d).bits,
                default=torch.float32)
    keep = [k for k, t in floats.items() if t.dtype == torch.float32]
    strides = {k: t.stride() for k, t in floats.items()}
    consts = {k: v for k, v in call.others.items() if k not in _OP_ONLY}

    def build(ls):
        return {**consts, **fixed, **{k: _copy_strided(v, strides[k]) for k, v in ls.items()}}

    names = _OUT_NAMES.get(call.op, ())
    if len(names) < call.outputs:
        names = tuple(f"out{i}" for i in range(call.outputs))
    return parity(call.fn, getattr(reference, call.op),
                  {k: t.float() for k, t in floats.items()}, build, dtype=dtype,
                  out_names=names[:call.outputs], grad_leaves=call.grads,
                  op_kwargs={k: call.others[k] for k in _OP_ONLY if k in call.others},
                  seed=seed, keep_fp32=keep if dtype != torch.float32 else ())


# ---- CUDA graphs ------------------------------------------------------------------------------
@contextlib.contextmanager
def _autotune_off():
    """DIFFIT_KERNELS_AUTOTUNE=0 for the with-block (the variable is read at import)."""
    old, _common.AUTOTUNE = _common.AUTOTUNE, False
    try:
        yield
    finally:
        _common.AUTOTUNE = old


def untuned_capture(step: Callable, args: tuple, warmup_args: tuple) -> Tuple[tuple, tuple]:
    """(the replay's outputs, an eager call's) of step(*args) captured in a CUDA graph with no
    autotune key tuned (CUDA). First step(*warmup_args) on a side stream with autotuning off:
    the warm-up torch's CUDA-graph docs ask for, which must launch every kernel the capture
    will (Triton loads a kernel onto the card at its first launch, which a capture forbids)
    and here tunes nothing. The capture then runs each list's first config, as does the eager
    call, made with autotuning off after one replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), _autotune_off():
        step(*warmup_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*args)
    graph.replay()
    torch.cuda.synchronize()
    with _autotune_off():
        return out, step(*args)


# ---- a card's compile path without a card ------------------------------------------------------
class _CompileOnlyDriver:
    """What Triton's JIT asks its driver before it compiles: the target, device and stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def triton_path_anywhere():
    """The ops take their Triton path whatever their tensors' device (their resolve_backend
    says "triton"): for CPU tensors whose launches run nothing (compile_only_card,
    benchmarks.host_ops)."""
    from . import attention, norm, projection

    saved = [(m, m.resolve_backend) for m in (attention, norm, projection)]
    for m, _ in saved:
        m.resolve_backend = lambda backend, *tensors: "triton"
    try:
        yield
    finally:
        for m, resolve in saved:
            m.resolve_backend = resolve


@contextlib.contextmanager
def compile_only_card(arch: int = 90, sms: int = 132):
    """A card's launch path with nothing run (a process without TRITON_INTERPRET): the ops take
    their Triton path on CPU tensors with the CUDA candidate lists and the work splits of a
    `sms`-SM card, and each launch compiles its kernel for sm_<arch> into the kernel's JIT
    cache, as on a card, and returns (outputs stay unwritten). An autotuned launch of a new key
    runs the autotuner's prune hooks and looks each candidate up in that cache as Triton's
    autotuner does before timing it (compiling what is missing), and takes the first. Yields
    the record: "tuned", a list of (kernel, candidates, compiled at the look-up); "kernels",
    {(kernel, its JIT cache key): the SHA-1 of its cubin} of every kernel compiled;
    "launches", (kernel, grid, shared memory bytes) of every launch."""
    if _common.interpreting():
        raise RuntimeError("compile_only_card compiles for a card: it needs a process without "
                           "TRITON_INTERPRET=1")
    from triton.runtime import autotuner, jit
    from triton.runtime.driver import driver

    from . import _attention_launch, norm

    record = {"tuned": [], "kernels": {}, "launches": []}
    touched: set = set()
    jit_run, tuner_run = jit.JITFunction.run, autotuner.Autotuner.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        touched.add(self)
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            record["launches"].append((self.fn.__name__,
                                       tuple(grid(named) if callable(grid) else grid),
                                       int(getattr(kernel.metadata, "shared", 0) or 0)))
        return kernel

    def look_up(self, *args, **kwargs):
        named = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        key = _common._tuning_key(self, self.keys, args, named)
        if key not in self.cache:
            # as Triton's Autotuner.run: the prune hooks (ours precompile), then each candidate
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs)
            cache = _common.jit_function(self).device_caches[0][0]
            before = len(cache)
            for cfg in configs:
                self.fn.run(*args, **dict(kwargs, warmup=True), **cfg.all_kwargs())
            record["tuned"].append((self.base_fn.__name__, len(configs), len(cache) - before))
            self.cache[key] = configs[0]
        self.best_config = self.cache[key]
        return self.fn.run(*args, **kwargs, **self.best_config.all_kwargs())

    tuners, tuned = dict(_common._TUNERS), len(_common._TUNED)
    drivers = dict(vars(driver))  # reset_active() would make the default driver: no CUDA here
    driver.set_active(_CompileOnlyDriver(arch))
    jit.JITFunction.run, autotuner.Autotuner.run = compile_only, look_up
    try:
        with triton_path_anywhere(), _attention_launch._emulate_card(sms), \
                norm._emulate_card(sms):
            yield record
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = jit_run, tuner_run
        vars(driver).update(drivers)
        for fn in touched:  # kernels built for the pretend card stay out of a later real one's
            for key, kernel in fn.device_caches[0][0].items():
                try:
                    cubin = kernel.asm["cubin"]
                except Exception:  # a candidate that failed to compile (Triton 3.8+ keeps it)
                    continue
                record["kernels"][fn.fn.__name__, key] = hashlib.sha1(cubin).hexdigest()
            fn.device_caches.clear()
        _common._TUNERS.clear()
        _common._TUNERS.update(tuners)
        del _common._TUNED[tuned:]


# ---- interpreter readiness ------------------------------------------------------------------
def interpreter_problem() -> Optional[str]:
    """None when this Triton's interpreter runs a loop with tensor bounds (every backward
    kernel has one), else why not. Triton 3.4-3.6 take int() of a one-element array there,
    which NumPy >= 2.4 refuses: every such kernel would fail with an opaque TypeError."""
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(OUT, N):
        for i in range(tl.program_id(0), N):
            tl.store(OUT + i, i)

    out = torch.zeros(3, dtype=torch.int32)
    try:
        _probe[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps the cause in its own error type
        return (f"the Triton {triton.__version__} interpreter cannot run these kernels with "
                f"NumPy {np.__version__} ({type(e).__name__}: {str(e)[:120]}); install "
                f"'numpy<2.4' or Triton >= 3.7")
    if out.tolist() != [0, 1, 2]:
        return (f"the Triton {triton.__version__} interpreter ran a probe loop wrongly: "
                f"{out.tolist()}")
    return None


# ---- the autotuner's repeated launches ---------------------------------------------------------
@contextlib.contextmanager
def autotuner_repeats():
    """Run the first launch of each autotune key twice, as a card's autotuner runs it many
    times before its own launch (see _common.autotuner_repeats): a kernel whose result depends
    on how often it ran then fails its parity check here instead of on a card. Keys are
    remembered for the process, as the autotuner's cache is."""
    with overriding(_common._REPEATS, seen=_TUNED_KEYS):
        yield


_TUNED_KEYS: set = set()


# ---- interpreter guard ------------------------------------------------------------------------
class OutOfBoundsAccess(AssertionError):
    pass


class RaceBetweenPrograms(AssertionError):
    pass


class FalseHint(AssertionError):
    pass


class GridTooLarge(AssertionError):
    pass


HINTS = ("tt.divisibility", "tt.contiguity")   # the hints hint_problem checks


def hint_problem(values, key: str, claims: Sequence[int]) -> Optional[str]:
    """Why the compiler hint `key` ("tt.divisibility" from tl.multiple_of, "tt.contiguity"
    from tl.max_contiguous) with one claim per dim is false for these values, or None. The
    compiler vectorises memory accesses on these claims without checking them, so a false one
    loads or stores the wrong elements on a card; the interpreter ignores hints.
    multiple_of: along each dim, the first element of every contiguous group is a multiple of
    the claim; each maximal run of consecutive values starts such a group, so its first value
    must be one (a weaker test than the compiler's own groups need, never a stricter one).
    max_contiguous: along each dim, every aligned group of the claim's length (at most the
    dim's) holds consecutive values."""
    import numpy as np

    x = np.asarray(values)
    x = x.reshape(1) if x.ndim == 0 else x
    for d, claim in enumerate(claims):
        if claim <= 1:
            continue
        xd = np.moveaxis(x, d, -1).astype(np.int64)
        if key == "tt.divisibility":
            start = np.ones(xd.shape, dtype=bool)
            start[..., 1:] = xd[..., 1:] - xd[..., :-1] != 1
            bad = start & (xd % claim != 0)
            if bad.any():
                return (f"tl.multiple_of claims {claim} along dim {d}, but {int(xd[bad][0])} "
                        f"starts a run of consecutive values")
        elif key == "tt.contiguity":
            n = xd.shape[-1]
            c = min(claim, n)
            if n % c:
                return f"tl.max_contiguous claims {claim} along dim {d} of length {n}"
            groups = xd.reshape(*xd.shape[:-1], n // c, c)
            if not (np.diff(groups, axis=-1) == 1).all():
                return (f"tl.max_contiguous claims runs of {claim} consecutive values along "
                        f"dim {d}, which the values do not hold")
    return None


def _expand(records: list, grain: int):
    """(addresses, program ids) of every `grain`-byte unit the recorded accesses touch."""
    import numpy as np

    addrs, pids = [], []
    for addr, width, pid in records:
        units = addr[:, None] + np.arange(0, width, grain, dtype=np.uint64)[None, :]
        addrs.append(units.ravel())
        pids.append(np.full(units.size, pid, dtype=np.int64))
    return np.concatenate(addrs), np.concatenate(pids)


def races(loads: list, stores: list) -> Optional[str]:
    """Why the accesses of one launch race on a GPU, or None. Records are (live lanes' start
    addresses, element bytes, program index). A GPU runs a launch's programs in any order and
    at once, with nothing ordering one program's global memory accesses against another's
    (the kernels use no atomics), so a unit of memory written by one program must be neither
    written nor read by any other in the same launch. The interpreter runs programs one after
    another, where such a kernel computes the right numbers anyway."""
    import numpy as np

    if not stores:
        return None
    grain = min(w for _, w, _ in loads + stores)
    wa, wp = _expand(stores, grain)
    order = np.lexsort((wp, wa))
    wa, wp = wa[order], wp[order]
    clash = (wa[1:] == wa[:-1]) & (wp[1:] != wp[:-1])
    if clash.any():
        i = int(np.argmax(clash))
        return (f"programs {int(wp[i])} and {int(wp[i + 1])} both store to {int(wa[i]):#x} "
                f"({int(clash.sum())} units written by more than one program)")
    if not loads:
        return None
    first = np.concatenate(([True], wa[1:] != wa[:-1]))
    written, writer = wa[first], wp[first]
    ra, rp = _expand(loads, grain)
    pos = np.minimum(np.searchsorted(written, ra), written.size - 1)
    bad = (written[pos] == ra) & (writer[pos] != rp)
    if bad.any():
        i = int(np.argmax(bad))
        return (f"program {int(rp[i])} loads {int(ra[i]):#x}, which program "
                f"{int(writer[pos[i]])} of the same launch stores ({int(bad.sum())} such units)")
    return None


def lanes_disagree(ptrs, values, mask) -> Optional[str]:
    """Why one store's enabled lanes race among themselves, or None: two lanes storing different
    values to one address leave either on a card (the interpreter keeps the last)."""
    import numpy as np

    addr = np.asarray(ptrs)
    m = np.broadcast_to(np.asarray(mask).astype(bool), addr.shape)
    live = addr[m]
    if live.size < 2:
        return None
    order = np.argsort(live, kind="stable")
    a = live[order]
    dup = a[1:] == a[:-1]
    if not dup.any():
        return None
    v = np.broadcast_to(np.asarray(values), addr.shape)[m][order]
    differ = dup & ~((v[1:] == v[:-1]) | ((v[1:] != v[1:]) & (v[:-1] != v[:-1])))
    if differ.any():
        return (f"one store writes different values to {int(a[1:][differ][0]):#x} from two "
                f"lanes ({int(differ.sum())} such pairs)")
    return None


def reload_problem(stored: list, lanes, addrs, shape) -> Optional[str]:
    """Why a program's load reads what the same program stored since its last barrier through
    another thread, or None. The load: a pointer tile of `shape`, its enabled lanes (flat
    indices) `lanes` at addresses `addrs`; `stored`: (lanes, addresses, shape) of each store.
    A card holds a tile's lanes in different threads, and only a barrier (tl.debug_barrier)
    orders one thread's store before another's load; the same lane of a tile of the same shape
    is the same thread (one layout per pointer tile), the one case that needs none."""
    import numpy as np

    for s_lanes, s_addrs, s_shape in stored:
        hit = np.isin(addrs, s_addrs)
        if not hit.any():
            continue
        if tuple(s_shape) != tuple(shape):
            return (f"a program loads, as a {list(shape)} tile, what it stored as a "
                    f"{list(s_shape)} tile, with no barrier between")
        order = np.argsort(s_addrs)
        at = order[np.searchsorted(s_addrs, addrs[hit], sorter=order)]
        if (s_lanes[at] != lanes[hit]).any():
            return ("a program loads through one lane what another lane of it stored, with no "
                    "barrier between")
    return None


class _Patched:
    """The scope a helper's skipped language patch returns: nothing to restore."""

    @staticmethod
    def restore() -> None:
        pass


@contextlib.contextmanager
def language_patched_once():
    """Triton's interpreter (3.6-3.9) patches triton.language for each launch, and again on
    every call of a @triton.jit helper inside the kernel (inspect.getmembers over tl, tl.tensor
    and tl.math each time, never restored), though the launch patched the same modules: ~30% of
    an attention kernel's interpreter time. Inside a launch, a helper's patch of no module
    beyond those patched since the launch began is skipped (what it would set is set); the
    launch's own patch and its restore, and the first patch of each other module (the
    language's own jit functions see triton.language.core), are Triton's unchanged. Triton 3.4
    and 3.5 patch with no scope to restore: there it changes nothing."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    orig = interp._patch_lang
    launch = {"langs": None}  # the modules the running launch patched (None: no launch)

    def langs_of(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values()
                         if inspect.ismodule(v) and v in (tl, tl.core))

    def patch_lang(fn):
        langs = langs_of(fn)
        if launch["langs"] is not None and langs <= launch["langs"]:
            return _Patched
        scope = orig(fn)
        if not hasattr(scope, "restore"):  # Triton 3.4, 3.5: patches without a scope, as is
            return scope
        if launch["langs"] is not None:  # a helper reaching another module: patched now too
            launch["langs"] = launch["langs"] | langs
        else:  # the first since a restore: GridExecutor's, for its launch
            launch["langs"] = langs
            restore = scope.restore

            def restore_and_end():
                launch["langs"] = None
                restore()

            scope.restore = restore_and_end
        return scope

    interp._patch_lang = patch_lang
    try:
        yield
    finally:
        interp._patch_lang = orig


@contextlib.contextmanager
def interpreter_guard():
    """Make the Triton interpreter fail where a GPU would go wrong and it would not.

    Bounds: the interpreter returns garbage for an out-of-bounds load instead of faulting; the
    byte ranges of the storages passed to each launch are recorded, and OutOfBoundsAccess is
    raised when an enabled lane touches memory outside all of them.
    Undefined lanes: a masked load without `other` leaves its masked-off lanes undefined on a
    GPU, where the interpreter gives zeros; here they hold NaN (integers: an extreme value), so a
    kernel that uses them fails its parity check or the bounds check.
    Hints: tl.multiple_of / tl.max_contiguous claims are checked on the values they are made
    for (hint_problem); a false one raises FalseHint.
    Grids: a card launches at most GRID_YZ_MAX (65535) programs along a grid's y and z axes,
    the interpreter any number; GridTooLarge is raised past _common.GRID_YZ_MAX (which a test
    may lower, to run the batch runs that keep the attention's launches within it).
    Races: the interpreter runs a launch's programs one after another, so a kernel whose
    programs read or write what another program of the launch writes gives the right numbers
    here and wrong ones on a card; each launch's accesses are recorded per program and
    RaceBetweenPrograms is raised at its end (see `races`); so is a store whose lanes write
    different values to one address (lanes_disagree), and a program's load of what it stored
    itself through another thread with no barrier between (reload_problem).
    """
    import numpy as np
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    ranges: List[tuple] = []
    loads: list = []
    stores: list = []
    program: dict = {"pid": None, "stored": []}   # the running program's stores since a barrier
    orig_init = interp.GridExecutor._init_args_hst
    orig_restore = interp.GridExecutor._restore_args_dev
    orig_load = builder_cls.create_masked_load
    orig_store = builder_cls.create_masked_store
    orig_set_attr = interp.TensorHandle.set_attr
    orig_barrier = builder_cls.create_barrier

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        ranges.clear()
        loads.clear()
        stores.clear()
        program.update(pid=None, stored=[])

        def visit(a):
            if isinstance(a, (tuple, list)):
                for b in a:
                    visit(b)
            elif hasattr(a, "untyped_storage"):
                s = interp._unwrap_tensor(a).untyped_storage()
                ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
            elif hasattr(a, "base") and hasattr(a.base, "untyped_storage"):
                visit(a.base)

        visit(list(args_hst) + list(kwargs_hst.values()))
        return args_hst, kwargs_hst

    def restore(self, *args, **kwargs):
        # the launch ran every program: check it before its results reach the caller
        why = races(loads, stores)
        loads.clear()
        stores.clear()
        if why is not None:
            raise RaceBetweenPrograms(f"{self.fn.__name__}: {why}")
        return orig_restore(self, *args, **kwargs)

    def check(builder, ptrs, mask, what, log):
        if max(builder.grid_dim[1:]) > _common.GRID_YZ_MAX:
            raise GridTooLarge(
                f"a launch of grid {tuple(builder.grid_dim)}: a card allows at most "
                f"{_common.GRID_YZ_MAX} programs along y and z")
        addr = np.asarray(ptrs.data).astype(np.uint64)
        m = np.broadcast_to(np.asarray(mask.data).astype(bool), addr.shape)
        live = addr[m]
        if live.size == 0:
            return
        width = np.uint64(ptrs.get_element_ty().primitive_bitwidth // 8)
        ok = np.zeros(live.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (live >= np.uint64(lo)) & (live + width <= np.uint64(hi))
        if not ok.all():
            bad = int(live[~ok][0])
            raise OutOfBoundsAccess(
                f"interpreter {what} touched address {bad:#x}, outside every tensor passed to "
                f"the kernel ({len(ranges)} storages; {int((~ok).sum())} bad lanes)")
        x, y, z = builder.grid_idx
        gx, gy, _ = builder.grid_dim
        pid = x + gx * (y + gy * z)
        log.append((live, int(width), pid))
        if program["pid"] != pid:   # a new program: nothing of its own stored yet
            program.update(pid=pid, stored=[])
        lanes = np.flatnonzero(m)
        if log is stores:
            program["stored"].append((lanes, live, addr.shape))
        elif program["stored"]:
            why = reload_problem(program["stored"], lanes, live, addr.shape)
            if why is not None:
                raise RaceBetweenPrograms(why)

    def load(self, ptrs, mask, other, *a, **kw):
        check(self, ptrs, mask, "load", loads)
        if other is None and not np.asarray(mask.data).all():
            other = poison(ptrs)
        return orig_load(self, ptrs, mask, other, *a, **kw)

    def poison(ptrs):
        """What masked-off lanes of a load without `other` hold: undefined on a GPU, zeros
        under the interpreter (which hides a kernel using them); NaN for floats (bfloat16 as
        its bits), the extreme integer (most negative, or largest unsigned)."""
        ty = ptrs.get_element_ty()
        np_ty = interp._get_np_dtype(ty)
        if ty.is_bf16():
            fill = 0x7FC0
        elif ty.is_floating():
            fill = np.nan
        elif ty.is_int1():
            fill = True
        else:
            info = np.iinfo(np_ty)
            fill = info.min if info.min < 0 else info.max
        return interp.TensorHandle(np.full(np.shape(ptrs.data), fill, dtype=np_ty), ty)

    def store(self, ptrs, value, mask, *a, **kw):
        check(self, ptrs, mask, "store", stores)
        why = lanes_disagree(ptrs.data, value.data, mask.data)
        if why is not None:
            raise RaceBetweenPrograms(why)
        return orig_store(self, ptrs, value, mask, *a, **kw)

    def set_attr(handle, key, claims):
        why = hint_problem(handle.data, key, claims) if key in HINTS else None
        if why is not None:
            raise FalseHint(why)
        return orig_set_attr(handle, key, claims)

    def barrier(self, *a, **kw):
        program["stored"] = []   # later loads see every earlier store of the program
        return orig_barrier(self, *a, **kw)

    interp.TensorHandle.set_attr = set_attr
    builder_cls.create_barrier = barrier
    interp.GridExecutor._init_args_hst = init_args
    interp.GridExecutor._restore_args_dev = restore
    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    try:
        with language_patched_once():  # speed only: the same patches, once per launch
            yield
    finally:
        interp.TensorHandle.set_attr = orig_set_attr
        builder_cls.create_barrier = orig_barrier
        interp.GridExecutor._init_args_hst = orig_init
        interp.GridExecutor._restore_args_dev = orig_restore
        builder_cls.create_masked_load = orig_load
        builder_cls.create_masked_store = orig_store
