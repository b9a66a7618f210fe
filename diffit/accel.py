"""How the training and sampling commands run a model fast: regional torch.compile of its blocks.

    compile_blocks(model)      torch.compile each repeated block's forward in place (fullgraph,
                               static shapes): one compiled graph per distinct block shape, so a
                               28-block DiffiT-XL/2 compiles one graph, the U-Net one per level.
    resolve_compile(flag, device, fsdp)   the default: on for CUDA (where it pays), off elsewhere.
    resolve_compile_mode(mode, ...)       auto: CUDA graphs too where they run (one process).
    mark_graph_steps(model)    inference with CUDA graphs: each model call a new graph step.
    describe_run(...)          the one log line saying which kernels and which compile mode run.
    backends_to_time(backend, device)   what "auto" chooses between by timing (CUDA: both).
    choose_backend(step, modules, ...)  the trial: check_kernels, time_backends, agree_fastest,
                               set_backend.
    check_kernels(probe, modules)       our ops' calls in a model's forward against the
                               reference, on this card at the run's shapes.
    time_backends(step, modules, ...)   each backend's time per step, measured on this card.
    pick_fastest(per_rank)     the choice every rank agrees on: the least of the slowest ranks.

Why regional compile with our kernels inside: the fused ops are torch.library custom ops, opaque
to inductor but traced through (no graph break); everything between them (dtype casts, residual
adds, the MLP's GELU, bias adds) is fused by inductor, and the Python between the ops is gone.
Measured on an H200 (DiffiT-XL/2 256 px B32, bf16 autocast, fwd+bwd+AdamW, torch 2.11): 142.6 ms
per step eager with our kernels, 116.0 ms with the blocks compiled.

The forward of each block is replaced by a compiled one (an instance attribute), so the module
tree, the state-dict keys (no `_orig_mod.` prefix) and module hooks (FSDP's, DDP's) are unchanged
and stay outside the compiled region. Compile after building the EMA copy (deepcopy) and after
wrapping for DDP / FSDP.

Why the trainer times the backends: which configuration trains fastest is settled by the card's
own step, and it differs by model (and card, and kernel release). On H200s with commit 3c599d8's
kernels, ours with CUDA graphs ran the ffhq64 U-Net step in 52 ms where the compiled reference
took 67, while the compiled reference ran the DiffiT-XL/2 256 px B32 step in 75.4 ms against
ours' 110 (README, "DiffiT on the kernels"). So the trainer's backend "auto" times a few forward
+ backward passes of its real step with each backend and keeps the faster (at start-up it costs
the second backend's compile and autotuning, and 2 x 8 passes); "triton" or "torch" fixes the
choice.
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

# the torch.compile backend; tests on CPU set "aot_eager" (traces and runs the same graphs
# without generating kernels)
COMPILE_BACKEND = os.environ.get("DIFFIT_COMPILE_BACKEND", "inductor")

# one graph per distinct block shape (U-Net levels, train / eval, a last smaller batch): more than
# torch's default of 8 compiled variants per code object can be legitimate, and hitting the limit
# silently falls back to eager for the rest of the run
RECOMPILE_LIMIT = 64


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a command's --precision ("fp32": None, no autocast)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, amp: Optional[torch.dtype]):
    """torch.autocast to `amp` on the device's type, or disabled where amp is None."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def block_modules(model: nn.Module) -> list:
    """The repeated blocks regional compilation compiles: the U-Net's DiffiTResBlocks (GroupNorm,
    conv and the DiffiT block fuse together), else DiffiTBlock / AdaLNBlock (latent model)."""
    from .layers import AdaLNBlock, DiffiTBlock
    from .unet import DiffiTResBlock

    res = [m for m in model.modules() if isinstance(m, DiffiTResBlock)]
    return res or [m for m in model.modules() if isinstance(m, (DiffiTBlock, AdaLNBlock))]


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Past Dynamo's recompile limit (8 by default) a function silently runs eager for the rest
    of the run: never what a command (or a benchmark timing "compile") wants. The options'
    names changed across PyTorch versions."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 4 * limit:
            setattr(cfg, name, 4 * limit)


COMPILE_MODES = ("default", "reduce-overhead")


def resolve_compile_mode(mode: str, device: torch.device, *, world: int = 1,
                         grad_checkpointing: bool = False, graphs_by_default: bool = True
                         ) -> Tuple[str, str]:
    """(mode, why) for compile_blocks. "auto" (the trainer's default) is "reduce-overhead" on
    CUDA in one process without gradient checkpointing, else "default". Why CUDA graphs by
    default: the step is host-bound around the custom ops. On an H200 at ec83eac the XL/2 256 px
    B32 step kept the GPU idle 108 of 186 ms with the blocks compiled (default mode), and in an
    earlier session (3c599d8's kernels) the replayed graphs took the ffhq64 U-Net step from
    96-109 ms to 52 and the XL/2 one from 115-117 to 110, with the same losses on the card
    (tests/test_train.py::test_gpu_cuda_graph_mode_trains_like_the_default). An explicit
    "reduce-overhead" where it cannot run is an error; "auto" falls back and says why.
    graphs_by_default=False (sampling): "auto" is "default" and the reason names the opt-in, as
    CUDA graphs are not yet measured there."""
    choices = ("auto",) + COMPILE_MODES
    if mode not in choices:
        raise ValueError(f"compile mode must be one of {choices}, got {mode!r}")
    blocked = (f"the {device.type} device" if device.type != "cuda" else
               f"{world} processes" if world > 1 else
               "gradient checkpointing" if grad_checkpointing else "")
    if mode == "reduce-overhead" and blocked:
        raise ValueError("compile_mode reduce-overhead (CUDA graphs) runs on CUDA in one process "
                         f"without grad_checkpointing, not with {blocked}; use the default mode")
    if mode != "auto":
        return mode, ""
    if device.type != "cuda":
        return "default", ""  # nothing to say: CUDA graphs exist on CUDA only
    if blocked:
        return "default", f"no CUDA graphs with {blocked}"
    if not graphs_by_default:
        return "default", "--compile-mode reduce-overhead to replay the blocks as CUDA graphs"
    return "reduce-overhead", ("CUDA graphs, the default in one process on CUDA; "
                               "--compile-mode default to opt out")


def mark_graph_steps(model: nn.Module) -> None:
    """Inference with blocks compiled in mode reduce-overhead: every call of the model starts a
    new cudagraph-trees step (torch.compiler.cudagraph_mark_step_begin), so one call's replayed
    graphs may reuse the memory of the call before; the caller keeps only the model's outputs
    (made outside the blocks), never a block's. Wraps model.forward in place (instance
    attribute), which forward_with_cfg and wrappers calling model(...) go through."""
    inner = model.forward

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return inner(*args, **kwargs)

    model.forward = forward


def compile_blocks(model: nn.Module, *, backend: Optional[str] = None, fullgraph: bool = True,
                   dynamic: bool = False, mode: str = "default") -> int:
    """torch.compile every block of `model` in place (see block_modules); returns how many.

    fullgraph: a graph break inside a block is an error, never a silent slow path. Already
    compiled blocks are left as they are, so calling this twice is harmless.
    mode "reduce-overhead": each compiled block also replays as a CUDA graph (inductor's
        cudagraph trees), which removes the per-launch host cost of the custom ops; the caller
        must call torch.compiler.cudagraph_mark_step_begin() before every training step and
        must not keep a block's outputs from one step to the next.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    blocks = block_modules(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no DiffiT blocks to compile")
    raise_recompile_limit()
    backend = backend or COMPILE_BACKEND
    for blk in blocks:
        if getattr(blk, "_diffit_compiled", False):
            continue
        # the bound method: `self` is an input of the graph, so every block of one shape shares
        # one compiled graph (Dynamo guards on the module's type and attributes, not identity)
        blk.forward = torch.compile(blk.forward, backend=backend, fullgraph=fullgraph,
                                    dynamic=dynamic, mode=None if mode == "default" else mode)
        blk._diffit_compiled = True
    return len(blocks)


def resolve_compile(flag: Optional[bool], device: torch.device, fsdp: bool = False
                    ) -> Tuple[bool, str]:
    """(compile?, why): None = the default, on for CUDA, off on CPU (compiling costs a minute
    and gains nothing measurable on the tiny CPU models) and under FSDP (not measured there)."""
    if flag is not None:
        return bool(flag), ("--compile" if flag else "--no-compile")
    if device.type != "cuda":
        return False, f"the default on {device.type} (--compile to force)"
    from diffit_kernels._common import triton_importable
    if COMPILE_BACKEND == "inductor" and not triton_importable():
        return False, "inductor generates Triton code and triton cannot be imported"
    if fsdp:
        return False, "the default under FSDP (--compile to force)"
    return True, "the default on CUDA (--no-compile to opt out)"


def kernels_in_use(backend: str, device: torch.device) -> str:
    """Which implementation the ops take for `backend` on `device` (see resolve_backend)."""
    from diffit_kernels._common import resolve_backend

    probe = torch.empty(0, device=device)
    try:
        chosen = resolve_backend(backend, probe)
    except RuntimeError:
        chosen = backend
    return ("our fused Triton kernels" if chosen == "triton"
            else "the plain-PyTorch reference ops")


def describe_run(backend: str, device: torch.device, compiled: bool, why: str,
                 n_blocks: int = 0, mode: str = "default", mode_why: str = "") -> str:
    """E.g. 'our fused Triton kernels inside regional torch.compile (28 blocks, fullgraph,
    backend inductor; the default on CUDA (--no-compile to opt out))'."""
    kern = kernels_in_use(backend, device)
    if compiled:
        how = "" if mode == "default" and not mode_why else f", mode {mode}"
        how += f" ({mode_why})" if mode_why else ""
        return (f"{kern} inside regional torch.compile ({n_blocks} blocks, fullgraph, backend "
                f"{COMPILE_BACKEND}{how}; {why})")
    return f"{kern}, eager (no torch.compile: {why})"


def compile_for_run(model: nn.Module, flag: Optional[bool], device: torch.device, *,
                    fsdp: bool = False, mode: str = "default", world: int = 1,
                    grad_checkpointing: bool = False, graphs_by_default: bool = True
                    ) -> Tuple[bool, str, Callable[[str], str]]:
    """What a command does in one call: decide (resolve_compile, resolve_compile_mode), compile
    the blocks of `model` when so decided. Returns (compiled, the compile mode used, describe):
    describe(backend) is the log line saying what runs (describe_run) with that backend, which
    the trainer may choose after compiling (time_backends)."""
    compiled, why = resolve_compile(flag, device, fsdp)
    mode, mode_why = resolve_compile_mode(mode, device, world=world,
                                          grad_checkpointing=grad_checkpointing,
                                          graphs_by_default=graphs_by_default) \
        if compiled else ("default", "")
    n_blocks = compile_blocks(model, mode=mode) if compiled else 0
    return compiled, mode, functools.partial(describe_run, device=device, compiled=compiled,
                                             why=why, n_blocks=n_blocks, mode=mode,
                                             mode_why=mode_why)


# ---- the backend chosen by timing -------------------------------------------------------------
TRIAL_BACKENDS = ("triton", "torch")  # in order of preference when two time the same
TRIAL_DEVICES = ("cuda",)  # where "auto" times them (the tests add "cpu" under the interpreter)
# passes before the timed ones: the first compiles (torch.compile, Triton's kernels and their
# autotuning); under mode reduce-overhead cudagraph trees run the second eagerly and record the
# third, so the timed passes replay
TRIAL_WARMUP = 3
TRIAL_STEPS = 5


def set_backend(modules: Iterable[nn.Module], backend: str) -> None:
    """Every layer of ours under `modules` (a model and its EMA copy) that carries a `backend`
    takes `backend`: the next call of each op follows it (compiled blocks recompile once, as
    Dynamo guards on the attribute). Parameters and state dicts are untouched. A layer of ours
    is one whose class or a base of it is defined in `diffit` (FSDP's fully_shard swaps a
    block's class for a subclass it makes elsewhere)."""
    for root in modules:
        for m in root.modules():
            if isinstance(getattr(m, "backend", None), str) and any(
                    c.__module__.startswith("diffit.") for c in type(m).__mro__):
                m.backend = backend


def backends_to_time(backend: str, device: torch.device) -> Tuple[str, ...]:
    """The backends that `backend` chooses between by timing the step on `device`: both of
    TRIAL_BACKENDS for "auto" on a TRIAL_DEVICES device where both run, else none (a fixed
    choice: "triton", "torch", or "auto" where only the reference runs)."""
    from diffit_kernels._common import resolve_backend

    if backend != "auto" or device.type not in TRIAL_DEVICES:
        return ()
    probe = torch.empty(0, device=device)
    runs = []
    for b in TRIAL_BACKENDS:
        try:
            runs.append(resolve_backend(b, probe) == b)
        except RuntimeError:
            runs.append(False)
    return TRIAL_BACKENDS if all(runs) else ()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backends(step: Callable[[], object], modules: Sequence[nn.Module],
                  candidates: Sequence[str], device: torch.device, *,
                  warmup: Optional[int] = None, steps: Optional[int] = None,
                  clock: Callable[[], float] = time.perf_counter,
                  start: Optional[Callable[[str], None]] = None,
                  outputs: Optional[Dict[str, torch.Tensor]] = None
                  ) -> Dict[str, Union[float, str]]:
    """{backend: the median wall time of one step() in ms, host included (what a training step
    waits for), or why it failed}. Each backend in turn is set on `modules` (set_backend), runs
    `warmup` untimed steps (TRIAL_WARMUP) and `steps` timed ones (TRIAL_STEPS), the device
    synchronised around each. A backend that raises (out of memory, a kernel that does not
    build) is left out with the error's text; the caller leaves `modules` on its choice.
    start(backend), when given, runs before a backend's first step (e.g. to put the random
    state back, so every backend's first step sees the same inputs); `outputs`, when given,
    receives what each backend's first step returned (a float32 CPU copy), for check_outputs."""
    warmup = TRIAL_WARMUP if warmup is None else warmup
    steps = TRIAL_STEPS if steps is None else steps
    out: Dict[str, Union[float, str]] = {}
    for b in candidates:
        set_backend(modules, b)
        try:
            if start is not None:
                start(b)
            for i in range(warmup):
                got = step()
                if i == 0 and outputs is not None and got is not None:
                    outputs[b] = torch.as_tensor(got).detach().float().cpu()
            times = []
            for _ in range(steps):
                _sync(device)
                t0 = clock()
                step()
                _sync(device)
                times.append(clock() - t0)
            out[b] = 1e3 * statistics.median(times)
        except Exception as e:  # noqa: BLE001 - any failure leaves this backend out, said why
            out[b] = f"{type(e).__name__}: {e}"
            if device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory backend's blocks, for the next
    return out


# the most a backend's first trial step may differ from the reference's (relative L2) before it
# is left out: the two paths differ by rounding (bf16: a few 1e-3 of a training loss), while a
# kernel computing the wrong thing on a card is off by far more where the output depends on it
# (not at a zero-initialised start, whose output ignores the blocks)
TRIAL_RTOL = 0.1


def check_outputs(results: Dict[str, Union[float, str]], outputs: Dict[str, torch.Tensor],
                  reference: str = "torch", rtol: Optional[float] = TRIAL_RTOL) -> None:
    """Leave out (in `results`, in place) a backend whose first trial step gave a non-finite
    value where the reference's was finite, or (rtol not None) one further than `rtol` from
    the reference's, relative L2: the same inputs through our kernels and through the plain
    ops must agree to rounding, and a card on which they do not should train on the reference
    (and the disagreement be reported). Nothing is judged without the reference's value."""
    ref = outputs.get(reference)
    if ref is None or not bool(torch.isfinite(ref).all()):
        return
    for b, got in outputs.items():
        if b == reference or isinstance(results.get(b), str):
            continue
        if not bool(torch.isfinite(got).all()):
            why = "non-finite values"
        elif rtol is not None and got.shape == ref.shape:
            rel = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
            if rel <= rtol:
                continue
            why = f"a relative difference of {rel:.3g} (more than {rtol:g})"
        else:
            continue
        results[b] = (f"its first step gave {why} against the {reference} backend on the same "
                      f"inputs: a wrong result on this card, please report it")


@contextlib.contextmanager
def _eager_stance():
    """torch.compile'd code (the blocks compile_blocks compiled) runs as plain eager code in
    the with-block: nothing compiles, or recompiles for a probe's batch."""
    stance = getattr(torch.compiler, "set_stance", None)  # torch 2.6+
    if stance is None:  # pragma: no cover - older torch: the probe's calls compile as usual
        yield
        return
    with stance("force_eager"):
        yield


@contextlib.contextmanager
def exact_float32():
    """float32 matmuls without TF32 in the with-block, so the float32 reference is exact and
    our float32 kernels (which follow the same flag) too."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def check_kernels(probe: Callable[[], object], modules: Sequence[nn.Module]) -> Optional[str]:
    """Why our kernels must not run this model on this card, or None. With our kernels set on
    `modules`, probe() runs the model's forward eagerly (compiled blocks too) on the run's own
    batch, whose work splits, plans and configs are the ones the run takes (the attention
    backward's batch shares differ by batch size); each distinct call of our ops in it is then
    checked against the reference on its own inputs, strides and arguments by the numerics
    rule (FlashAttention's, as the tests apply it: diffit_kernels.testing.check_call), its
    outputs and the gradients the call needed, an attention call once per table read and
    backward plan it can take (the card times them at the run's batch and may pick any). A kernel that computes the wrong thing
    on this card (a miscompile, a config or work split no CPU gate ran) fails here at any
    point of training, where comparing the losses is blind at a fresh start
    (zero-initialised output layers). An error is a reason too, except running out of
    memory (a warning: no evidence against the kernels)."""
    from diffit_kernels import testing

    set_backend(modules, "triton")
    try:
        with testing.record_calls() as calls, _eager_stance(), torch.enable_grad():
            probe()
        with exact_float32(), torch.enable_grad():
            for call in calls:
                bad = [r for r in testing.check_call(call, every_variant=True) if not r.ok]
                if bad:
                    r = bad[0]
                    return (f"its {call.op} at this run's shapes ({call.label()}) gave {r.name} "
                            f"{r.err:.3g} off the reference, beyond the numerics rule's "
                            f"{r.bound:.3g} ({r.dtype}): a wrong result on this card, please "
                            f"report it")
    except torch.cuda.OutOfMemoryError as e:  # no evidence against the kernels: said, not held
        torch.cuda.empty_cache()
        warnings.warn(f"the kernel check ran out of memory and was skipped (our kernels stay "
                      f"in the trial): {str(e).splitlines()[0]}", RuntimeWarning, stacklevel=2)
    except Exception as e:  # noqa: BLE001 - a kernel that fails is left out, said why
        return f"{type(e).__name__}: {e}"
    return None


def pick_fastest(per_rank: List[Dict[str, Union[float, str]]]) -> Tuple[str, Dict[str, object]]:
    """(the backend, {backend: ms of the slowest rank, or the first failure}) from every rank's
    time_backends: a backend is as fast as its slowest rank (a step waits for all of them) and
    out if it failed on any; ties go to the earlier one. The same on every rank, as each gets
    every rank's results. RuntimeError naming each failure when every backend failed."""
    merged: Dict[str, object] = {}
    for b in per_rank[0]:
        vals = [r[b] for r in per_rank]
        failed = [v for v in vals if isinstance(v, str)]
        merged[b] = failed[0] if failed else max(vals)
    timed = [b for b, v in merged.items() if not isinstance(v, str)]
    if not timed:
        raise RuntimeError("no backend ran the timed step: "
                           + "; ".join(f"{b}: {v}" for b, v in merged.items()))
    return min(timed, key=lambda b: merged[b]), merged


def all_ranks(obj, world: int) -> list:
    """[obj of rank 0, ..., obj of rank world - 1]: a gather over the default process group (a
    collective every rank must reach), or [obj] in one process."""
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def agree_fastest(mine: Dict[str, Union[float, str]], world: int
                  ) -> Tuple[str, Dict[str, object]]:
    """pick_fastest over every rank's results (all_ranks: a collective every rank must
    reach)."""
    return pick_fastest(all_ranks(mine, world))


def choose_backend(step: Callable[[], object], modules: Sequence[nn.Module],
                   candidates: Sequence[str], device: torch.device, world: int = 1, *,
                   start: Optional[Callable[[str], None]] = None,
                   rtol: Optional[float] = TRIAL_RTOL,
                   probe: Optional[Callable[[], object]] = None
                   ) -> Tuple[str, Dict[str, object], float]:
    """The trial in one call: check_kernels with `probe` (when given; ours out on every rank
    if it failed on any), time_backends on the backends it left, check_outputs on what each
    backend's first step returned (when step returns something: a loss, samples),
    agree_fastest over the `world` ranks (a collective every rank must reach), and the chosen
    backend set on `modules`. Returns (chosen, {backend: ms or failure}, the trial's seconds).
    For a training loop of one's own:

        candidates = backends_to_time("auto", device)       # () where only one backend runs
        if candidates:
            def step():  # returns the loss: each backend's first one is compared
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss.detach()
            chosen, ms, _ = choose_backend(step, [model], candidates, device,
                                           start=lambda backend: torch.manual_seed(0),
                                           probe=lambda: loss_fn(model, x, y))
    """
    t0 = time.perf_counter()
    outputs: Dict[str, torch.Tensor] = {}
    wrong = {}
    if probe is not None and "triton" in candidates:
        why = check_kernels(probe, modules)
        if world > 1:  # ours out on every rank or none: under FSDP a rank timing it alone
            whys = [w for w in all_ranks(why, world) if w is not None]  # would wait in vain
            why = whys[0] if whys else None
        if why is not None:
            wrong["triton"] = why
    results = time_backends(step, modules, [b for b in candidates if b not in wrong], device,
                            start=start, outputs=outputs)
    check_outputs(results, outputs, rtol=rtol)
    results = {b: wrong.get(b, results.get(b)) for b in candidates}
    chosen, merged = agree_fastest(results, world)
    set_backend(modules, chosen)
    return chosen, merged, time.perf_counter() - t0


def device_name(device: torch.device) -> str:
    """The card's name (what a saved choice is kept for), or the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def timing_note(unit: str, device: torch.device, seconds: float) -> str:
    """How the choice was made, for describe_choice."""
    return (f"timed over {TRIAL_STEPS} {unit} after {TRIAL_WARMUP} warm-up on "
            f"{device_name(device)} in {seconds:.0f} s")


def describe_choice(chosen: str, merged: Dict[str, object], how: str,
                    per: str = "forward + backward") -> str:
    """'backend auto: <chosen> (<chosen> <ms> ms, <other> <ms> ms | failed (<error>) per
    <per>, <how>; --backend triton or torch to fix it)'."""
    parts = [f"{b} {v:.1f} ms" if not isinstance(v, str) else f"{b} failed ({v})"
             for b, v in sorted(merged.items(), key=lambda kv: kv[0] != chosen)]
    return (f"backend auto: {chosen} ({', '.join(parts)} per {per}, {how}; "
            f"--backend {' or '.join(TRIAL_BACKENDS)} to fix it)")
