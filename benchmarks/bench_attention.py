"""tmsa_attention benchmark: forward, backward and forward+backward at DiffiT's shapes.

Providers (every row's gradient includes the bias table, or the dense bias, where it has one):
    tmsa           diffit_kernels.tmsa_attention (Triton): table gathered in-kernel, d_table
                   reduced deterministically
    sdpa-membias   SDPA, memory-efficient backend forced, dense bias built from the table that
                   requires grad (its backward writes a dense bias gradient)
    flex           FlexAttention compiled, score_mod reading the table (its learnable-bias path)
    eager          diffit_kernels.reference.tmsa_attention (plain PyTorch)
    sdpa-flash     SDPA flash backend with no bias at all: the speed-of-light row
TFLOP/s follow FlashAttention's convention: forward 4 * B * H * N * keys * d (keys = the tokens a
query attends to: N, or the window's), backward 2.5x that, forward+backward 3.5x.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16|fp16|fp32] [--out DIR]
Without CUDA it prints why and exits 0; `run(tiny_cpu=True)` runs the same code path on CPU at
tiny sizes against the reference provider only (the harness test).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (bench, bench_main, cuda_or_explain, environment,  # noqa: E402
                               peak_memory_mb, plot, results_dir, write_csv)
from diffit_kernels import reference  # noqa: E402
from diffit_kernels import tmsa_attention  # noqa: E402

# (label, B, H, grid, window, d). Batch sizes of the windowed rows are ours (the paper's
# image-space models train at batch 256-512 on 8 GPUs): they keep a run within seconds.
SHAPES = [
    ("latent256-B64", 64, 16, (16, 16), None, 72),
    ("latent256-B256", 256, 16, (16, 16), None, 72),
    ("latent512-B32", 32, 16, (32, 32), None, 72),
    ("img64-win8-B16", 16, 16, (64, 64), (8, 8), 72),
    ("img32-win4-B64", 64, 16, (32, 32), (4, 4), 72),
]
QUICK = ("latent256-B64", "img32-win4-B64")
TINY_CPU = [("tiny-global", 1, 2, (4, 4), None, 16), ("tiny-win", 1, 2, (4, 4), (2, 2), 16)]
MODES = ("fwd", "bwd", "fwd+bwd")
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
    n, H = gh * gw, table.shape[1]
    idx = reference.relative_position_index(gh, gw, table.device)
    return table[idx.view(-1)].view(n, n, H).permute(2, 0, 1)[None]          # [1, H, n, n]


def _providers(grid, window, tiny_cpu: bool) -> Dict[str, Callable]:
    """name -> f(q, k, v, table) -> o. Window partitioning for SDPA / flash happens outside."""
    gh, gw = window or grid

    def tmsa(q, k, v, table):
        return tmsa_attention(q, k, v, table=table, grid=grid, window=window, backend="triton")

    def eager(q, k, v, table):
        return reference.tmsa_attention(q, k, v, table=table, grid=grid, window=window)

    if tiny_cpu:
        return {"eager": eager}

    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    def sdpa_membias(q, k, v, table):
        bias = _dense_bias(table, gh, gw).expand(q.shape[0], -1, -1, -1)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def sdpa_flash(q, k, v, table):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    provs = {"tmsa": tmsa, "sdpa-membias": sdpa_membias, "flex": _flex(grid, window),
             "eager": eager, "sdpa-flash": sdpa_flash}
    return provs


def _flex(grid, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    (Gh, Gw), (gh, gw) = grid, (window or grid)
    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def f(q, k, v, table):
        tab = table.t()                                              # [H, R], grad flows

        def coords(idx):
            return idx // Gw, idx % Gw

        def score_mod(score, b, h, q_idx, kv_idx):
            qi, qj = coords(q_idx)
            ki, kj = coords(kv_idx)
            rel = (qi % gh - ki % gh + gh - 1) * (2 * gw - 1) + (qj % gw - kj % gw + gw - 1)
            return score + tab[h, rel]

        block_mask = None
        if window is not None:
            key = (q.shape[2], q.device)
            if key not in cache:
                def same_window(b, h, q_idx, kv_idx):
                    qi, qj = coords(q_idx)
                    ki, kj = coords(kv_idx)
                    return (qi // gh == ki // gh) & (qj // gw == kj // gw)
                cache[key] = create_block_mask(same_window, None, None, q.shape[2], q.shape[2],
                                               device=q.device)
            block_mask = cache[key]
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return f


def _flops(B, H, grid, window, d) -> float:
    N = grid[0] * grid[1]
    keys = (window[0] * window[1]) if window else N
    return 4.0 * B * H * N * keys * d


def _measure(name, fn, q, k, v, table, grid, window, mode, tiny_cpu):
    if name in ("sdpa-flash",) and window is not None:
        q, k, v = (_partition(t.detach(), grid, window).requires_grad_() for t in (q, k, v))
    if name in ("sdpa-membias",) and window is not None:
        q, k, v = (_partition(t.detach(), grid, window).requires_grad_() for t in (q, k, v))
    leaves = [q, k, v] + ([] if name == "sdpa-flash" else [table])
    warm = dict(warmup=1, rep=3) if tiny_cpu else {}
    if mode == "fwd":
        call = lambda: fn(q, k, v, table)  # noqa: E731
        with torch.no_grad():
            ms = bench(call, **warm)
            mem = peak_memory_mb(call)
    elif mode == "bwd":
        o = fn(q, k, v, table)
        do = torch.randn_like(o)
        call = lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)  # noqa: E731
        ms = bench(call, grad_to_none=leaves, **warm)
        mem = peak_memory_mb(call)
    else:
        def call():
            o = fn(q, k, v, table)
            return torch.autograd.grad(o, leaves, torch.ones_like(o))
        ms = bench(call, grad_to_none=leaves, **warm)
        mem = peak_memory_mb(call)
    return ms, mem


def run(quick: bool = False, dtype=torch.bfloat16, out_dir: Optional[str] = None,
        tiny_cpu: bool = False) -> List[dict]:
    """Time every provider at every shape and mode; write CSV + plots; return the rows."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if not tiny_cpu and not cuda_or_explain("bench_attention"):
        return []
    device = torch.device("cpu" if tiny_cpu else "cuda")
    shapes = TINY_CPU if tiny_cpu else [s for s in SHAPES if not quick or s[0] in QUICK]
    env = environment()
    rows = []
    for label, B, H, grid, window, d in shapes:
        q, k, v, table = _inputs(B, H, grid, window, d, dtype, device)
        flops = _flops(B, H, grid, window, d)
        for name, fn in _providers(grid, window, tiny_cpu).items():
            for mode in MODES:
                row = dict(shape=label, B=B, H=H, N=grid[0] * grid[1],
                           window="x".join(map(str, window)) if window else "global", d=d,
                           dtype=str(dtype).split(".")[-1], provider=name, mode=mode)
                try:
                    ms, mem = _measure(name, fn, q, k, v, table, grid, window, mode, tiny_cpu)
                    scale = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
                    tflops = flops * scale / ms / 1e9
                    row.update(ms=float(f"{ms:.4g}"), tflops=float(f"{tflops:.4g}"),
                               peak_mb=float(f"{mem:.4g}"), error="")
                except Exception as e:  # a provider that cannot run a shape is a row, not a crash
                    row.update(ms=float("nan"), tflops=float("nan"), peak_mb=float("nan"),
                               error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows.append(row)
                print(f"{label:16} {name:13} {mode:8} {row['ms']:>9} ms {row['tflops']:>8} "
                      f"TFLOP/s {row['peak_mb']:>9} MB {row['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r.update({f"env_{k}": v for k, v in env.items()})
    out = results_dir(out_dir)
    tag = str(dtype).split(".")[-1]
    write_csv(out / f"attention_{tag}.csv", rows)
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
