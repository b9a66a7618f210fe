"""tmsa_attention benchmark: forward, backward and forward+backward at DiffiT's shapes.

Providers (every row's gradient includes the bias table, or the dense bias, where it has one):
    tmsa           diffit_kernels.tmsa_attention (Triton): the table expanded into per-head
                   slabs of gw x gw matrices, one per relative grid row (global grids whose width
                   is a power of two >= 16), or gathered in-kernel (windows; global grids where
                   the card timed the gather faster at the shape's first forward: autotune.csv,
                   kind table), d_table reduced deterministically
    tmsa-shares    the same with the backward plan forced (_attention_plans.BWD_PLAN; tmsa times the
    tmsa-samples   plans a shape can take at its first backward and keeps the fastest, whose
    tmsa-separate  times autotune.csv lists): "shares" sums dS into the table in the dK/dV pass
    tmsa-separate-64  over a few read-modify-written batch shares, "samples" over one share
    tmsa-wide      per sample (one launch of stores), "separate" in a pass of its own
                   ("separate-64" on 64x64 tiles), "wide" runs 8x8 windows through the fused
                   backward at one window per 64-wide tile.
                   Backward rows only, at shapes with more than one plan, for each plan the
                   shape has: the rows that check the choice tmsa made
    tmsa-gather    global shapes: the table gathered per score element in every kernel, never
                   read through its slabs (attention.SLAB_MAX_BYTES = 0, what other grids
                   run): the A/B row of the slabs, which checks tmsa's choice
    sdpa-membias   SDPA, memory-efficient backend forced, dense bias built from the table that
                   requires grad (its backward writes a dense bias gradient); the bias is made
                   contiguous [1, H, n, n] and expanded over the batch (stride 0), so SDPA need not
                   pad a copy of it, while the dense [B, H, n, n] gradient stays its own cost
    flex           FlexAttention compiled (static shapes), score_mod reading the table (its
                   learnable-bias path: the table's gradient is an atomic scatter); one score_mod
                   and one block mask per shape, and Dynamo's cache is cleared between shapes, so
                   every shape runs compiled (past Dynamo's recompile limit flex would silently
                   run its unfused eager path); windowed shapes use a block mask on the natural
                   token order
    eager          diffit_kernels.reference.tmsa_attention (plain PyTorch)
    sdpa-flash     SDPA flash backend with no bias at all: the speed-of-light row (windowed
                   shapes: on the windows partitioned outside the timed call)
    memory limit   not timed: the least the pass must move at the copy bandwidth measured in the
                   same run (forward reads q, k, v and writes o; backward reads q, k, v, o, dO and
                   writes dq, dk, dv; the table is negligible); `gbytes` holds the bytes
Run order: the speed-of-light rows first, then tmsa, SDPA dense bias and eager at every shape,
then Flex (two compiles per shape) at every shape, so a spent time budget skips Flex first; the
speed-of-light rows have a reserve the budget cannot take (common.SPEED_OF_LIGHT_RESERVE_S).
The CSV lists rows by shape.
TFLOP/s follow FlashAttention's convention: forward 4 * B * H * N * keys * d (keys = the tokens a
query attends to: N, or the window's), backward 2.5x that, forward+backward 3.5x.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16|fp16|fp32] [--out DIR]
Without CUDA it prints why and exits 0; `run(tiny_cpu=True)` runs the same code path on CPU at
tiny sizes against the reference provider only (the harness test); `providers=` picks others.
A provider that fails at a shape (CUDA out of memory, a backend that refuses the head dim or
dtype, fp32 for flash) is a row with its error; cases after the run's time budget are rows
saying they were skipped. The CSV is rewritten after every shape.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (after_error, attention_setting, bench, bench_main,  # noqa: E402
                               compiled, cuda_or_explain, environment, error_text, last_timing,
                               out_of_time, peak_memory_mb, plot, results_dir, skipped_text,
                               write_csv)
from benchmarks.peak import copy_gbps  # noqa: E402
from diffit_kernels import reference  # noqa: E402
from diffit_kernels import tmsa_attention  # noqa: E402
from diffit_kernels import _attention_plans  # noqa: E402

# (label, B, H, grid, window, d). Batch sizes of the windowed rows are ours (the paper's
# image-space models train at batch 256-512 on 8 GPUs): they keep a run within seconds.
# latent256: DiffiT-XL/2 at 256 px (16x16 tokens, table 961 x 16); latent512: 512 px (32x32
# tokens, table 3969 x 16), B8 in --quick; img*: image-space windows of 4x4 and 8x8 tokens.
SHAPES = [
    ("latent256-B64", 64, 16, (16, 16), None, 72),
    ("latent512-B8", 8, 16, (32, 32), None, 72),
    ("img32-win4-B64", 64, 16, (32, 32), (4, 4), 72),
    ("img64-win8-B16", 16, 16, (64, 64), (8, 8), 72),
    ("latent256-B256", 256, 16, (16, 16), None, 72),
    ("latent512-B32", 32, 16, (32, 32), None, 72),
]
QUICK = ("latent256-B64", "latent512-B8", "img32-win4-B64", "img64-win8-B16")
TINY_CPU = [("tiny-global", 1, 2, (4, 4), None, 16), ("tiny-win", 1, 2, (4, 4), (2, 2), 16)]
MODES = ("fwd", "bwd", "fwd+bwd")
# run order: speed of light first; flex (two compiles per shape) last, after every shape
PROVIDERS = ("sdpa-flash", "memory limit", "tmsa", "tmsa-shares", "tmsa-samples", "tmsa-separate",
             "tmsa-separate-64", "tmsa-wide", "tmsa-gather",
             "sdpa-membias",
             "eager",
             "flex")
SPEED_OF_LIGHT = ("sdpa-flash", "memory limit")
# the backward plan each plan row forces (_attention_plans.BWD_PLAN): backward rows only (the
# forward is tmsa's), at shapes with several plans, for the plans the shape has
PLAN_ROWS = {"tmsa-shares": "shares", "tmsa-samples": "samples", "tmsa-separate": "separate",
             "tmsa-separate-64": "separate-64", "tmsa-wide": "wide"}
SLOW = ("flex",)           # run at every shape after the others have run at every shape
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(B, H, grid, window, d, dtype, device):
    N = grid[0] * grid[1]
    gh, gw = window or grid
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    table = (torch.randn((2 * gh - 1) * (2 * gw - 1), H, generator=g) * 0.02).to(
        device=device, dtype=dtype).requires_grad_()
    return q, k, v, table


def _partition(t, grid, window):
    """[B, H, N, d] -> [B * nW, H, n, d]: the window layout SDPA / flash need (not timed)."""
    B, H, N, d = t.shape
    (Gh, Gw), (gh, gw) = grid, window
    t = t.reshape(B, H, Gh // gh, gh, Gw // gw, gw, d).permute(0, 2, 4, 1, 3, 5, 6)
    return t.reshape(-1, H, gh * gw, d)


def _dense_bias(table, gh, gw):
    """[1, H, n, n] contiguous, built from the table on every call (its gradient flows back)."""
    n, H = gh * gw, table.shape[1]
    idx = reference.relative_position_index(gh, gw, table.device)
    return table[idx.view(-1)].view(n, n, H).permute(2, 0, 1).contiguous()[None]


def _sdpa_membias(gh, gw, backend=None):
    """SDPA with the dense bias; `backend` defaults to the memory-efficient kernel (tests on
    CPU pass the math backend to check the bias and the window partition)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    backend = SDPBackend.EFFICIENT_ATTENTION if backend is None else backend

    def sdpa_membias(q, k, v, table):
        bias = _dense_bias(table, gh, gw).expand(q.shape[0], -1, -1, -1)   # [B, H, n, n]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return sdpa_membias


def _sdpa_flash(backend=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    backend = SDPBackend.FLASH_ATTENTION if backend is None else backend

    def sdpa_flash(q, k, v, table):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return sdpa_flash


def _providers(grid, window, names) -> Dict[str, Callable]:
    """name -> f(q, k, v, table) -> o, for the names asked. Window partitioning for SDPA /
    flash happens outside (_measure)."""
    gh, gw = window or grid
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers must be among {PROVIDERS}, got {unknown}")

    def tmsa(q, k, v, table):
        return tmsa_attention(q, k, v, table=table, grid=grid, window=window, backend="triton")

    def eager(q, k, v, table):
        return reference.tmsa_attention(q, k, v, table=table, grid=grid, window=window)

    if "tmsa-gather" in names and window is not None:
        raise ValueError("tmsa-gather is a global-attention row: windows always gather (= tmsa)")
    make = {"tmsa": lambda: tmsa, "tmsa-gather": lambda: tmsa,
            **{name: (lambda: tmsa) for name in PLAN_ROWS},
            "eager": lambda: eager,
            "memory limit": lambda: None,
            "sdpa-membias": lambda: _sdpa_membias(gh, gw), "sdpa-flash": _sdpa_flash,
            "flex": lambda: _flex(grid, window)}
    return {n: make[n]() for n in names}


def flex_score_mod(table, grid, window):
    """score + table[rel(q, k), h]: Swin's relative index computed from the token indices,
    reading `table` [R, H] itself (captured, so flex returns its gradient)."""
    Gw, (gh, gw) = grid[1], (window or grid)

    def score_mod(score, b, h, q_idx, kv_idx):
        qi, qj = q_idx // Gw, q_idx % Gw
        ki, kj = kv_idx // Gw, kv_idx % Gw
        rel = (qi % gh - ki % gh + gh - 1) * (2 * gw - 1) + (qj % gw - kj % gw + gw - 1)
        return score + table[rel, h]
    return score_mod


def _flex(grid, window, backend=None):
    """FlexAttention compiled once for this shape. The score_mod (and the windowed block mask)
    is built on the first call and reused while the same table comes in: Dynamo guards on the
    score_mod, and a stable one keeps the graphs at two (grad and no-grad)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Gw, (gh, gw) = grid[1], (window or grid)
    kw = {} if backend is None else {"backend": backend}
    flex = compiled(flex_attention, **kw)
    state: dict = {}

    def same_window(b, h, q_idx, kv_idx):
        return ((q_idx // Gw) // gh == (kv_idx // Gw) // gh) & \
            ((q_idx % Gw) // gw == (kv_idx % Gw) // gw)

    def f(q, k, v, table):
        N = q.shape[2]
        if state.get("table") is not table or state.get("N") != N:
            state.clear()
            state.update(table=table, N=N, score_mod=flex_score_mod(table, grid, window),
                         block_mask=None if window is None else create_block_mask(
                             same_window, None, None, N, N, device=q.device))
        return flex(q, k, v, score_mod=state["score_mod"], block_mask=state["block_mask"])
    return f


def _flops(B, H, grid, window, d) -> float:
    N = grid[0] * grid[1]
    keys = (window[0] * window[1]) if window else N
    return 4.0 * B * H * N * keys * d


# the library's setting each A/B provider changes (see the module docstring), and its value
_VARIANTS = {"tmsa-gather": ("attention", "SLAB_MAX_BYTES", 0),
             **{name: ("_attention_plans", "BWD_PLAN", plan) for name, plan in PLAN_ROWS.items()}}


def _variant(name):
    """The plan rows: every backward inside takes that plan; tmsa-gather: every kernel
    gathers from the [H, R] table."""
    return attention_setting(_VARIANTS.get(name))


def _shape_names(names, B, H, grid, window, d, dtype, device) -> List[str]:
    """names less the plan rows a shape has no use for: a plan it cannot take, or any plan
    where it has only one."""
    geometry = [*grid, *(window or grid)]
    plans = _attention_plans._plans_of(B, H, grid[0] * grid[1], d, dtype, geometry, device)
    return [n for n in names if n not in PLAN_ROWS or (len(plans) > 1 and PLAN_ROWS[n] in plans)]


def _measure(name, fn, q, k, v, table, grid, window, mode, tiny_cpu):
    with _variant(name):
        return _measure_pass(name, fn, q, k, v, table, grid, window, mode, tiny_cpu)


def _measure_pass(name, fn, q, k, v, table, grid, window, mode, tiny_cpu):
    if name in ("sdpa-flash",) and window is not None:
        q, k, v = (_partition(t.detach(), grid, window).requires_grad_() for t in (q, k, v))
    if name in ("sdpa-membias",) and window is not None:
        q, k, v = (_partition(t.detach(), grid, window).requires_grad_() for t in (q, k, v))
    leaves = [q, k, v] + ([] if name == "sdpa-flash" else [table])
    warm = dict(warmup=1, rep=3) if tiny_cpu else {}
    if mode == "fwd":
        call = lambda: fn(q, k, v, table)  # noqa: E731
        with torch.no_grad():
            ms = bench(call, graph=True, **warm)
            mem = peak_memory_mb(call)
    elif mode == "bwd":
        o = fn(q, k, v, table)
        do = torch.randn_like(o)
        call = lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)  # noqa: E731
        ms = bench(call, grad_to_none=leaves, graph=True, **warm)
        mem = peak_memory_mb(call)
    else:
        def call():
            o = fn(q, k, v, table)
            return torch.autograd.grad(o, leaves, torch.ones_like(o))
        ms = bench(call, grad_to_none=leaves, graph=True, **warm)
        mem = peak_memory_mb(call)
    return ms, mem


def traffic_bytes(B, H, grid, d, elsize, mode) -> float:
    """The least a pass must move: fwd reads q, k, v and writes o (4 tensors of [B, H, N, d]);
    bwd reads q, k, v, o, dO and writes dq, dk, dv (8); fwd+bwd both (12)."""
    N = grid[0] * grid[1]
    return {"fwd": 4, "bwd": 8, "fwd+bwd": 12}[mode] * B * H * N * d * elsize


def _row(label, B, H, grid, window, d, dtype, name, mode) -> dict:
    return dict(shape=label, B=B, H=H, N=grid[0] * grid[1],
                window="x".join(map(str, window)) if window else "global", d=d,
                dtype=str(dtype).split(".")[-1], provider=name, mode=mode)


def by_shape(rows: List[dict], shapes) -> List[dict]:
    """rows in table order: by shape, provider (speed of light first), mode."""
    sh = {s[0]: i for i, s in enumerate(shapes)}
    pr = {p: i for i, p in enumerate(PROVIDERS)}
    mo = {m: i for i, m in enumerate(MODES)}
    return sorted(rows, key=lambda r: (sh.get(r["shape"], 0), pr.get(r["provider"], 0),
                                       mo.get(r["mode"], 0)))


def _run_shape(label, B, H, grid, window, d, dtype, device, names, env, tiny_cpu
               ) -> List[dict]:
    """The rows of `names` at one shape (inputs built once, freed after)."""
    # flex_attention's compiled graphs from the last shape would count against Dynamo's
    # recompile limit for this one
    torch._dynamo.reset()
    flops = _flops(B, H, grid, window, d)
    names = _shape_names(names, B, H, grid, window, d, dtype, device)
    provs, errs, rows = {}, {}, []
    q = k = v = table = None
    timed = [n for n in names if n != "memory limit"]
    if timed and not all(out_of_time(speed_of_light=n in SPEED_OF_LIGHT) for n in timed):
        try:
            q, k, v, table = _inputs(B, H, grid, window, d, dtype, device)
        except Exception as e:  # noqa: BLE001 - the shape's rows say why, the next shape runs
            errs = dict.fromkeys(timed, error_text(e))
            after_error()
    for name in timed:
        if name not in errs:
            try:
                provs[name] = _providers(grid, window, [name])[name]
            except Exception as e:  # noqa: BLE001 - e.g. no FlexAttention in this PyTorch
                errs[name] = error_text(e)
    for name in names:
        for mode in MODES:
            if mode != "bwd" and name in PLAN_ROWS:
                continue
            row = _row(label, B, H, grid, window, d, dtype, name, mode)
            nan = float("nan")
            row.update(ms=nan, tflops=nan, peak_mb=nan, error="")
            scale = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
            if name == "memory limit":
                nbytes = traffic_bytes(B, H, grid, d, torch.tensor([], dtype=dtype)
                                       .element_size(), mode)
                try:
                    ms = nbytes / (copy_gbps(device, tiny_cpu) * 1e9) * 1e3
                    row.update(ms=float(f"{ms:.4g}"), gbytes=float(f"{nbytes / 1e9:.4g}"),
                               tflops=float(f"{flops * scale / ms / 1e9:.4g}"), computed=True,
                               timing="computed")
                except Exception as e:  # noqa: BLE001 - the copy could not be measured
                    row["error"] = error_text(e)
            elif out_of_time(speed_of_light=name in SPEED_OF_LIGHT):
                row["error"] = skipped_text()
            elif name not in provs:
                row["error"] = errs.get(name) or skipped_text()
            else:
                try:
                    ms, mem = _measure(name, provs[name], q, k, v, table, grid, window, mode,
                                       tiny_cpu)
                    row.update(ms=float(f"{ms:.4g}"),
                               tflops=float(f"{flops * scale / ms / 1e9:.4g}"),
                               peak_mb=float(f"{mem:.4g}"), timing=last_timing())
                except Exception as e:  # noqa: BLE001 - a provider that cannot run a shape
                    row["error"] = error_text(e)  # is a row, not the end of the run
                    del e
                    after_error()
            row.update({f"env_{k}": v for k, v in env.items()})
            rows.append(row)
            print(f"{label:16} {name:16} {mode:8} {row['ms']:>9} ms {row['tflops']:>8} "
                  f"TFLOP/s {row['peak_mb']:>9} MB {row['error']}", flush=True)
    q = k = v = table = provs = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(quick: bool = False, dtype=torch.bfloat16, out_dir: Optional[str] = None,
        tiny_cpu: bool = False, providers: Optional[Sequence[str]] = None) -> List[dict]:
    """Time every provider at every shape and mode; write CSV + plots; return the rows.

    providers: default all of PROVIDERS on CUDA, ["eager"] with tiny_cpu."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if not tiny_cpu and not cuda_or_explain("bench_attention"):
        return []
    device = torch.device("cpu" if tiny_cpu else "cuda")
    shapes = TINY_CPU if tiny_cpu else [s for s in SHAPES if not quick or s[0] in QUICK]
    names = list(providers) if providers else (["eager"] if tiny_cpu else list(PROVIDERS))
    if any(n not in PROVIDERS for n in names):
        raise ValueError(f"providers must be among {PROVIDERS}, got {names}")
    names = sorted(dict.fromkeys(names), key=PROVIDERS.index)  # speed of light first
    env = environment()
    out = results_dir(out_dir)
    tag = str(dtype).split(".")[-1]
    rows: List[dict] = []
    phases = [[n for n in names if n not in SLOW], [n for n in names if n in SLOW]]
    for phase in (ph for ph in phases if ph):
        for label, B, H, grid, window, d in shapes:
            rows += _run_shape(label, B, H, grid, window, d, dtype, device, phase, env,
                               tiny_cpu)
            # rewritten after every shape: a killed run keeps the shapes done
            write_csv(out / f"attention_{tag}.csv", by_shape(rows, shapes))
    for mode in MODES:
        sub = [r for r in rows if r["mode"] == mode]
        plot(out / f"attention_{tag}_{mode.replace('+', '_')}.png", sub, x="shape", y="ms",
             line="provider", title=f"tmsa_attention {mode} ({tag}, {env['card']})",
             ylabel="ms (lower is better)")
    return rows


def main(argv=None) -> int:
    return bench_main(run, __doc__, "two shapes only (latent 256 px at B64, 4x4 windows)",
                      DTYPES, argv)


if __name__ == "__main__":
    sys.exit(main())
