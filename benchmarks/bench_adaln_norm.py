"""adaln_norm benchmark: forward, backward, forward+backward at DiffiT shapes (C = 1152).

Providers: ours (the fused Triton kernel), eager (diffit_kernels.reference), compile
(torch.compile of the reference). GB/s counts the bytes a fused kernel must move at least:
forward reads x (+ residual) and writes y (+ h); backward reads dy, x (+ residual, + dh) and
writes dx (+ dresidual). The [B, C] modulation vectors are negligible and not counted.

    python -m benchmarks.bench_adaln_norm [--quick] [--dtype bf16] [--out DIR]
"""
from __future__ import annotations

from typing import List, Optional

import torch

from benchmarks.common import (bench, bench_main, cuda_or_explain, environment, plot, results_dir,
                               write_csv)

VARIANTS = {  # name -> (residual, gate, shift+scale, silu)
    "plain": (False, False, False, False),
    "mod": (False, False, True, False),
    "res+gate+mod+silu": (True, True, True, True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(M: int, C: int, variant: str, dtype, device, B: int = 32):
    residual, gate, mod, _ = VARIANTS[variant]
    N = M // B
    t = {"x": torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)}
    if residual:
        t["residual"] = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
    # shift / scale / gate as chunks of one [B, 3C] projection, as DiT-style blocks make them
    proj = (torch.randn(B, 3 * C, device=device, dtype=dtype) * 0.1).requires_grad_()
    sh, sc, g = proj.chunk(3, dim=1)
    if mod:
        t["shift"], t["scale"] = sh, sc
    if gate:
        t["gate"] = g
    return t, [v for v in (t["x"], t.get("residual"), proj) if v is not None]


def _bytes(M: int, C: int, variant: str, elsize: int, pass_: str) -> float:
    residual = VARIANTS[variant][0]
    fwd = (2 + 2 * residual) * M * C * elsize
    bwd = (3 + 3 * residual) * M * C * elsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _call(provider: str, variant: str):
    import diffit_kernels
    from diffit_kernels import reference

    silu = VARIANTS[variant][3]

    def ours(t):
        return diffit_kernels.adaln_norm(**t, activation="silu" if silu else None, backend="triton")

    def eager(t):
        return reference.adaln_norm(**t, activation="silu" if silu else None)

    if provider == "ours":
        return ours
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager)
    raise ValueError(provider)


def _time(fn, t, leaves, pass_: str) -> float:
    def fwd():
        return fn(t)

    out = fwd()
    outs = list(out) if isinstance(out, tuple) else [out]
    dys = [torch.randn_like(o) for o in outs]
    if pass_ == "fwd":
        with torch.no_grad():
            return bench(fwd)
    if pass_ == "bwd":
        return bench(lambda: torch.autograd.backward(outs, dys, retain_graph=True),
                     grad_to_none=leaves)
    return bench(lambda: torch.autograd.backward(list(_as_list(fwd())), dys), grad_to_none=leaves)


def _as_list(out):
    return out if isinstance(out, tuple) else (out,)


def run(quick: bool = False, dtype: str = "bf16", out_dir: Optional[str] = None,
        tiny_cpu: bool = False) -> List[dict]:
    """Time every (rows, variant, provider, pass); write CSV + plot; return the rows."""
    if tiny_cpu:  # the harness on CPU at a tiny size, reference provider only (CI)
        device, sizes, providers, C = torch.device("cpu"), [256], ["eager"], 64
    else:
        if not cuda_or_explain("bench_adaln_norm"):
            return []
        device, C = torch.device("cuda"), 1152
        sizes = [65536] if quick else [8192, 65536]
        providers = ["ours", "eager", "compile"]
    dt = DTYPES[dtype]
    env = environment()
    rows = []
    for M in sizes:
        for variant in VARIANTS:
            for provider in providers:
                fn = _call(provider, variant)
                for pass_ in ("fwd", "bwd", "fwd+bwd"):
                    t, leaves = _inputs(M, C, variant, dt, device, B=32 if M >= 32 * 8 else 1)
                    ms = _time(fn, t, leaves, pass_)
                    gbs = _bytes(M, C, variant, t["x"].element_size(), pass_) / (ms * 1e-3) / 1e9
                    rows.append(dict(op="adaln_norm", case=f"M{M} C{C} {variant}", rows=M, C=C,
                                     variant=variant, provider=provider, dtype=dtype,
                                     **{"pass": pass_}, ms=round(ms, 5), gbps=round(gbs, 1),
                                     card=env["card"], torch=env["torch"],
                                     triton=env["triton"]))
                    print(f"adaln_norm {rows[-1]['case']:32} {provider:8} {pass_:8} "
                          f"{ms:9.4f} ms {gbs:8.1f} GB/s")
    d = results_dir(out_dir)
    write_csv(d / "adaln_norm.csv", rows)
    plot(d / "adaln_norm.png", [r for r in rows if r["rows"] == max(sizes)], x="variant",
         y="gbps", line="provider", panel="pass",
         title=f"adaln_norm {dtype}, {max(sizes)} rows x C={C} ({env['card']})", ylabel="GB/s")
    return rows


def main(argv=None) -> int:
    return bench_main(run, __doc__, "only the 65536-row shape", DTYPES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
