"""Small helpers shared by the ops: backend choice, input checks, dtype maps, allocation.

Nothing here queries a GPU at import time: `import diffit_kernels` must work on a CPU-only
machine, and `TRITON_INTERPRET` is read when a call is made, not when the module loads.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels take
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)                 # the reference also takes fp64

# Set by diffit_kernels.testing.nan_fill(): launchers then fill every fully-written output
# with NaN before the kernel runs, so an element the kernel forgets to write fails the test.
_NAN_FILL = False


# Set by diffit_kernels.testing.record_calls(): each public op hands it every eager call (the op's
# name, the op, its arguments, its result), so the calls of a model's forward can be checked
# against the reference at the model's own shapes and layouts (diffit.accel.check_kernels).
_CALL_RECORDER: Optional[Callable] = None


def recordable(name: str):
    """Decorator of a public op: its calls reach _CALL_RECORDER while one is set (never while
    torch.compile traces, whose tensors are fake)."""
    def wrap(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            out = fn(*args, **kwargs)
            rec = _CALL_RECORDER
            if rec is not None and not torch.compiler.is_compiling():
                rec(name, fn, args, kwargs, out)
            return out
        return op
    return wrap


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# DIFFIT_KERNELS_AUTOTUNE=0 (read at import): every autotuned launch takes its candidate list's
# first config (the first the card can load) and tmsa_attention's backward its first plan, as
# under the interpreter, so two runs (two processes, two cards of one kind) compute bitwise the
# same results. The card's own measurements do not promise that: timing noise can pick another
# tile, which sums in another order. Slower wherever the first candidate is not the fastest.
AUTOTUNE = os.environ.get("DIFFIT_KERNELS_AUTOTUNE", "1").strip() != "0"


def autotune_enabled() -> bool:
    """Whether launches choose among their candidates by timing them (see AUTOTUNE)."""
    return AUTOTUNE


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard requirement, but be kind
        return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op may call its Python implementation directly instead of through its
    torch.library custom op: in eager mode on plain tensors. The custom op's dispatcher round
    trips (autograd, then the backend kernel) cost host time on every call (about 80 us of a
    tmsa_attention forward + backward on a CPU core), and a training step makes dozens of
    calls; torch.compile must trace the op (opaque to inductor, with its fake implementation),
    and fake / meta tensors need that fake implementation too."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) in _PLAIN and not t.is_meta) for t in tensors)


OP_PREFIX = "diffit_kernels::"  # the custom ops' namespace, as profiles name their calls


def host_range(name: str):
    """A profiler range named like the custom op ("diffit_kernels::<op>") around a direct
    call, so a profile counts the op's host time either way; free when no profiler runs."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(OP_PREFIX + name)
    return contextlib.nullcontext()


def dispatch(name: str, direct: bool, op, impl, *args):
    """op(*args) through the torch.library dispatcher, or, when `direct` (see direct_call),
    impl(*args) itself inside a profiler range named like the op."""
    if not direct:
        return op(*args)
    with host_range(name):
        return impl(*args)


def call_op(name: str, op, impl, direct_fn, args: tuple, tensors: tuple):
    """An op's entry: its custom op `op` under torch.compile or on fake tensors; in eager mode
    its implementation directly, through `direct_fn` (a torch.autograd.Function running impl
    with the op's autograd formula) when a gradient is wanted, else impl alone."""
    if not direct_call(*tensors):
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return direct_fn.apply(*args)
    return dispatch(name, True, op, impl, *args)


def resolve_backend(backend: Optional[str], *tensors: Optional[torch.Tensor]) -> str:
    """Turn the per-call `backend` argument into "triton" or "torch".

    "auto" (the default) takes DIFFIT_KERNELS_BACKEND when it is set, else Triton when the
    tensors are on CUDA or TRITON_INTERPRET=1, else the plain-PyTorch reference. Asking for
    "triton" where it cannot run is a RuntimeError, never a silent fallback.
    """
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("DIFFIT_KERNELS_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"DIFFIT_KERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    devices = {t.device.type for t in tensors if t is not None}
    if backend == "auto":
        if devices and devices <= {"cuda"} and triton_importable():
            return "triton"
        if interpreting() and devices <= {"cpu"}:
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' needs the triton package, which cannot be "
                               "imported")
        if devices <= {"cuda"} and devices:
            return "triton"
        if devices <= {"cpu"} and interpreting():
            return "triton"
        raise RuntimeError(
            f"backend='triton' cannot run on tensors on {sorted(devices)}: Triton kernels need "
            "CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported; "
            "use backend='torch' or 'auto' for the plain-PyTorch path"
        )
    return "torch"


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    float_only: bool = True,
) -> None:
    """Raise a TypeError / ValueError naming `name` when `t` is not what the op expects.

    `shape` entries that are None match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64 on the torch "
                        f"backend), got {describe(t)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like the other inputs, got {describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {describe(t)}")
    if shape is not None:
        if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {describe(t)}")


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    """The Triton kernels take float32 / float16 / bfloat16; float64 stays on the reference."""
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16; {name} has "
                        f"{describe(t)} (use backend='torch' for it)")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Copy only a tensor whose last dim is not contiguous; strided views pass through."""
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        return t.contiguous()
    return t


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Output buffer the kernel writes completely (NaN-filled under testing.nan_fill())."""
    if _NAN_FILL and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_upcast(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 `tl.dot` is silently wrong: kernels upcast their operands then."""
    return interpreting() and dtype == torch.bfloat16


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# A CUDA grid has up to 2^31 - 1 programs along x but 65535 along y and z (a larger launch
# fails inside Triton on a card; the interpreter runs it). Launches with a program per sample
# or per (sample, head) on y or z run the batch in runs that fit (batch_slices).
GRID_YZ_MAX = 65535


def batch_slices(B: int, per_sample: int) -> List[Tuple[int, int]]:
    """[b0, b1) runs of a batch of B whose per_sample programs per sample fit a grid's y or z
    axis (GRID_YZ_MAX): the whole batch in one run up to GRID_YZ_MAX // per_sample samples
    (DiffiT-XL's 16 heads: 4095)."""
    step = max(1, GRID_YZ_MAX // max(per_sample, 1))
    return [(b0, min(B, b0 + step)) for b0 in range(0, B, step)] or [(0, B)]


def row_warps(block: int) -> int:
    """Warps ladder for row-wise kernels: one warp per ~256 elements of the row, 1..32
    (an 8192-wide fused row spills on sm_90a with 16 warps)."""
    return max(1, min(32, block // 256))


@functools.lru_cache(maxsize=8)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def on_tensor_device(launcher: Callable) -> Callable:
    """Decorate an op's forward or backward launcher: run it with its first tensor argument's
    CUDA device current. Triton launches on the current device while torch ops follow their
    tensors, so an op on cuda:1 while cuda:0 is current would fail inside Triton ("pointer
    argument cannot be accessed from Triton") or reach the other card's memory over peer
    access. (Autograd's backward threads and compiled graphs set the device themselves; an
    eager forward on a second card does not.) The inputs share one device (checked).
    CUDA's refusal of a call inside a graph capture is re-raised saying what to do
    (_capture_refused)."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        try:
            if dev.type != "cuda":
                return launcher(*args, **kwargs)
            with torch.cuda.device(dev):
                return launcher(*args, **kwargs)
        except RuntimeError as e:
            if not any(m in str(e) for m in CAPTURE_REFUSALS):
                raise
            raise RuntimeError(_capture_refused(launcher.__name__, e)) from e

    run.on_tensor_device = True
    return run


# CUDA's messages for a call refused inside a stream capture (cudaErrorStreamCaptureUnsupported,
# and the invalidated capture's later calls), as Triton's and torch's errors quote them
CAPTURE_REFUSALS = ("operation not permitted when stream is capturing",
                    "operation failed due to a previous error during capture")


def _capture_refused(name: str, error: Exception) -> str:
    """What to do when CUDA refused a call of launcher `name` inside a CUDA graph capture: the
    usual cause is a Triton kernel's first launch in this process, at which Triton loads the
    kernel onto the card (cuModuleLoadData), which a capture in torch's default modes forbids
    (capture_error_mode "global" or "thread_local"; "relaxed" tolerates it)."""
    return (f"diffit_kernels ({name}): CUDA refused a call inside a CUDA graph capture ({error}); "
            "the capture is invalid now. Triton loads each kernel onto the card at its first "
            "launch in a process, which a capture forbids: run the same calls once outside the "
            "capture first (the warm-up on a side stream that torch's CUDA graph docs ask for, "
            "and that torch.cuda.make_graphed_callables and torch.compile's CUDA graphs do)")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached): launchers size their grids by it."""
    return _multiprocessors(device.index if device.index is not None
                            else torch.cuda.current_device())


@contextlib.contextmanager
def overriding(state: dict, **values):
    """Set keys of a module's test-hook dict for the duration of a with-block, then restore
    them (the ops' _emulate_card / _record_launches hooks; library code never sets them)."""
    old = dict(state)
    state.update(values)
    try:
        yield
    finally:
        state.clear()
        state.update(old)


# Test hook (testing.autotuner_repeats): the autotune keys launched so far in this process, or
# None (off). A card's triton.autotune launches a kernel many times on the same arguments at
# the first call of each key (timing the candidates) and then once more; the interpreter tunes
# nothing, so a kernel whose result depends on how often it ran (it accumulates into its output)
# would pass there and be wrong on a card. With the hook on, the launchers run such a first
# launch once more first.
_REPEATS: dict = {"seen": None}


def autotuner_repeats(kernel, keys: Sequence[str], args: tuple, kwargs: dict) -> int:
    """How many extra times a launcher runs this launch before its own (0 or 1): 1 when the
    hook is on and this is the first launch of its autotune key, built as Triton's autotuner
    builds it (the values of the `keys` arguments, then the dtype of every tensor argument)."""
    seen = _REPEATS["seen"]
    if seen is None:
        return 0
    key = (kernel.fn.__name__,) + _tuning_key(kernel, keys, args, kwargs)
    if key in seen:
        return 0
    seen.add(key)
    return 1


def _tuning_key(kernel, keys: Sequence[str], args: tuple, kwargs: dict) -> tuple:
    """A launch's autotune key as Triton's autotuner builds it (3.4-3.9): the values of the
    `keys` arguments, then the dtype of every tensor argument."""
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    return tuple(named[k] for k in keys if k in named) + tuple(
        str(v.dtype) for v in named.values() if hasattr(v, "dtype"))


def planned_sms(device: torch.device, override: Optional[int]) -> Optional[int]:
    """The SM count a launch plan is sized for: a test hook's emulated card, else the CUDA
    device's, else None (the interpreter's own small plans)."""
    if override is not None:
        return override
    return sm_count(device) if device.type == "cuda" else None


# Every key an autotuner of ours tuned in this process, with each candidate's measured time
# (record_tuning; record_choice for choices timed by the ops themselves, e.g. attention's
# backward plans; autotune_timings() hands out a copy): the benchmarks write it out
# (autotune.csv), so the shipped candidate lists can be ordered and pruned by what a card
# measured rather than by the one winner Triton's TRITON_PRINT_AUTOTUNING reports
_TUNED: list = []


def _candidate(cfg) -> str:
    """'BLOCK_M=64 BLOCK_N=32 w4 s3' for a triton.Config."""
    kw = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw} w{cfg.num_warps} s{cfg.num_stages}".strip()


def record_tuning(kernel: str, kind: str, tuner, known: int) -> None:
    """After a call of a triton.autotune object that had `known` cached keys before it: when
    it tuned a new key, append what it measured (each candidate's median ms, inf for one that
    did not fit the card) to the process's record. The key just tuned is the cache's newest
    (dicts keep insertion order). Costs one len() per call otherwise."""
    cache = getattr(tuner, "cache", None)
    if cache is None or len(cache) <= known:
        return
    key = list(cache)[-1]
    names = list(getattr(tuner, "keys", []))
    desc = [f"{n}={v}" for n, v in zip(names, key)]
    desc += sorted({str(v).replace("torch.", "") for v in key[len(names):]})  # the dtypes
    timings = getattr(tuner, "configs_timings", None) or {}
    if not all(c in tuner.configs for c in timings):
        timings = {}  # left from another key: this one was not benchmarked
    cands = []
    for cfg in tuner.configs:
        t = timings.get(cfg)
        if isinstance(t, (list, tuple)):
            t = t[0] if t else None
        cands.append((_candidate(cfg), None if t is None else float(t)))
    record_choice(kernel, kind, " ".join(desc), _candidate(cache[key]), cands)


def record_choice(kernel: str, kind: str, key: str, best: str, candidates: list) -> None:
    """Append one measured choice to the process's record: kernel (or op) name, kind (the
    launcher's label), key (readable), the candidate chosen and [(candidate, median ms, inf
    for one that did not fit the card, or None)]."""
    _TUNED.append(dict(kernel=kernel, kind=kind, key=key, best=best, candidates=candidates))


_TUNERS: dict = {}  # every cached triton.autotune object of the ops, by the launcher's key

# How long an autotuned launch times each candidate (ms of kernel time: triton.testing.do_bench's
# warm-up and repetition budgets), a quarter of Triton's defaults (25 / 100). do_bench flushes the
# L2 before every call (a 256 MB write, ~60 us on an H200) outside that budget, so at Triton's
# defaults a 20 us kernel runs ~5000 times, ~0.4 s per candidate, and DiffiT-XL/2's first step
# times 31 candidates; 25 ms still times a 1 ms candidate 25 times and a 20 us one ~1250 times,
# and the choice is the least median.
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25


def tuning_bench(kernel_call, quantiles):
    """The autotuners' benchmark: do_bench at TUNE_WARMUP_MS / TUNE_REP_MS."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS,
                                   quantiles=quantiles)


def autotuner(configs: list, key: Sequence[str], fn):
    """triton.autotune over exactly `configs`, keyed on `key`, timing with tuning_bench. At a
    key's first launch, before it times them, the candidates compile in threads (precompile,
    from the early_config_prune hook, which Triton calls only then and which prunes none)."""
    import triton

    def first_launch(configs, named, **kwargs):
        try:
            precompile(tuner, named, kwargs)
        except Exception as e:  # the autotuner compiles them one by one, as without threads
            warnings.warn(f"{tuner.base_fn.__name__}: compiling its candidates in threads "
                          f"failed ({type(e).__name__}: {e}); the autotuner compiles them one "
                          "by one", RuntimeWarning, stacklevel=2)
        return configs

    tuner = triton.autotune(configs, key=list(key), do_bench=tuning_bench,
                            prune_configs_by={"early_config_prune": first_launch})(fn)
    return tuner


def _compile_threads() -> int:
    """DIFFIT_KERNELS_COMPILE_THREADS, else the usable cores shared among the node's ranks
    (torchrun's LOCAL_WORLD_SIZE), at most 8."""
    env = os.environ.get("DIFFIT_KERNELS_COMPILE_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"DIFFIT_KERNELS_COMPILE_THREADS must be a positive integer (1: "
                             f"compile an autotuned launch's candidates one by one), got {env!r}")
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, (cores or 1) // ranks))


# Threads that compile an autotuned launch's candidates at once (precompile), read at import;
# 1: one after another, as Triton's autotuner does
COMPILE_THREADS = _compile_threads()


def _async_compile_mode():
    """Triton's module of AsyncCompileMode where that can skip a candidate that fails to
    compile (ignore_errors: Triton 3.6+), else None."""
    try:
        from triton.runtime import _async_compile
    except ImportError:  # Triton 3.4
        return None
    mode = getattr(_async_compile, "AsyncCompileMode", None)
    if mode is None or "ignore_errors" not in inspect.signature(mode).parameters:
        return None  # Triton 3.5: a failed compile would leave its mode active
    return _async_compile


def precompile(tuner, named: dict, kwargs: dict) -> int:
    """Compile every candidate of a triton.autotune object for a launch (its positional
    arguments by name, and its keyword arguments with the grid, as the autotuner's hooks get
    them) in COMPILE_THREADS threads, before the autotuner times them: it compiles each when
    it first runs it, one after another, so a key's first launch waits for every candidate's
    compile in turn (Triton's compiler and ptxas release the GIL: on 2 cores, 8 attention
    forwards for sm_90a compile in 2.35 s with two threads against 4.41 s in one, Triton 3.9;
    1.49 against 2.86, Triton 3.6). Each goes into the kernel's own cache under the key the
    autotuner's launch looks up, so the autotuner then finds them compiled; one that fails to
    compile is left to the autotuner, which compiles it as before (and fails it again where its
    source does: a threaded compile can also fail alone, as CPython's ast.parse, which Triton
    calls for every @jit function, now and then does in threads, python/cpython#106905).
    Returns the number submitted (0: Triton has no AsyncCompileMode with ignore_errors, one
    thread, one candidate)."""
    module = _async_compile_mode()
    configs = list(getattr(tuner, "configs", ()))
    threads = min(COMPILE_THREADS, len(configs))
    if module is None or threads < 2:
        return 0
    from concurrent.futures import ThreadPoolExecutor

    launch = {k: v for k, v in kwargs.items() if k != "warmup"}  # the grid, keyword arguments
    with ThreadPoolExecutor(threads, thread_name_prefix="diffit-compile") as pool:
        mode = module.AsyncCompileMode(pool, ignore_errors=True)
        try:
            with mode:
                for cfg in configs:
                    tuner.fn.warmup(**named, **launch, **cfg.all_kwargs())
        finally:
            if module.active_mode.get() is mode:  # left set by an error (Triton 3.6's exit)
                module.active_mode.set(None)
            drop_failed_compiles(tuner, module)
    return len(configs)


def jit_function(tuner):
    """The @triton.jit function under an autotuner (and heuristics), or None where there is
    none (a stand-in)."""
    fn = getattr(tuner, "fn", None)
    while fn is not None and not hasattr(fn, "device_caches"):
        fn = getattr(fn, "fn", None)
    return fn


def drop_failed_compiles(tuner, module) -> int:
    """Remove from the kernel's JIT caches the compiles that failed in threads: Triton 3.7 and
    3.8 file each threaded compile in the cache before it ends and keep it there when it fails
    (3.6 files only successes, 3.9 removes failures), so the autotuner's launch of that
    candidate would raise the thread's error instead of compiling it. Returns how many."""
    fn = jit_function(tuner)
    future_kernel = getattr(module, "FutureKernel", None)
    if fn is None or future_kernel is None:  # no JIT cache or no threaded compile to clean up
        return 0
    dropped = 0
    for caches in list(fn.device_caches.values()):
        cache = caches[0]
        for key, kernel in list(cache.items()):
            if isinstance(kernel, future_kernel) and kernel.kernel is None and \
                    kernel.future.done() and kernel.future.exception() is not None:
                del cache[key]
                dropped += 1
    return dropped


def launch_tuned(key, build: Callable[[], object], kernel: str, kind: str, grid, args: tuple,
                 kwargs: dict):
    """Launch through the cached autotuner _TUNERS[key] (made by build() at its first use) and
    record what it tunes (record_tuning, for autotune.csv); returns the autotuner."""
    tuner = _TUNERS.get(key)
    if tuner is None:
        tuner = _TUNERS[key] = build()
    known = len(tuner.cache)
    tuner[grid](*args, **kwargs)
    record_tuning(kernel, kind, tuner, known)
    return tuner


def cuda_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current CUDA stream: nothing may be timed,
    synchronized or copied from host memory into a cache then. False without CUDA (a CPU-only
    torch build's capture query is a stub that raises)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def untuned_while_capturing(tuner_key, kernel, keys: Sequence[str], args: tuple,
                            kwargs: dict) -> bool:
    """Whether the cached autotuner _TUNERS[tuner_key] would time its candidates for this
    launch (a key it has not tuned) inside a CUDA graph capture, which cannot be timed
    (Triton's benchmark synchronizes the device, which a capture forbids: the capture would
    fail inside Triton). The launcher then runs its list's first config the card can load,
    untimed and not kept, as with DIFFIT_KERNELS_AUTOTUNE=0; the key is tuned at its first
    launch outside a capture. That config's kernel must have been launched before the capture
    (a tuned key of the same kernels, or a call under DIFFIT_KERNELS_AUTOTUNE=0): Triton loads a
    kernel onto the card at its first launch, which a capture forbids (on_tensor_device says
    so when it happens)."""
    if not cuda_capturing():
        return False
    tuner = _TUNERS.get(tuner_key)
    return tuner is None or _tuning_key(kernel, keys, args, kwargs) not in tuner.cache


def autotune_timings() -> list:
    """What record_tuning and record_choice recorded in this process, oldest first: dicts of
    kernel (its name), kind (the launcher's label for the config list), key (the autotune key,
    readable), best (the candidate chosen) and candidates [(candidate, median ms or None)]."""
    return [dict(r, candidates=list(r["candidates"])) for r in _TUNED]
