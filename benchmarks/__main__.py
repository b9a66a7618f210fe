"""`python -m benchmarks`: every op and the model step on this card, one command.

    python -m benchmarks [--ops adaln_norm,time_qkv,tmsa_attention,model] [--quick]
                         [--dtype bf16|fp16|fp32] [--out DIR] [--budget-s SECONDS]
                         [--profile] [--append]

`--ops explore` times a grid of attention tiles beyond the shipped candidate lists at
DiffiT-XL/2's training shapes and the ffhq64 U-Net's windows (benchmarks/explore.py:
explore.csv, a section of summary.md).
--profile adds, after the chosen benchmarks, the per-kernel profile of the DiffiT-XL/2 256 px
and the ffhq64 U-Net training steps for each model provider (benchmarks/profile_step.py:
profile_<provider>.csv, profile_unet_<provider>.csv, two plots, a section of summary.md);
`--ops profile` runs the profile alone. --append keeps
what an earlier run wrote in the folder (run.json entries, CSVs, plots, its peak rows) and adds
this run's benchmarks to it: how gpu_session.sh runs the profile in a process of its own.

Runs the speed-of-light rows first (copy bandwidth, GEMM rate: benchmarks/peak.py), then each
chosen benchmark's run(quick, dtype, out_dir, tiny_cpu), and writes into
benchmarks/results/<gpu-slug>/ (or --out): one CSV and one plot per benchmark, run.json (the
environment, the exact command, what ran and how long it took) and summary.md, built from the
CSVs by benchmarks/summary.py with every rate also stated as a fraction of the measured peaks,
and autotune.csv: every candidate config the kernels' autotuners timed on the card, at each key
they tuned (summary.md's Autotune section), the data for ordering the shipped candidate lists.
`--quick` is sized to finish in under 10 minutes on an H100 (run.json and summary.md record
the wall time each benchmark took).

Time budget: --budget-s (default 420 with --quick, none otherwise; 0 = none). Each benchmark
may use what is left of it except the fractions BUDGET_RESERVE keeps for the benchmarks after
it, so a slow one cannot starve the model benchmark; a case that would start after its
benchmark's deadline becomes a row saying it was skipped (the speed-of-light rows have a
reserve of common.SPEED_OF_LIGHT_RESERVE_S beyond it). A case already running is never cut
short, so allow about a minute beyond the budget. run.json and summary.md are rewritten
(atomically) before and after every benchmark and each benchmark rewrites its CSV as it goes,
so a run killed from outside leaves a consistent folder; SIGINT / SIGTERM stop it cleanly (the
benchmark in progress is marked interrupted). Exit status: 0 all ran, 1 a benchmark failed or
is missing, 2 only the time budget left cases out, 130 interrupted.

Without CUDA nothing can be timed: the command says so, runs the compile report instead
(`python -m diffit_kernels report`: every kernel config built for sm_80 and sm_90a, the
tensor-core ones for Blackwell too) and exits with the report's status (0 when every build is
clean). `--no-report` skips the report.
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
import signal
import subprocess
import sys
import threading
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
PROFILE = ("profile", "benchmarks.profile_step")  # only when asked: --profile or --ops profile
# only when asked (--ops explore): the attention tiles beyond the shipped lists
# (benchmarks/explore.py), a minute or two of a card
EXPLORE = ("explore", "benchmarks.explore")
ON_REQUEST = dict((PROFILE, EXPLORE))
DTYPES = ("bf16", "fp16", "fp32")
# the fraction of the time budget kept for each benchmark by those before it: about its
# --quick cost on an H100 (torch.compile and the first Triton compiles dominate; the model's
# builds and its compiled case most of all); peak takes seconds and keeps nothing
BUDGET_RESERVE = {"adaln_norm": 0.10, "time_qkv": 0.12, "tmsa_attention": 0.25, "model": 0.45,
                  "profile": 0.25, "explore": 0.25}
QUICK_BUDGET_S = 420.0


def _parse_ops(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or names == ["all"]:
        return list(BENCHMARKS)
    bad = [n for n in names if n not in BENCHMARKS and n not in ON_REQUEST]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {bad}; choose from {', '.join(BENCHMARKS)}, "
            f"{', '.join(ON_REQUEST)} or 'all'")
    return list(dict.fromkeys(names))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_parse_ops, default=list(BENCHMARKS),
                   help="comma-separated subset of: " + ", ".join(BENCHMARKS)
                   + " (default: all), or " + ", ".join(ON_REQUEST) + " (only when named); "
                   "the speed-of-light rows always run")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes and providers (sized for under 10 minutes on an H100)")
    p.add_argument("--dtype", default="bf16", choices=DTYPES,
                   help="input dtype of the ops; autocast dtype of the models (default bf16)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/<gpu-slug>/)")
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help=f"time budget: cases that would start after it are skipped and recorded "
                   f"as such (default {QUICK_BUDGET_S:.0f} with --quick, none otherwise; 0: none)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the DiffiT-XL/2 256 px and the ffhq64 U-Net training "
                   "steps of each model provider: CUDA kernel time per step by group (ours / "
                   "cuBLAS / inductor / copies and casts / other) and GPU idle time")
    p.add_argument("--append", action="store_true",
                   help="keep the earlier run in the output folder and add to it (its peak "
                   "rows are reused)")
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


def _status(rows: List[dict]) -> str:
    from benchmarks.common import SKIPPED

    if not rows:
        return "error: run() returned no rows"
    errs = [str(r.get("error") or "").strip() for r in rows]
    skipped = sum(e.startswith(SKIPPED) for e in errs)
    failed = sum(bool(e) and not e.startswith(SKIPPED) for e in errs)
    skip = f"{skipped} of {len(rows)} rows skipped (time budget)" if skipped else ""
    if failed:
        return f"error: {failed} of {len(rows)} rows failed" + (f"; {skip}" if skip else "")
    return f"partial: {skip}" if skip else "ok"


def run_benchmark(name: str, modname: str, out: Path, quick: bool, dtype: str,
                  tiny_cpu: bool) -> dict:
    """Run one benchmark module; return its run.json entry (status, CSVs written, seconds).

    A module that writes no CSV of its own gets <name>.csv and a plot from its rows here.
    A KeyboardInterrupt (SIGINT, or SIGTERM under main()) ends the module: its entry says
    "interrupted" and lists the CSVs it wrote so far."""
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

    def written(ext):
        return sorted(n for n, m in _files(out, ext).items() if before[ext].get(n) != m)

    try:
        rows = mod.run(**kwargs) or []
    except KeyboardInterrupt:
        csvs = written("csv")
        entry.update(status="interrupted: stopped (SIGINT / SIGTERM: a time limit or Ctrl-C) "
                     "before it finished", csv=csvs, png=written("png"),
                     rows=sum(len(summary.load_csv(out / c)) for c in csvs),
                     seconds=round(time.perf_counter() - t0, 1))
        return entry
    except Exception as e:  # noqa: BLE001 - the other benchmarks still run; the exit code says it
        traceback.print_exc()
        entry.update(status=f"error: {type(e).__name__}: {str(e).strip()[:300]}",
                     csv=written("csv"), png=written("png"),
                     seconds=round(time.perf_counter() - t0, 1))
        return entry
    finally:
        _release()
    got = {ext: written(ext) for ext in ("csv", "png")}
    if rows and not got["csv"]:
        write_csv(out / f"{name}.csv", rows)
        got["csv"] = [f"{name}.csv"]
    if rows and not got["png"]:
        norm = [summary.normalize(r, name) for r in rows]
        y = next((c for c in ("tflops", "gbps", "images_per_s") if c in norm[0]), "ms")
        plot(out / f"{name}.png", norm, x="case", y=y, line="provider", panel="pass",
             title=f"{name}, {dtype}")
        got["png"] = [f"{name}.png"]
    entry.update(status=_status(rows), csv=got["csv"], png=got["png"], rows=len(rows),
                 seconds=round(time.perf_counter() - t0, 1))
    return entry


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _clear_previous_run(out: Path) -> List[str]:
    """Remove what an earlier run in this folder wrote (the files its run.json lists, and
    run.json, summary.md and its note.md), so no stale CSV or plot mixes with this run's. Files
    no run.json lists are left alone."""
    try:
        meta = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return []
    names = {n for e in meta.get("benchmarks", []) for n in e.get("csv", []) + e.get("png", [])}
    # the note described that run; autotune.csv holds its autotuners' candidate times
    names |= {"run.json", "summary.md", "note.md", "autotune.csv"}
    gone = []
    for n in sorted(names):
        p = out / n
        if p.parent == out and p.is_file():
            p.unlink()
            gone.append(n)
    return gone


def _earlier_run(out: Path) -> Optional[dict]:
    """The run.json of the run already in `out` (None: none, or unreadable)."""
    try:
        meta = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("benchmarks"), list) else None


def _seconds(meta: dict, t0: float) -> float:
    return round(meta.get("seconds_before", 0) + time.perf_counter() - t0, 1)


def _budget(args) -> Optional[float]:
    b = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if args.quick else 0)
    return b if b and b > 0 else None


def exit_status(entries: List[dict]) -> int:
    states = [e["status"] for e in entries]
    if any(s.startswith("interrupted") for s in states):
        return 130
    if any(s != "ok" and not s.startswith("partial") for s in states):
        return 1
    return 2 if any(s.startswith("partial") for s in states) else 0


class _Stop(KeyboardInterrupt):
    """SIGTERM, raised as a KeyboardInterrupt so the run stops the way Ctrl-C stops it."""


def _on_sigterm(signum, frame):
    raise _Stop()


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
              "kernel config built for sm_80 and sm_90a (the tensor-core ones for Blackwell "
              "too), no GPU needed.\n")
        rc = compile_report()
        if rc:
            print(f"\ncompile report: problems found (exit status {rc}), see above")
        return rc

    from benchmarks import common, summary

    if args.tiny_cpu and args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / "_tmp-tiny-cpu")
    out = common.results_dir(args.out)
    ops = list(args.ops) + ([PROFILE[0]] if args.profile and PROFILE[0] not in args.ops else [])
    earlier = _earlier_run(out) if args.append else None
    if earlier is None:
        stale = _clear_previous_run(out)
        if stale:
            print(f"removed the previous run's {len(stale)} files from {out}")
    env = common.environment()
    env["command"] = command
    started = datetime.datetime.now(datetime.timezone.utc)
    budget = _budget(args)
    print(f"{command}\n  card {env['card']} | driver {env.get('driver', '-')} | CUDA "
          f"{env['cuda']} | torch {env['torch']} | triton {env['triton']}\n  -> {out}"
          + (f"\n  time budget {budget:.0f} s" if budget else ""))
    meta = dict(environment=env, command=command, dtype=args.dtype, quick=args.quick,
                tiny_cpu=args.tiny_cpu, git=_git_revision(),
                started=started.strftime("%Y-%m-%d %H:%M UTC"), budget_s=budget,
                finished=False, benchmarks=[])
    todo = [PEAK] + [(n, BENCHMARKS.get(n) or ON_REQUEST[n]) for n in ops]
    if earlier is not None:
        # this run's benchmarks replace the earlier run's entries of the same name; the rest
        # (its peak rows among them: measured on the same card, minutes ago) stay
        names = {n for n, _ in todo}
        kept = [e for e in earlier.get("benchmarks", []) if e.get("name") not in names
                or (e.get("name") == PEAK[0] and e.get("status") == "ok")]
        todo = [t for t in todo if t[0] not in {e["name"] for e in kept}]
        git = meta["git"]
        meta = dict(earlier, benchmarks=kept, finished=False,
                    command=f"{earlier.get('command', '?')} && {command}",
                    seconds_before=earlier.get("seconds", 0))
        if earlier.get("git") != git:
            meta["git"] = f"{earlier.get('git')} (appended at {git})"
        print(f"--append: kept {len(kept)} benchmarks of the earlier run in {out}")
    t0 = time.perf_counter()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        for i, (name, modname) in enumerate(todo):
            if budget is None:
                common.set_budget(None)
            else:
                keep = budget * sum(BUDGET_RESERVE.get(n, 0.0) for n, _ in todo[i + 1:])
                common.set_budget(budget - keep - (time.perf_counter() - t0),
                                  f"--budget-s {budget:.0f}, {keep:.0f} s of it kept for the "
                                  "benchmarks after this one" if keep else
                                  f"--budget-s {budget:.0f}")
            print(f"\n== {name} ==")
            meta["benchmarks"].append(dict(name=name, module=modname, csv=[], png=[], rows=0,
                                           status="running: started but never finished (the "
                                           "process was killed)"))
            meta["seconds"] = _seconds(meta, t0)
            _write_json(out / "run.json", meta)
            entry = run_benchmark(name, modname, out, args.quick, args.dtype, args.tiny_cpu)
            tuned = common.write_autotune(out)
            if tuned:
                print(f"  {tuned} autotune candidate times -> {common.AUTOTUNE_CSV}")
            meta["benchmarks"][-1] = entry
            meta["seconds"] = _seconds(meta, t0)
            _write_json(out / "run.json", meta)
            summary.write_summary(out)
            print(f"== {name}: {entry['status']}, {entry['rows']} rows, "
                  f"{entry['seconds']:.1f} s", flush=True)
            if entry["status"].startswith("interrupted"):
                break
        else:
            meta["finished"] = True
    finally:
        common.set_budget(None)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    meta["seconds"] = _seconds(meta, t0)
    _write_json(out / "run.json", meta)
    path = summary.write_summary(out)
    print(f"\nwrote {path} ({meta['seconds']:.0f} s in all)")
    for e in meta["benchmarks"]:
        if e["status"] != "ok":
            print(f"  {e['name']}: {e['status']}")
    return exit_status(meta["benchmarks"])


if __name__ == "__main__":
    sys.exit(main())
