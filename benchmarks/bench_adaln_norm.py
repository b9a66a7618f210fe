"""adaln_norm benchmark: forward, backward, forward+backward at DiffiT shapes (C = 1152).

Providers: ours (the fused Triton kernel), eager (diffit_kernels.reference), compile
(torch.compile of the reference, static shapes, compiled afresh for each size and variant).
GB/s counts the bytes a fused kernel must move at least: forward reads x (+ residual) and
writes y (+ h); backward reads dy, x (+ residual, + dh) and writes dx (+ dresidual). The [B, C]
modulation vectors are negligible and not counted.

--quick: 65536 rows and the DiT-style variant (residual + gate + shift/scale + SiLU) only,
which keeps torch.compile to two graphs. A case that fails is a row with its error; cases
after the run's time budget are rows saying they were skipped. Compile rows record the graphs
and graph breaks Dynamo made for them (a clean baseline: 2 graphs, no breaks).

    python -m benchmarks.bench_adaln_norm [--quick] [--dtype bf16] [--out DIR]
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from benchmarks.common import (after_error, bench, bench_main, compiled, compile_counts,
                               counts_since, cuda_or_explain, environment, error_text,
                               last_timing, out_of_time, plot, results_dir, skipped_text,
                               write_csv)

VARIANTS = {  # name -> (residual, gate, shift+scale, silu)
    "plain": (False, False, False, False),
    "mod": (False, False, True, False),
    "res+gate+mod+silu": (True, True, True, True),
}
QUICK_VARIANTS = ("res+gate+mod+silu",)
PROVIDERS = ("ours", "eager", "compile")
PASSES = ("fwd", "bwd", "fwd+bwd")
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
        torch._dynamo.reset()  # each (size, variant) compiles afresh: no recompile chain
        return compiled(eager)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def _time(fn, t, leaves, pass_: str) -> float:
    def fwd():
        return fn(t)

    out = fwd()
    outs = list(out) if isinstance(out, tuple) else [out]
    dys = [torch.randn_like(o) for o in outs]
    if pass_ == "fwd":
        with torch.no_grad():
            return bench(fwd, graph=True)
    if pass_ == "bwd":
        return bench(lambda: torch.autograd.backward(outs, dys, retain_graph=True),
                     grad_to_none=leaves, graph=True)
    return bench(lambda: torch.autograd.backward(list(_as_list(fwd())), dys), grad_to_none=leaves,
                 graph=True)


def _as_list(out):
    return out if isinstance(out, tuple) else (out,)


def run(quick: bool = False, dtype: str = "bf16", out_dir: Optional[str] = None,
        tiny_cpu: bool = False, providers: Optional[Sequence[str]] = None) -> List[dict]:
    """Time every (rows, variant, provider, pass); write CSV + plot; return the rows.

    providers: default all of PROVIDERS on CUDA, ["eager"] with tiny_cpu."""
    if tiny_cpu:  # the harness on CPU at a tiny size, reference provider only (CI)
        device, sizes, C = torch.device("cpu"), [256], 64
        variants = list(VARIANTS)
    else:
        if not cuda_or_explain("bench_adaln_norm"):
            return []
        device, C = torch.device("cuda"), 1152
        sizes = [65536] if quick else [8192, 65536]
        variants = list(QUICK_VARIANTS if quick else VARIANTS)
    providers = list(providers) if providers else (["eager"] if tiny_cpu else list(PROVIDERS))
    if any(p not in PROVIDERS for p in providers):
        raise ValueError(f"providers must be among {PROVIDERS}, got {providers}")
    dt = DTYPES[dtype]
    env = environment()
    d = results_dir(out_dir)
    rows = []
    for M in sizes:
        for variant in variants:
            for provider in providers:
                fn, err, before = None, "", compile_counts()
                for pass_ in PASSES:
                    row = dict(op="adaln_norm", case=f"M{M} C{C} {variant}", rows=M, C=C,
                               variant=variant, provider=provider, dtype=dtype,
                               **{"pass": pass_}, ms=float("nan"), gbps=float("nan"), error="")
                    if out_of_time():
                        row["error"] = skipped_text()
                    elif err:
                        row["error"] = err  # the provider could not be built
                    else:
                        try:
                            if fn is None:
                                fn = _call(provider, variant)
                            t, leaves = _inputs(M, C, variant, dt, device,
                                                B=32 if M >= 32 * 8 else 1)
                            ms = _time(fn, t, leaves, pass_)
                            gbs = _bytes(M, C, variant, t["x"].element_size(), pass_) \
                                / (ms * 1e-3) / 1e9
                            row.update(ms=round(ms, 5), gbps=round(gbs, 1),
                                       timing=last_timing())
                        except Exception as e:  # noqa: BLE001 - a row, not the end of the run
                            row["error"] = error_text(e)
                            err = row["error"] if fn is None else ""
                            del e
                            after_error()
                        t = leaves = None
                    if provider == "compile":
                        row.update(counts_since(before))
                    row.update(card=env["card"], torch=env["torch"], triton=env["triton"])
                    rows.append(row)
                    print(f"adaln_norm {row['case']:32} {provider:8} {pass_:8} "
                          f"{row['ms']:9.4f} ms {row['gbps']:8.1f} GB/s {row['error']}",
                          flush=True)
                fn = None
            write_csv(d / "adaln_norm.csv", rows)  # a killed run keeps what it measured
    plot(d / "adaln_norm.png", [r for r in rows if r["rows"] == max(sizes)], x="variant",
         y="gbps", line="provider", panel="pass",
         title=f"adaln_norm {dtype}, {max(sizes)} rows x C={C} ({env['card']})", ylabel="GB/s")
    return rows


def main(argv=None) -> int:
    return bench_main(run, __doc__, "only the 65536-row shape and the DiT-style variant",
                      DTYPES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
