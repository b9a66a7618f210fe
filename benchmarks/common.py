"""Shared benchmark plumbing: CUDA gate, timing, environment header, CSV + plot output.

Every number a benchmark writes is measured here on the run's own card; the CSV and the
summary carry the card, driver, CUDA, PyTorch and Triton versions and the command line.

Also shared by every benchmark: the run's time budget (set_budget / out_of_time: a case that
would start after the deadline becomes a row whose error says it was skipped), torch.compile
of the baselines (compiled(): one backend, static shapes, a recompile limit high enough that
Dynamo never silently falls back to eager), and error rows (error_text, after_error: a failed
case, CUDA out-of-memory included, is a row, never the end of the run).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import importlib
import inspect
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# the commands' own guard: past Dynamo's recompile limit a function silently runs eager, which a
# benchmark must never time as "compile"
from diffit.accel import raise_recompile_limit

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
        env["driver"] = _driver()
    from diffit_kernels._common import autotune_enabled
    if not autotune_enabled():  # a row timed so ran each list's first config, untuned
        env["autotune"] = "off (DIFFIT_KERNELS_AUTOTUNE=0)"
    return env


@functools.lru_cache(maxsize=1)
def _driver() -> str:
    """The NVIDIA driver version from nvidia-smi ("unknown" where it is missing or silent);
    asked once per process, as every benchmark writes the environment."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out[0] if out else "unknown"


# how the last bench() call timed (a CSV column of the op benchmarks): GRAPH, DO_BENCH, or
# DO_BENCH with the reason a capture was refused
GRAPH = "cuda graph"
DO_BENCH = "do_bench"
_LAST_TIMING = DO_BENCH


def last_timing() -> str:
    return _LAST_TIMING


def bench(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
          warmup: int = 25, rep: int = 100, graph: bool = False) -> float:
    """Median milliseconds of fn() on CUDA; on CPU a plain median of wall-clock runs (harness
    tests only).

    graph=False: triton.testing.do_bench, one call at a time from the host, L2 flushed between
        calls: the time a caller sees, host cost included where it exceeds the GPU's (the model
        steps are timed so).
    graph=True: the GPU time of one call (triton.testing.do_bench_cudagraph: fn captured
        unrolled in one CUDA graph, replayed; no host cost, L2 not flushed), what the op
        benchmarks report: training replays CUDA graphs by default, and a host-bound row
        measures the host, not the kernels. A capture the call refuses (a host sync, say)
        falls back to do_bench, and last_timing() says why."""
    global _LAST_TIMING
    if torch.cuda.is_available():
        from triton.testing import do_bench

        _LAST_TIMING = DO_BENCH
        if graph:
            try:
                ms = _bench_graph(fn, grad_to_none)
                _LAST_TIMING = GRAPH
                return ms
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - the capture refused: time it eagerly
                torch.cuda.synchronize()
                _LAST_TIMING = f"{DO_BENCH} (no CUDA graph: {error_text(e)[:160]})"
        kw = dict(warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None)
        if "return_mode" in inspect.signature(do_bench).parameters:
            return float(do_bench(fn, return_mode="median", **kw))
        return float(do_bench(fn, quantiles=[0.5], **kw))  # older Triton: the median this way
    import time

    _LAST_TIMING = "wall clock"
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _bench_graph(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor]) -> float:
    """do_bench_cudagraph's median; the gradients to reset are set to None inside each call
    (its own grad_to_none detaches the leaves, which a prepared backward graph still uses)."""
    from triton.testing import do_bench_cudagraph

    leaves = list(grad_to_none)

    def call():
        for x in leaves:
            x.grad = None
        return fn()

    if "return_mode" in inspect.signature(do_bench_cudagraph).parameters:
        return float(do_bench_cudagraph(call, return_mode="median"))
    return float(do_bench_cudagraph(call, quantiles=[0.5]))


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


# ---- the run's time budget ------------------------------------------------------------------
_DEADLINE: Optional[float] = None   # time.monotonic() after which no new case starts
_BUDGET_NOTE = ""                   # how the deadline was set, for the skipped rows' error text
SKIPPED = "skipped:"                # error text prefix of a case the time budget left out


def set_budget(seconds: Optional[float], note: str = "") -> None:
    """Cases that would start more than `seconds` from now are skipped (None: no limit)."""
    global _DEADLINE, _BUDGET_NOTE
    _DEADLINE = None if seconds is None else time.monotonic() + max(0.0, float(seconds))
    _BUDGET_NOTE = note


def time_left() -> Optional[float]:
    return None if _DEADLINE is None else _DEADLINE - time.monotonic()


# the speed-of-light rows (bare cuBLAS GEMMs, flash without bias, a memory-traffic limit) take
# seconds and every goal is stated against them: they may start this long after the deadline
SPEED_OF_LIGHT_RESERVE_S = 30.0


def out_of_time(speed_of_light: bool = False) -> bool:
    """True when a case starting now would be past the run's deadline. A speed-of-light row
    has SPEED_OF_LIGHT_RESERVE_S more: the budget cannot take the rows the others are judged by."""
    left = time_left()
    if left is None:
        return False
    return left <= (-SPEED_OF_LIGHT_RESERVE_S if speed_of_light else 0.0)


def skipped_text() -> str:
    return f"{SKIPPED} the time budget{' (' + _BUDGET_NOTE + ')' if _BUDGET_NOTE else ''} " \
        "was spent before this case started"


# ---- errors -----------------------------------------------------------------------------------
def error_text(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".strip()


def after_error() -> None:
    """Free what a failed case left behind (an out-of-memory error leaves the allocator full)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def attention_setting(setting: Optional[Tuple[str, str, Any]]):
    """A module setting of tmsa_attention's, (module, attribute, value), for the block, restored
    afterwards (the A/B rows' and the ncu cases' variants): the module is diffit_kernels'
    that reads it ("attention", "_attention_plans"); None: nothing changed."""
    if setting is None:
        yield
        return
    from diffit_kernels.testing import module_setting

    name, attr, value = setting
    with module_setting(importlib.import_module(f"diffit_kernels.{name}"), attr, value):
        yield


# ---- torch.compile baselines ------------------------------------------------------------------
COMPILE_BACKEND = "inductor"  # tests on CPU swap in "aot_eager" (same Dynamo guards, no codegen)
def compiled(fn: Callable, **kwargs) -> Callable:
    """torch.compile(fn) as every benchmark compiles a baseline: static shapes (each case has
    fixed shapes; a dynamic-shape recompile would be timed as warm-up), COMPILE_BACKEND."""
    raise_recompile_limit()
    kwargs.setdefault("dynamic", False)
    kwargs.setdefault("backend", COMPILE_BACKEND)
    return torch.compile(fn, **kwargs)


class _LimitHits(logging.Handler):
    """Counts Dynamo's "hit config.recompile_limit" warnings (it keeps no counter of them):
    each means a function from then on ran eager, however it was compiled."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        msg = record.getMessage()
        if "recompile_limit" in msg or "cache_size_limit" in msg:
            self.count += 1


_LIMIT_HITS = _LimitHits()


def compile_counts() -> Dict[str, int]:
    """Dynamo's running totals (torch._dynamo.reset() does not clear them): graphs built, graph
    breaks met, recompile-limit hits. Their change over one case says whether its compiled
    baseline is a few clean graphs or a recompile storm that ended in eager."""
    from torch._dynamo.utils import counters

    dynamo_log = logging.getLogger("torch._dynamo")
    if _LIMIT_HITS not in dynamo_log.handlers:
        dynamo_log.addHandler(_LIMIT_HITS)
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompile_limit_hits": _LIMIT_HITS.count}


def counts_since(before: Dict[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in compile_counts().items()}


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


AUTOTUNE_CSV = "autotune.csv"


def write_autotune(out: Path) -> int:
    """Write every candidate time the kernels' autotuners measured in this process
    (diffit_kernels._common.autotune_timings) to out/autotune.csv, one row per (kernel, key,
    candidate), after the rows already there (an --append run's earlier process; a new run
    removes the file first). Returns how many rows this process added. Atomic, like every
    result file; called after each benchmark, so a killed run keeps what was tuned."""
    from diffit_kernels._common import autotune_timings

    path = Path(out) / AUTOTUNE_CSV
    old = []
    if path.is_file():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    seen = {(r.get("kernel"), r.get("key"), r.get("candidate")) for r in old}
    new = []
    for rec in autotune_timings():
        fits = {c: t is not None and math.isfinite(t) for c, t in rec["candidates"]}
        fastest = min((t for c, t in rec["candidates"] if fits[c]), default=None)
        for cand, t in rec["candidates"]:
            if (rec["kernel"], rec["key"], cand) in seen:
                continue
            seen.add((rec["kernel"], rec["key"], cand))
            ok = fits[cand]
            new.append(dict(kernel=rec["kernel"], kind=rec["kind"], key=rec["key"],
                            candidate=cand, ms=f"{t:.5g}" if ok else "",
                            vs_fastest=f"{t / fastest:.3f}" if ok and fastest else "",
                            chosen="yes" if cand == rec["best"] else "",
                            note="" if ok else ("did not fit the card" if t is not None
                                                else "not measured")))
    if new:
        env = environment()
        write_csv(path, old + [dict(r, card=env["card"], triton=env["triton"],
                                    torch=env["torch"]) for r in new])
    return len(new)


OURS = ("ours", "tmsa")  # provider names meaning this library's kernels
# providers that are limits, not alternatives: bare GEMMs, attention without the bias, bytes at
# the copy bandwidth
SPEED_OF_LIGHT = ("cublas", "sdpa-flash", "memory limit")


def plot(path: Path, rows: List[dict], x: str, y: str, line: str, title: str,
         panel: Optional[str] = None, ylabel: Optional[str] = None) -> None:
    """Grouped bars: one group per value of `x` (shapes are categories, not points on an axis),
    one bar per provider (`line`), one subplot per value of `panel`, one title. The y axis is
    logarithmic where the bars differ by more than 10x. Where `ours` and the y column is ms,
    each group is labelled with the best other provider's ms over ours' (above 1: ours is
    faster); for a rate column, ours' rate over the best other's. Speed-of-light rows are
    drawn but are not alternatives: the label leaves them out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def val(r):
        try:
            v = float(r[y])
        except (KeyError, TypeError, ValueError):
            return None
        return v if v == v and v > 0 else None

    panels = list(dict.fromkeys(str(r[panel]) for r in rows)) if panel else [None]
    n_bars = len({str(r[x]) for r in rows}) * len({str(r[line]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 1.5 + 0.25 * n_bars) * len(panels),
                                                      4.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        sub = [r for r in rows if panel is None or str(r[panel]) == p]
        groups = list(dict.fromkeys(str(r[x]) for r in sub))
        provs = list(dict.fromkeys(str(r[line]) for r in sub))
        width = 0.8 / max(1, len(provs))
        for i, name in enumerate(provs):
            got = {str(r[x]): val(r) for r in sub if str(r[line]) == name}
            xs = [j for j, g in enumerate(groups) if got.get(g) is not None]
            if xs:
                ax.bar([j + (i - (len(provs) - 1) / 2) * width for j in xs],
                       [got[groups[j]] for j in xs], width, label=name)
        vals = [v for v in map(val, sub) if v is not None]
        if vals and max(vals) > 10 * min(vals):
            ax.set_yscale("log")
        for j, g in enumerate(groups):
            mine = [val(r) for r in sub if str(r[x]) == g and r[line] in OURS and val(r)]
            other = [val(r) for r in sub if str(r[x]) == g and val(r)
                     and r[line] not in OURS + SPEED_OF_LIGHT]
            if len(mine) == 1 and other:
                lower = y == "ms"
                ratio = (min(other) / mine[0]) if lower else (mine[0] / max(other))
                ax.annotate(f"ours {ratio:.2f}x", (j, 1.0), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=7)
        if p is not None:
            ax.set_title(p, fontsize=9, pad=12)
        ax.set_ylabel(ylabel or y)
        if ax.get_legend_handles_labels()[0]:  # every row failed or was skipped: none
            ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure to path atomically (a temporary file renamed over it, readable
    by all, as every result file) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


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
