"""`python -m benchmarks`: every op and the model step on this card, one command.

    python -m benchmarks [--ops adaln_norm,time_qkv,tmsa_attention,model] [--quick]
                         [--dtype bf16|fp16|fp32] [--out DIR]

Runs the speed-of-light rows first (copy bandwidth, GEMM rate: benchmarks/peak.py), then each
chosen benchmark's run(quick, dtype, out_dir, tiny_cpu), and writes into
benchmarks/results/<gpu-slug>/ (or --out): one CSV and one plot per benchmark, run.json (the
environment, the exact command, what ran and how long it took) and summary.md, built from the
CSVs by benchmarks/summary.py with every rate also stated as a fraction of the measured peaks.
`--quick` is sized to finish in under 10 minutes on an H100 (run.json and summary.md record
the wall time each benchmark took).

Without CUDA nothing can be timed: the command says so, runs the compile report instead
(`python -m diffit_kernels report`: every kernel config built for sm_80 and sm_90a) and exits
with the report's status (0 when every build is clean). `--no-report` skips the report.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import inspect
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent

# --ops name -> module exposing run(quick, dtype, out_dir, tiny_cpu) -> rows
BENCHMARKS: Dict[str, str] = {
    "adaln_norm": "benchmarks.bench_adaln_norm",
    "time_qkv": "benchmarks.bench_time_qkv",
    "tmsa_attention": "benchmarks.bench_attention",
    "model": "benchmarks.bench_model",
}
PEAK = ("peak", "benchmarks.peak")
DTYPES = ("bf16", "fp16", "fp32")


def _parse_ops(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or names == ["all"]:
        return list(BENCHMARKS)
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {bad}; choose from {', '.join(BENCHMARKS)} or 'all'")
    return list(dict.fromkeys(names))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_parse_ops, default=list(BENCHMARKS),
                   help="comma-separated subset of: " + ", ".join(BENCHMARKS)
                   + " (default: all); the speed-of-light rows always run")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes and providers (sized for under 10 minutes on an H100)")
    p.add_argument("--dtype", default="bf16", choices=DTYPES,
                   help="input dtype of the ops; autocast dtype of the models (default bf16)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/<gpu-slug>/)")
    p.add_argument("--no-report", action="store_true",
                   help="without CUDA: do not run the compile report")
    # CI: every benchmark's code path on CPU at tiny sizes against the reference provider
    p.add_argument("--tiny-cpu", action="store_true", help=argparse.SUPPRESS)
    return p


def compile_report() -> int:
    """`python -m diffit_kernels report` in a process without TRITON_INTERPRET (the interpreter
    replaces the compiler, so the report cannot share a process with it)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.stdout.flush()
    return subprocess.call([sys.executable, "-m", "diffit_kernels", "report"], env=env,
                           cwd=str(ROOT))


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + (" (uncommitted changes)" if dirty else "")) if rev else "unknown"


def _release() -> None:
    """Free what one benchmark left (compiled graphs, cached blocks) before the next runs."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _files(out: Path, ext: str) -> Dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*." + ext)}


def run_benchmark(name: str, modname: str, out: Path, quick: bool, dtype: str,
                  tiny_cpu: bool) -> dict:
    """Run one benchmark module; return its run.json entry (status, CSVs written, seconds).

    A module that writes no CSV of its own gets <name>.csv and a plot from its rows here."""
    from benchmarks import summary
    from benchmarks.common import plot, write_csv

    entry = dict(name=name, module=modname, status="ok", csv=[], png=[], rows=0, seconds=0.0)
    if importlib.util.find_spec(modname) is None:
        entry["status"] = f"missing: {modname.replace('.', '/')}.py does not exist"
        return entry
    t0 = time.perf_counter()
    mod = importlib.import_module(modname)
    params = inspect.signature(mod.run).parameters
    if tiny_cpu and "tiny_cpu" not in params:
        entry["status"] = "error: run() has no tiny_cpu mode"
        return entry
    kwargs = dict(quick=quick, dtype=dtype, out_dir=str(out))
    if "tiny_cpu" in params:
        kwargs["tiny_cpu"] = tiny_cpu
    before = {ext: _files(out, ext) for ext in ("csv", "png")}
    try:
        rows = mod.run(**kwargs) or []
    except Exception as e:  # noqa: BLE001 - the other benchmarks still run; the exit code says it
        traceback.print_exc()
        entry.update(status=f"error: {type(e).__name__}: {str(e).strip()[:300]}",
                     seconds=round(time.perf_counter() - t0, 1))
        return entry
    finally:
        _release()
    written = {ext: sorted(n for n, m in _files(out, ext).items() if before[ext].get(n) != m)
               for ext in ("csv", "png")}
    if rows and not written["csv"]:
        write_csv(out / f"{name}.csv", rows)
        written["csv"] = [f"{name}.csv"]
    if rows and not written["png"]:
        norm = [summary.normalize(r, name) for r in rows]
        y = next((c for c in ("tflops", "gbps", "images_per_s") if c in norm[0]), "ms")
        plot(out / f"{name}.png", norm, x="case", y=y, line="provider", panel="pass",
             title=f"{name}, {dtype}")
        written["png"] = [f"{name}.png"]
    failed = [r for r in rows if str(r.get("error") or "").strip()]
    if not rows:
        entry["status"] = "error: run() returned no rows"
    elif failed:
        entry["status"] = f"error: {len(failed)} of {len(rows)} rows failed"
    entry.update(csv=written["csv"], png=written["png"], rows=len(rows),
                 seconds=round(time.perf_counter() - t0, 1))
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    command = "python -m benchmarks" + (" " + shlex.join(argv) if argv else "")

    import torch

    if not args.tiny_cpu and not torch.cuda.is_available():
        print("python -m benchmarks: timings need a CUDA GPU and none is visible; nothing was "
              "measured and no results were written.")
        if args.no_report:
            print("--no-report: the compile report was skipped.")
            return 0
        print("Running the compile report instead (python -m diffit_kernels report): every "
              "kernel config built for sm_80 and sm_90a, no GPU needed.\n")
        rc = compile_report()
        if rc:
            print(f"\ncompile report: problems found (exit status {rc}), see above")
        return rc

    from benchmarks import summary
    from benchmarks.common import environment, results_dir

    if args.tiny_cpu and args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / "_tmp-tiny-cpu")
    out = results_dir(args.out)
    env = environment()
    env["command"] = command
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{command}\n  card {env['card']} | driver {env.get('driver', '-')} | CUDA "
          f"{env['cuda']} | torch {env['torch']} | triton {env['triton']}\n  -> {out}")
    meta = dict(environment=env, command=command, dtype=args.dtype, quick=args.quick,
                tiny_cpu=args.tiny_cpu, git=_git_revision(),
                started=started.strftime("%Y-%m-%d %H:%M UTC"), benchmarks=[])
    t0 = time.perf_counter()
    for name, modname in [PEAK] + [(n, BENCHMARKS[n]) for n in args.ops]:
        print(f"\n== {name} ==")
        entry = run_benchmark(name, modname, out, args.quick, args.dtype, args.tiny_cpu)
        print(f"== {name}: {entry['status']}, {entry['rows']} rows, {entry['seconds']:.1f} s")
        meta["benchmarks"].append(entry)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    path = summary.write_summary(out)
    print(f"\nwrote {path} ({meta['seconds']:.0f} s in all)")
    bad = [e for e in meta["benchmarks"] if e["status"] != "ok"]
    for e in bad:
        print(f"  {e['name']}: {e['status']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
