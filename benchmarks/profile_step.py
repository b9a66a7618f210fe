"""Where the training step's time goes: `python -m benchmarks --profile`.

For the DiffiT-XL/2 256 px B32 training step, then the ffhq64 U-Net's (64 px B64) (fwd + bwd +
AdamW, bf16 autocast, built exactly as benchmarks.bench_model builds them) of each model
provider: the step time (do_bench median, as the model benchmark measures it), then
torch.profiler over a few more steps, and every CUDA kernel's time per step in one of these
groups:

    ours              this library's Triton kernels: the names of the @triton.jit functions
                      found in diffit_kernels' modules when the profile runs (never a list
                      kept by hand, so a renamed or new kernel is counted where it belongs)
    cuBLAS            GEMM libraries: gemm, cutlass, xmma, nvjet, cublas, gemv in the name
    inductor          kernels torch.compile generated (triton_poi_ / triton_red_ / triton_per_
                      / triton_tem_ ...)
    copies and casts  copy and cast kernels, Memcpy / Memset
    other             everything else (optimizer, reductions, eager elementwise, SDPA ...)
    GPU idle          the step time minus the summed kernel time: launch and Python overhead

and, on the host, the CPU time per step inside each of this library's custom ops (the
"diffit_kernels::" profiler events, outermost call only: the op's Python, its torch ops and its
Triton launches), the part of the host's work that is ours; under CUDA graphs it is ~0.
And the eager torch ops (aten::) that ran kernels, by op and input shapes, with the GPU time of
the kernels each launched itself (the profiler's self device time; shapes recorded): which
copy, cast, reduction or elementwise op of which tensor makes up "copies and casts" and "other"
(inductor's and our kernels are launched by no aten op, cuBLAS's by aten::mm and its kin).

Writes profile_<provider>.csv for the XL/2 step and profile_unet_<provider>.csv for the U-Net's
(one row per group, then one per kernel, per step), profile.png and profile_unet.png (a stacked
bar per provider) and returns the group rows; summary.md gets a section from the CSVs, one
table per case. On CPU (the harness, --tiny-cpu) the tiny latent model's and the tiny U-Net's
CPU ops stand in for kernels.

    python -m benchmarks --profile [--ops model] [--quick]
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from benchmarks.common import (after_error, bench, environment, error_text, out_of_time,
                               results_dir, save_figure, skipped_text, write_csv)
from diffit_kernels._common import OP_PREFIX

GROUPS = ("ours", "cuBLAS", "inductor", "copies and casts", "other")
IDLE = "GPU idle"
HOST = "host, our ops"     # CPU time inside this library's custom ops (not a GPU group)
HOST_PREFIX = OP_PREFIX   # how profiles name our ops' calls
PROVIDERS = ("ours+graphs", "ours+compile", "compile", "compile+graphs", "ours", "eager")
# the training default's configuration with our kernels, the same without CUDA graphs (its host
# time shows as GPU idle), and the goal's yardstick
QUICK_PROVIDERS = ("ours+graphs", "ours+compile", "compile")
# the U-Net (issue: slower than eager while its windowed attention benchmarks faster, cause
# unknown): the training default's configuration with our kernels against the goal's yardstick
UNET_QUICK_PROVIDERS = ("ours+graphs", "compile")
STEPS = 3          # profiled steps (after the warm-up bench_model does and the timing)
TOP = 10           # kernels (and eager ops) listed per provider in summary.md
OPS_KEPT = 40      # eager ops (by op and input shapes) kept per provider in the CSV
EAGER_OP = "eager op"  # the group column of those rows

_CUBLAS = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|gemv", re.I)
_COPY = re.compile(r"copy|memcpy|memset|CatArrayBatched", re.I)


def our_kernel_names(package: str = "diffit_kernels") -> frozenset:
    """The names of every @triton.jit function in `package`'s modules (autotuned or not)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: no kernels of ours can have run
        return frozenset()
    pkg = importlib.import_module(package)
    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "__main__":
            continue
        try:
            mod = importlib.import_module(f"{package}.{info.name}")
        except Exception:  # noqa: BLE001 - a helper module that cannot import here holds no
            continue       # kernel that ran
        for obj in vars(mod).values():
            for _ in range(4):  # Autotuner / Heuristics wrap the JITFunction in .fn
                if isinstance(obj, JITFunction) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, JITFunction):
                names.add(obj.fn.__name__)
    return frozenset(names)


def classify(name: str, ours: Iterable[str]) -> str:
    """The group of one kernel name (see the module docstring)."""
    if name in ours:
        return "ours"
    if name.startswith("triton_"):  # ours are "_<op>_..._kernel": no clash
        return "inductor"
    if _CUBLAS.search(name):
        return "cuBLAS"
    if _COPY.search(name):
        return "copies and casts"
    return "other"


def _per_step(events: Sequence[Tuple[str, float]], steps: int) -> List[Tuple[str, float, float]]:
    """(name, ms per step, calls per step) of each name, slowest first."""
    per: Dict[str, List[float]] = {}
    for name, ms in events:
        per.setdefault(name, []).append(float(ms))
    return sorted(((n, sum(v) / steps, len(v) / steps) for n, v in per.items()),
                  key=lambda k: (-k[1], k[0]))


def aggregate(events: Sequence[Tuple[str, float]], steps: int, step_ms: float,
              ours: Iterable[str], host: Sequence[Tuple[str, float]] = (),
              ops: Sequence[Tuple[str, float, int]] = ()) -> Dict[str, object]:
    """Group (kernel name, milliseconds) events recorded over `steps` steps into per-step
    totals. Returns {"groups": {group: ms per step, ..., IDLE: ms}, "kernels": [(name, group,
    ms per step, calls per step), ... slowest first], "kernel_ms": ms, "step_ms": step_ms,
    "host": [(op, CPU ms per step, calls per step), ...], "host_ms": their sum, "ops":
    [(op and shapes, ms per step, calls per step), ... slowest first, OPS_KEPT of them]}.
    GPU idle is the step time minus the summed kernel time (never below 0: kernels on
    several streams may overlap). `host`: (custom op, CPU ms) events (see _host_events);
    `ops`: (op and shapes, ms over the steps, calls over the steps) (see _eager_ops)."""
    ours = frozenset(ours)
    kernels = [(n, classify(n, ours), ms, c) for n, ms, c in _per_step(events, steps)]
    groups = {g: 0.0 for g in GROUPS}
    for _, g, ms, _ in kernels:
        groups[g] += ms
    kernel_ms = sum(groups.values())
    groups[IDLE] = max(0.0, step_ms - kernel_ms)
    host_ops = _per_step(host, steps)
    eager = sorted(((n, ms / steps, c / steps) for n, ms, c in ops), key=lambda k: (-k[1], k[0]))
    return dict(groups=groups, kernels=kernels, kernel_ms=kernel_ms, step_ms=step_ms,
                host=host_ops, host_ms=sum(ms for _, ms, _ in host_ops), ops=eager[:OPS_KEPT])


def csv_rows(agg: Dict[str, object], base: dict) -> List[dict]:
    """profile_<provider>.csv: one row per group (IDLE included), then one per kernel."""
    step = float(agg["step_ms"])

    def share(ms):
        return round(100 * ms / step, 2) if step > 0 else float("nan")

    rows = [dict(base, kind="group", group=g, kernel="", ms=round(ms, 4), calls="",
                 share_pct=share(ms)) for g, ms in agg["groups"].items()]
    rows += [dict(base, kind="kernel", group=g, kernel=n, ms=round(ms, 4), calls=round(c, 2),
                  share_pct=share(ms)) for n, g, ms, c in agg["kernels"]]
    rows += [dict(base, kind="host", group=HOST, kernel=n, ms=round(ms, 4), calls=round(c, 2),
                  share_pct=share(ms)) for n, ms, c in agg.get("host", ())]
    rows += [dict(base, kind="op", group=EAGER_OP, kernel=n, ms=round(ms, 4), calls=round(c, 2),
                  share_pct=share(ms)) for n, ms, c in agg.get("ops", ())]
    return rows


# GPU-side spans of host annotations (record_function ranges: the optimizer's
# "Optimizer.step#AdamW.step", our ops' "diffit_kernels::..."): they cover kernels already
# counted, so they are no kernels (torch marks them is_user_annotation; the names for older torch)
_ANNOTATION = re.compile(r"^(Optimizer\.|ProfilerStep#|" + re.escape(HOST_PREFIX) + ")")


def _is_annotation(e) -> bool:
    return bool(getattr(e, "is_user_annotation", False)) or bool(_ANNOTATION.match(e.name))


def _events(prof, cuda: bool) -> List[Tuple[str, float]]:
    """(name, ms) of every CUDA kernel / memcpy / memset the profiler saw (annotation spans
    left out); on CPU, of every CPU op with no child op (the harness' stand-in for kernels)."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if cuda:
            if e.device_type == DeviceType.CUDA and not _is_annotation(e):
                out.append((e.name, e.time_range.elapsed_us() / 1e3))
        elif e.device_type == DeviceType.CPU and not e.cpu_children:
            out.append((e.name, e.time_range.elapsed_us() / 1e3))
    return out


def _host_events(prof) -> List[Tuple[str, float]]:
    """(op, CPU ms) of every call of this library's custom ops, the outermost event of each
    call (the dispatcher nests one op's autograd and backend calls under the same name)."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if e.device_type != DeviceType.CPU or not e.name.startswith(HOST_PREFIX):
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name != e.name:
            parent = parent.cpu_parent
        if parent is None:
            out.append((e.name[len(HOST_PREFIX):], e.cpu_time_total / 1e3))
    return out


def _eager_ops(prof, cuda: bool) -> List[Tuple[str, float, int]]:
    """("aten::op [input shapes]", ms, calls) over the profiled steps of every eager torch op
    that ran kernels of its own (self device time; on CPU, the harness, self CPU time stands
    in). Shapes need the profile's record_shapes."""
    out = []
    for row in prof.key_averages(group_by_input_shape=True):
        if not row.key.startswith("aten::"):
            continue
        if cuda:
            us = getattr(row, "self_device_time_total", None)
            if us is None:  # torch before the device-neutral names
                us = getattr(row, "self_cuda_time_total", 0.0)
        else:
            us = row.self_cpu_time_total
        if us > 0:
            shapes = str(row.input_shapes or []).replace(" ", "")
            out.append((f"{row.key} {shapes}", us / 1e3, row.count))
    return out


def profile_case(case, provider: str, dtype: str, device, steps: int = STEPS) -> dict:
    """Build `provider`'s model for `case` (bench_model.prepared), time the step, profile
    `steps` steps; returns the aggregate (see aggregate())."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import bench_model

    cuda = torch.device(device).type == "cuda"
    with bench_model.prepared(case, provider, dtype, device, quick=True) as fn:
        step_ms = bench(fn, rep=case.rep_ms)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        events, host, ops = _events(prof, cuda), _host_events(prof), _eager_ops(prof, cuda)
        del fn
    return aggregate(events, steps, step_ms, our_kernel_names(), host, ops)


def profiled_cases(quick: bool, tiny_cpu: bool, providers: Optional[Sequence[str]] = None
                   ) -> List[Tuple[object, List[str], str]]:
    """[(ModelCase, providers, file tag)]: the XL/2 256 px step (tag "") and the ffhq64 U-Net's
    (tag "unet_"); the tiny presets on CPU. `providers` replaces each case's list."""
    from benchmarks import bench_model

    MC = bench_model.ModelCase
    if tiny_cpu:
        latent = MC("DiffiT-tiny", "latent", 32, 2, "fwd+bwd+adamw", ("eager",), rep_ms=1)
        unet = MC("tiny", "unet", 8, 2, "fwd+bwd+adamw", ("eager",), rep_ms=1)
        lists = (["eager"], ["eager"])
    else:
        rep = 400 if quick else 1500
        latent = MC("DiffiT-XL/2", "latent", 256, 32, "fwd+bwd+adamw", PROVIDERS, rep_ms=rep)
        unet = MC("ffhq64", "unet", 64, 64, "fwd+bwd+adamw", PROVIDERS, rep_ms=rep)
        lists = ((list(QUICK_PROVIDERS), list(UNET_QUICK_PROVIDERS)) if quick
                 else (list(PROVIDERS), list(PROVIDERS)))
    return [(case, list(providers) if providers else names, tag)
            for case, names, tag in zip((latent, unet), lists, ("", "unet_"))]


def run(quick: bool = False, dtype: str = "bf16", out_dir: Optional[str] = None,
        tiny_cpu: bool = False, providers: Optional[Sequence[str]] = None) -> List[dict]:
    """Profile the XL/2 256 px and the ffhq64 U-Net training steps for each provider; write the
    CSVs and the plots; return the group rows (a provider that fails or is skipped is one row
    with its error)."""
    from benchmarks import bench_model

    if tiny_cpu:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("profile: timings need a CUDA GPU and none is visible; nothing was measured.")
        return []
    else:
        device = torch.device("cuda")
    todo = profiled_cases(quick, tiny_cpu, providers)
    bad = sorted({n for _, names, _ in todo for n in names} - set(bench_model.PROVIDERS))
    if bad:
        raise ValueError(f"providers must be among {bench_model.PROVIDERS}, got {bad}")
    env = environment()
    out = results_dir(out_dir)
    rows = []
    for case, names, tag in todo:
        done = {}
        for provider in names:
            base = dict(op="profile", case=case.name, provider=provider, dtype=dtype,
                        **{"pass": case.pass_}, steps=STEPS, card=env["card"],
                        torch=env["torch"], triton=env["triton"])
            label = f"profile {case.name} {provider:13}"
            if out_of_time():
                rows.append(dict(base, kind="group", group="", ms=float("nan"),
                                 error=skipped_text()))
                print(f"{label} {rows[-1]['error']}", flush=True)
                continue
            try:
                agg = profile_case(case, provider, dtype, device)
            except Exception as e:  # noqa: BLE001 - one provider's failure is a row
                if tiny_cpu:
                    raise
                rows.append(dict(base, kind="group", group="", ms=float("nan"),
                                 error=error_text(e)))
                print(f"{label} {rows[-1]['error']}", flush=True)
                del e
                after_error()
                continue
            prov_rows = csv_rows(agg, dict(base, step_ms=round(agg["step_ms"], 4), error=""))
            write_csv(out / f"profile_{tag}{_slug(provider)}.csv", prov_rows)
            rows += [r for r in prov_rows if r["kind"] == "group"]
            done[provider] = agg
            g = agg["groups"]
            print(f"{label} step {agg['step_ms']:8.2f} ms: " + ", ".join(
                f"{k} {v:.2f}" for k, v in g.items()), flush=True)
        if done:
            stacked_plot(out / f"profile{'_' + tag.rstrip('_') if tag else ''}.png", done,
                         title=f"{case.name} {case.pass_} per step, {dtype} ({env['card']})")
    return rows


def _slug(provider: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", provider.lower()).strip("_")


def stacked_plot(path: Path, aggs: Dict[str, dict], title: str) -> None:
    """One stacked bar per provider: ms per step in each group, GPU idle on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    provs = list(aggs)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 + 1.2 * len(provs)), 4.5))
    bottom = [0.0] * len(provs)
    for g in GROUPS + (IDLE,):
        vals = [float(aggs[p]["groups"][g]) for p in provs]
        ax.bar(range(len(provs)), vals, 0.6, bottom=bottom, label=g,
               hatch="//" if g == IDLE else None, color="white" if g == IDLE else None,
               edgecolor="gray" if g == IDLE else None)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, p in enumerate(provs):
        ax.annotate(f"{aggs[p]['step_ms']:.1f} ms", (i, bottom[i]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(range(len(provs)), provs)
    ax.set_ylabel("ms per step (lower is better)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def section(csvs: Sequence[Path]) -> str:
    """The summary.md section: for each profiled case (in the CSVs' order), ms per step by group
    for every provider side by side, then each provider's slowest kernels."""
    from benchmarks.summary import load_csv

    by_case: Dict[str, Dict[str, list]] = {}
    for p in csvs:
        rows = load_csv(p)
        if rows:
            case = str(rows[0].get("case", ""))
            by_case.setdefault(case, {})[rows[0].get("provider", p.stem)] = rows
    if not by_case:
        return "_no profile rows_\n"
    return "\n".join(_case_section(data) for data in by_case.values())


def _case_section(data: Dict[str, list]) -> str:
    from benchmarks.summary import _fmt, _num

    provs = list(data)
    step = {p: _num(rows[0].get("step_ms")) for p, rows in data.items()}
    first = next(iter(data.values()))[0]
    L = [f"{first.get('case', '')} {first.get('pass', '')}, ms per step ({first.get('steps')} "
         "profiled steps; step time: do_bench median without the profiler):", "",
         "| group | " + " | ".join(provs) + " |", "|---|" + "---|" * len(provs)]
    for g in GROUPS + (IDLE,):
        cells = []
        for p in provs:
            r = next((r for r in data[p] if r.get("kind") == "group" and r.get("group") == g),
                     None)
            ms = _num(r.get("ms")) if r else None
            s = step.get(p)
            cells.append("-" if ms is None else
                         f"{_fmt(ms)} ({100 * ms / s:.0f}%)" if s else _fmt(ms))
        L.append(f"| {g} | " + " | ".join(cells) + " |")
    L.append("| **step** | " + " | ".join(_fmt(step[p]) for p in provs) + " |")
    host = {p: sum(_num(r.get("ms")) or 0.0 for r in data[p] if r.get("kind") == "host")
            for p in provs}
    L.append(f"| {HOST} (CPU, profiler on) | " + " | ".join(_fmt(host[p]) for p in provs) + " |")
    for p in provs:
        ks = [r for r in data[p] if r.get("kind") == "kernel"][:TOP]
        if not ks:
            continue
        L += ["", f"{first.get('case', '')}, {p}: the {len(ks)} slowest kernels per step", "",
              "| kernel | group | ms | calls |", "|---|---|---|---|"]
        for r in ks:
            name = str(r.get("kernel", "")).replace("|", "/")
            name = name if len(name) <= 90 else name[:87] + "..."
            L.append(f"| `{name}` | {r.get('group')} | {_fmt(_num(r.get('ms')))} | "
                     f"{r.get('calls')} |")
    for p in provs:
        ops = [r for r in data[p] if r.get("kind") == "op"][:TOP]
        if not ops:
            continue
        L += ["", f"{first.get('case', '')}, {p}: the {len(ops)} eager torch ops with the most "
              "kernel time of their own, by input shapes", "",
              "| op [input shapes] | ms | calls |", "|---|---|---|"]
        for r in ops:
            name = str(r.get("kernel", "")).replace("|", "/")
            name = name if len(name) <= 110 else name[:107] + "..."
            L.append(f"| `{name}` | {_fmt(_num(r.get('ms')))} | {r.get('calls')} |")
    return "\n".join(L) + "\n"
