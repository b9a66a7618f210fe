"""Speed-of-light rows, measured in the same run as everything else on the same card.

    copy    dst.copy_(src), device to device: GB/s = 2 * bytes / time (one read + one write)
    gemm    torch.matmul of [M, K] x [K, N] (cuBLAS): TFLOP/s = 2 * M * N * K / time

The fastest size of each kind is the run's measured peak; summary.md states the other rows as
fractions of it (GB/s against copy bandwidth, TFLOP/s against the GEMM rate). Measured, not the
datasheet: a kernel that reaches 90% of what `copy_` reaches on this card is near the limit.

    python -m benchmarks.peak [--quick] [--dtype bf16] [--out DIR]
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from benchmarks.common import (bench, bench_main, cuda_or_explain, environment, plot,
                               results_dir, write_csv)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 2 ** 20


def sizes(quick: bool, tiny_cpu: bool) -> Dict[str, List[int]]:
    """Copy sizes in MiB and square GEMM sides. Copies are far above any L2 (50 MiB on H100),
    and do_bench flushes L2 between calls as well."""
    if tiny_cpu:
        return {"copy": [1], "gemm": [64]}
    if quick:
        return {"copy": [1024], "gemm": [8192]}
    return {"copy": [256, 1024, 4096], "gemm": [4096, 8192, 16384]}


# copy GB/s measured in this process (by run(), or by copy_gbps() when a benchmark runs alone):
# the memory-traffic limits of other benchmarks are stated at it
_COPY_GBPS: Dict[str, float] = {}


def copy_gbps(device, tiny_cpu: bool = False) -> float:
    """The device-to-device copy bandwidth of this run: what peak.run() measured in this
    process, or one 1 GiB copy measured now (64 MiB ... 1 MiB on the CPU harness)."""
    key = str(torch.device(device))
    if key not in _COPY_GBPS:
        row = _copy_row(1 if tiny_cpu else 1024, torch.bfloat16, device,
                        dict(card="", torch="", triton=""))
        _COPY_GBPS[key] = float(row["gbps"])
    return _COPY_GBPS[key]


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def _copy_row(mib: int, dt: torch.dtype, device, env) -> dict:
    n = mib * MIB // torch.tensor([], dtype=dt).element_size()
    src = torch.randn(n, device=device, dtype=dt)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    nbytes = 2 * n * src.element_size()
    gbs = nbytes / (ms * 1e-3) / 1e9
    return dict(op="peak", case=f"copy {mib} MiB", kind="copy", size=mib,
                provider="torch copy_", **{"pass": "fwd"}, ms=_sig(ms), gbps=_sig(gbs),
                tflops=float("nan"), rate=_sig(gbs), card=env["card"], torch=env["torch"],
                triton=env["triton"])


def _gemm_row(n: int, dt: torch.dtype, device, env) -> dict:
    # fp32 means fp32: no TF32 shortcut, so the fp32 peak is the one fp32 kernels can reach
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        out = torch.empty(n, n, device=device, dtype=dt)
        ms = bench(lambda: torch.matmul(a, b, out=out))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    tfl = 2 * n ** 3 / (ms * 1e-3) / 1e12
    return dict(op="peak", case=f"gemm {n}x{n}x{n}", kind="gemm", size=n,
                provider="torch.matmul", **{"pass": "fwd"}, ms=_sig(ms),
                gbps=float("nan"), tflops=_sig(tfl), rate=_sig(tfl), card=env["card"],
                torch=env["torch"], triton=env["triton"])


def run(quick: bool = False, dtype: str = "bf16", out_dir: Optional[str] = None,
        tiny_cpu: bool = False) -> List[dict]:
    """Measure copy bandwidth and the GEMM rate in `dtype`; write peak.csv + peak.png."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if tiny_cpu:
        device = torch.device("cpu")
    else:
        if not cuda_or_explain("peak"):
            return []
        device = torch.device("cuda")
    dt, env = DTYPES[dtype], environment()
    todo = sizes(quick, tiny_cpu)
    rows = [_copy_row(m, dt, device, env) for m in todo["copy"]]
    _COPY_GBPS[str(device)] = max(float(r["gbps"]) for r in rows)
    rows += [_gemm_row(n, dt, device, env) for n in todo["gemm"]]
    for r in rows:
        r["dtype"] = dtype
        unit = "GB/s" if r["kind"] == "copy" else "TFLOP/s"
        print(f"peak {r['case']:24} {r['ms']:10.4f} ms {r['rate']:9.1f} {unit}")
    d = results_dir(out_dir)
    write_csv(d / "peak.csv", rows)
    for r in rows:
        r["metric"] = "copy GB/s" if r["kind"] == "copy" else f"{dtype} GEMM TFLOP/s"
    plot(d / "peak.png", rows, x="size", y="rate", line="provider", panel="metric",
         title=f"speed of light, {dtype} ({env['card']})", ylabel="GB/s or TFLOP/s")
    for r in rows:
        del r["metric"]
    return rows


def measured_peaks(rows: List[dict]) -> Dict[str, float]:
    """{"gbps": best copy GB/s, "tflops": best GEMM TFLOP/s} from peak rows (CSV or run())."""
    out: Dict[str, float] = {}
    for kind, col in (("copy", "gbps"), ("gemm", "tflops")):
        vals = [float(r[col]) for r in rows if r.get("kind") == kind and r.get(col) not in
                (None, "")]
        vals = [v for v in vals if v == v and v > 0]
        if vals:
            out[col] = max(vals)
    return out


def main(argv=None) -> int:
    return bench_main(run, __doc__, "one size of each kind", DTYPES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
