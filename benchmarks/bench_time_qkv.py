"""time_qkv benchmark: forward, backward, forward+backward at DiffiT-XL's projection shapes.

Providers:
    ours      diffit_kernels.time_qkv: a Triton LayerNorm row kernel, then one cuBLAS GEMM onto
              bias + time term, q, k, v as head-split views; backward dW and dX-hat on cuBLAS
              with the LayerNorm backward and the bias / time-term sums in Triton
    eager     diffit_kernels.reference.time_qkv: LayerNorm + Linear + Linear + add + permute
    compile   torch.compile of the eager sequence (static shapes, compiled afresh for each
              shape and variant)
    cublas    the bare GEMMs of the same size, nothing else (speed of light): fwd x[M, C] @ W^T
              (M x C -> 3C'), dX g[M, 3C'] @ W (M x 3C' -> C), dW g^T @ x (3C' x M -> C), bwd
              dX then dW, fwd+bwd all three; the goal is stated against each of them
Variants: "ln+temb" (LayerNorm fused, DiffiT's block) and "temb" (x already normalised: the
official DiffiTAttention contract). TFLOP/s count the projection GEMM only, 2 * M * C * 3C'
forward and twice that backward, for every provider; the incoming gradients are three separate
[B, H, N, d] tensors, as an attention backward hands them over.

--quick: the B256 x 256-token shape and the "ln+temb" variant only (two compiled graphs).
Run order: the speed-of-light rows (cublas) first, then ours, eager, and compile last at every
shape, so a spent time budget skips the slow baseline first; cublas rows have a reserve the
budget cannot take (common.SPEED_OF_LIGHT_RESERVE_S). The CSV lists rows by case.
A case that fails is a row with its error; cases after the run's time budget are rows saying
they were skipped; compile rows record Dynamo's graphs and graph breaks for them.

    python benchmarks/bench_time_qkv.py [--quick] [--dtype bf16|fp16|fp32] [--out DIR]
Without CUDA it prints why and exits 0; `run(tiny_cpu=True)` runs the same code path on CPU at
a tiny size against the reference provider only (the harness test); `providers=` picks others.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (after_error, bench, bench_main, compile_counts,  # noqa: E402
                               compiled, counts_since, cuda_or_explain, environment, error_text,
                               last_timing, out_of_time, peak_memory_mb, plot, results_dir,
                               skipped_text, write_csv)
from diffit_kernels import reference, time_qkv  # noqa: E402

# (label, B, N, C, H, Ct): DiffiT-XL/2 at 256 px (32x32 latents, patch 2 -> 256 tokens) and
# 512 px (1024 tokens), both 65536 rows, plus a smaller batch
SHAPES = [
    ("xl256-B256", 256, 256, 1152, 16, 1152),
    ("xl512-B64", 64, 1024, 1152, 16, 1152),
    ("xl256-B32", 32, 256, 1152, 16, 1152),
]
QUICK = ("xl256-B256",)
TINY_CPU = [("tiny", 2, 16, 64, 4, 32)]
VARIANTS = {"ln+temb": 1e-6, "temb": None}  # name -> norm_eps
QUICK_VARIANTS = ("ln+temb",)
PROVIDERS = ("cublas", "ours", "eager", "compile")  # run order: speed of light first
PASSES = ("fwd", "bwd", "fwd+bwd")
CUBLAS_PASSES = ("fwd", "dX", "dW", "bwd", "fwd+bwd")  # one bare GEMM each, then sums
GEMMS = {"fwd": 1, "dX": 1, "dW": 1, "bwd": 2, "fwd+bwd": 3}  # projection GEMMs in a pass
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(B, N, C, H, Ct, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype) \
            .requires_grad_()

    t = {"x": r(B, N, C), "temb": r(B, Ct), "weight": r(3 * C, C, scale=C ** -0.5),
         "bias": r(3 * C, scale=0.02), "temb_weight": r(3 * C, Ct, scale=Ct ** -0.5),
         "temb_bias": r(3 * C, scale=0.02)}
    d = C // H
    dys = [torch.randn(B, H, N, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    return t, dys


def _provider(name: str, H: int, eps: Optional[float]) -> Callable:
    def ours(t):
        return time_qkv(**t, num_heads=H, norm_eps=eps, backend="triton")

    def eager(t):
        return reference.time_qkv(**t, num_heads=H, norm_eps=eps)

    if name == "ours":
        return ours
    if name == "eager":
        return eager
    if name == "compile":
        torch._dynamo.reset()  # each (shape, variant) compiles afresh: no recompile chain
        return compiled(eager)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")


def _time(fn, t: Dict[str, torch.Tensor], dys, pass_: str) -> Tuple[float, float]:
    """(median ms, peak MB of one call: fwd+bwd only, NaN otherwise)."""
    leaves = list(t.values())
    if pass_ == "fwd":
        with torch.no_grad():
            return bench(lambda: fn(t), graph=True), float("nan")
    if pass_ == "bwd":
        outs = list(fn(t))
        return bench(lambda: torch.autograd.backward(outs, dys, retain_graph=True),
                     grad_to_none=leaves, graph=True), float("nan")

    def step():
        torch.autograd.backward(list(fn(t)), dys)

    ms = bench(step, grad_to_none=leaves, graph=True)
    for v in leaves:
        v.grad = None
    return ms, peak_memory_mb(step)


def _time_cublas(t, dys, pass_: str) -> float:
    """The projection's GEMMs alone: x2 [M, C] @ W^T forward; g @ W and g^T @ x2 backward."""
    x2 = t["x"].detach().reshape(-1, t["x"].shape[-1])
    w = t["weight"].detach()
    M = x2.shape[0]
    g = torch.cat([d.transpose(1, 2).reshape(M, -1) for d in dys], dim=1)  # [M, 3C'] once
    fwd = lambda: torch.matmul(x2, w.t())  # noqa: E731

    dx = lambda: torch.matmul(g, w)  # noqa: E731
    dw = lambda: torch.matmul(g.t(), x2)  # noqa: E731

    def bwd():
        dx()
        dw()

    def both():
        fwd()
        bwd()

    with torch.no_grad():
        return bench({"fwd": fwd, "dX": dx, "dW": dw, "bwd": bwd, "fwd+bwd": both}[pass_],
                     graph=True)


def by_case(rows: List[dict], shapes, variants) -> List[dict]:
    """rows in table order: by shape, variant, provider (speed of light first), pass."""
    sh = {s[0]: i for i, s in enumerate(shapes)}
    va = {v: i for i, v in enumerate(variants)}
    pr = {p: i for i, p in enumerate(PROVIDERS)}
    pa = {p: i for i, p in enumerate(CUBLAS_PASSES)}
    return sorted(rows, key=lambda r: (sh.get(r["shape"], 0), va.get(r["variant"], 0),
                                       pr.get(r["provider"], 0), pa.get(r["pass"], 0)))


def run(quick: bool = False, dtype: str = "bf16", out_dir: Optional[str] = None,
        tiny_cpu: bool = False, providers: Optional[Sequence[str]] = None) -> List[dict]:
    """Time every (shape, variant, provider, pass); write CSV + plot; return the rows.

    providers: default all of PROVIDERS on CUDA, ["eager"] with tiny_cpu."""
    if tiny_cpu:  # the harness on CPU at a tiny size, reference provider only (CI)
        device, shapes, variants = torch.device("cpu"), TINY_CPU, list(VARIANTS)
    else:
        if not cuda_or_explain("bench_time_qkv"):
            return []
        device = torch.device("cuda")
        shapes = [s for s in SHAPES if s[0] in QUICK] if quick else SHAPES
        variants = list(QUICK_VARIANTS if quick else VARIANTS)
    providers = list(providers) if providers else (["eager"] if tiny_cpu else list(PROVIDERS))
    if any(p not in PROVIDERS for p in providers):
        raise ValueError(f"providers must be among {PROVIDERS}, got {providers}")
    dt = DTYPES[dtype]
    env = environment()
    d = results_dir(out_dir)
    rows = []
    order = {p: i for i, p in enumerate(PROVIDERS)}
    for provider in sorted(providers, key=order.get):  # compile last, whatever was asked
        for label, B, N, C, H, Ct in shapes:
            M = B * N
            gemm_flop = 2.0 * M * C * 3 * C
            for variant in variants:
                eps = VARIANTS[variant]
                fn, err, before = None, "", compile_counts()
                for pass_ in CUBLAS_PASSES if provider == "cublas" else PASSES:
                    row = dict(op="time_qkv", case=f"{label} M{M} C{C} H{H}", shape=label,
                               rows=M, C=C, heads=H, Ct=Ct, variant=variant, provider=provider,
                               dtype=dtype, **{"pass": pass_}, ms=float("nan"),
                               tflops=float("nan"), peak_mb="", error="")
                    if out_of_time(speed_of_light=provider == "cublas"):
                        row["error"] = skipped_text()
                    elif err:
                        row["error"] = err  # the provider could not be built
                    else:
                        try:
                            if fn is None and provider != "cublas":
                                fn = _provider(provider, H, eps)
                            t, dys = _inputs(B, N, C, H, Ct, dt, device)
                            if provider == "cublas":
                                ms, peak = _time_cublas(t, dys, pass_), float("nan")
                            else:
                                ms, peak = _time(fn, t, dys, pass_)
                            flop = gemm_flop * GEMMS[pass_]
                            row.update(ms=float(f"{ms:.5g}"),
                                       tflops=float(f"{flop / (ms * 1e-3) / 1e12:.4g}"),
                                       peak_mb=round(peak, 1) if peak == peak else "",
                                       timing=last_timing())
                        except Exception as e:  # noqa: BLE001 - a row, not the end of the run
                            row["error"] = error_text(e)
                            err = row["error"] if fn is None and provider != "cublas" else ""
                            del e
                            after_error()
                        t = dys = None
                    if provider == "compile":
                        row.update(counts_since(before))
                    row.update(card=env["card"], torch=env["torch"], triton=env["triton"])
                    rows.append(row)
                    print(f"time_qkv {row['case']:32} {variant:8} {provider:8} {pass_:8} "
                          f"{row['ms']:9.4f} ms {row['tflops']:8.2f} TFLOP/s {row['error']}",
                          flush=True)
                fn = None
                # rewritten as it goes: a killed run keeps what it measured
                write_csv(d / "time_qkv.csv", by_case(rows, shapes, variants))
    first = shapes[0][0]
    plot(d / "time_qkv.png", [r for r in rows if r["shape"] == first], x="variant", y="tflops",
         line="provider", panel="pass",
         title=f"time_qkv {dtype}, {first} ({env['card']})", ylabel="TFLOP/s (projection GEMM)")
    return rows


def main(argv=None) -> int:
    return bench_main(run, __doc__, "only the B256 x 256-token shape and the ln+temb variant",
                      DTYPES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
