"""Shared benchmark plumbing: CUDA gate, timing, environment header, CSV + plot output.

Every number a benchmark writes is measured here on the run's own card; the CSV and the
summary carry the card, driver, CUDA, PyTorch and Triton versions and the command line.
"""
from __future__ import annotations

import csv
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cuda_or_explain(name: str) -> bool:
    """True when CUDA is available; otherwise print why timings are skipped."""
    if torch.cuda.is_available():
        return True
    print(f"{name}: timings need a CUDA GPU and none is visible; nothing was measured.")
    return False


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir(out: Optional[str] = None) -> Path:
    d = Path(out) if out else RESULTS / gpu_slug()
    d.mkdir(parents=True, exist_ok=True)
    return d


def environment() -> Dict[str, str]:
    import triton

    env = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if torch.cuda.is_available():
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = "unknown"
    return env


def bench(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
          warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() on CUDA (triton.testing.do_bench: warm-up excluded, L2
    flushed between runs); on CPU a plain median of wall-clock runs (harness tests only)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None,
                              return_mode="median"))
    import time

    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated by one call of fn, above what was allocated before it."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_csv(path: Path, rows: List[dict]) -> None:
    """Atomically write rows (all keys become columns) as CSV."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
    os.replace(tmp, path)


def plot(path: Path, rows: List[dict], x: str, y: str, line: str, title: str,
         panel: Optional[str] = None, ylabel: Optional[str] = None) -> None:
    """One line per provider (`line`) of y against x; one subplot per value of `panel`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({str(r[panel]) for r in rows}) if panel else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        sub = [r for r in rows if panel is None or str(r[panel]) == p]
        for name in dict.fromkeys(r[line] for r in sub):
            pts = [(r[x], r[y]) for r in sub if r[line] == name and r[y] == r[y]]
            if pts:
                ax.plot([str(a) for a, _ in pts], [b for _, b in pts], marker="o", label=name)
        ax.set_title(p or title)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or y)
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def bench_main(run: Callable, doc: str, quick_help: str, dtypes, argv=None) -> int:
    """The command line every benchmark module shares: --quick, --dtype, --out, then run()."""
    import argparse

    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--dtype", default="bf16", choices=sorted(dtypes))
    p.add_argument("--out", default=None, help="output folder (default results/<gpu>/)")
    a = p.parse_args(argv)
    run(a.quick, a.dtype, a.out)
    return 0
