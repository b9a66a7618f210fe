"""summary.md from a results folder's CSVs, and the README's benchmark section from summary.md.

    python -m benchmarks.summary [DIR]              rebuild DIR/summary.md (default: every
                                                    benchmarks/results/<gpu>/ with a run.json)
    python -m benchmarks.summary --readme [DIR...]  rewrite README.md between
                                                    <!-- bench:start --> and <!-- bench:end -->
                                                    from those folders' summary.md
    python -m benchmarks.summary --goals [DIR...]   print the performance goals as ratios of
                                                    the folders' rows: met, NOT met, or not
                                                    measured

summary.md is headed with the card, driver, CUDA, PyTorch and Triton versions and the exact
command (from run.json, written by `python -m benchmarks`); then one table per CSV with ms,
the CSV's rates (GB/s, TFLOP/s, images/s) and each rate as a fraction of the peak measured in
the same run (peak.csv: copy bandwidth for GB/s, the GEMM rate for TFLOP/s), and how many times
faster `ours` is than each baseline at the same case and pass. Nothing is typed by hand except
an optional note.md in the folder (what the run is for), quoted under the header; a new run
in the folder removes it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
# optional context written beside a run's results (for example: the baseline of a piece of
# work); quoted under the header of summary.md, removed when a new run writes the folder
NOTE = "note.md"

# CSV column -> (header, which measured peak it is a fraction of)
RATES: Dict[str, Tuple[str, Optional[str]]] = {
    "gbps": ("GB/s", "gbps"),
    "tflops": ("TFLOP/s", "tflops"),
    "images_per_s": ("images/s", None),
}
# provider names meaning this library's kernels (bench_attention calls its provider "tmsa")
OURS = ("ours", "tmsa")
# the row keys every table needs, and the names some benchmarks use for them
ALIASES = {"case": ("shape",), "pass": ("mode",)}


def load_csv(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:#.3g}"  # three significant digits, trailing zeros kept: 12.3, 1.50, 0.0533


def measured_peaks(rows: List[dict]) -> Dict[str, float]:
    from benchmarks.peak import measured_peaks as _mp

    return _mp(rows)


def normalize(row: dict, op: str) -> dict:
    """The row with op / case / pass filled in from the benchmark's name and the aliases."""
    r = dict(row)
    r["op"] = r.get("op") or op
    for key, names in ALIASES.items():
        if not r.get(key):
            r[key] = next((r[n] for n in names if r.get(n)), "")
    # a variant kept in its own column still tells rows apart (bench_time_qkv)
    variant = str(r.get("variant") or "")
    if variant and variant not in str(r["case"]).split():
        r["case"] = f"{r['case']} {variant}"
    return r


def _pct(frac: float) -> str:
    p = 100 * frac
    return f"{p:.1f}%" if abs(p) < 10 else f"{p:.0f}%"


def _cell(v) -> str:
    return str(v if v is not None else "").replace("|", "/").replace("\n", " ")


def _provider(r: dict) -> str:
    scope = (r.get("compile_scope") or "").strip()
    return f"{r.get('provider', '')} ({scope})" if scope else str(r.get("provider", ""))


def _group_key(r: dict) -> tuple:
    return (r.get("case"), r.get("pass"), r.get("dtype"))


def table(rows: List[dict], peaks: Dict[str, float]) -> str:
    """A markdown table of one CSV's rows; rate columns only where the CSV has them."""
    if not rows:
        return "_no rows_\n"
    cols = rows[0].keys()
    rates = [c for c in RATES if c in cols and any(_num(r.get(c)) is not None for r in rows)]
    ours_ms = {}
    for r in rows:
        if r.get("provider") in OURS and _num(r.get("ms")) is not None:
            ours_ms.setdefault(_group_key(r), []).append(_num(r["ms"]))
    has_speedup = any(len(v) == 1 for v in ours_ms.values()) and \
        any(r.get("provider") not in OURS for r in rows)
    has_mem = "peak_mb" in cols and any(_num(r.get("peak_mb")) is not None for r in rows)
    has_err = "error" in cols and any((r.get("error") or "").strip() for r in rows)

    head = ["case", "pass", "provider", "ms"]
    for c in rates:
        name, peak = RATES[c]
        head.append(name)
        if peak and peak in peaks:
            head.append(f"% of peak {name}")
    if has_mem:
        head.append("peak MB")
    if has_speedup:
        head.append("ours speed-up")
    if has_err:
        head.append("error")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r.get("case")), _cell(r.get("pass")), _cell(_provider(r)),
                 _fmt(_num(r.get("ms")))]
        for c in rates:
            name, peak = RATES[c]
            v = _num(r.get(c))
            cells.append(_fmt(v))
            if peak and peak in peaks:
                cells.append("-" if v is None else _pct(v / peaks[peak]))
        if has_mem:
            cells.append(_fmt(_num(r.get("peak_mb"))))
        if has_speedup:
            mine, ours = _num(r.get("ms")), ours_ms.get(_group_key(r), [])
            show = (r.get("provider") not in OURS and mine is not None and len(ours) == 1)
            cells.append(f"{mine / ours[0]:.2f}x" if show else "")
        if has_err:
            cells.append(_cell(r.get("error")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def short_candidate(candidate: str) -> str:
    """'BLOCK_M=64 BLOCK_N=32 w4 s3' -> '64x32 w4 s3' (the attention kernels' tiles)."""
    return re.sub(r"BLOCK_M=(\d+) BLOCK_N=(\d+)", r"\1x\2", candidate)


def autotune_section(out: Path) -> List[str]:
    """Markdown lines for autotune.csv (benchmarks.common.write_autotune): one row per
    autotuned kernel and key, the chosen candidate first, every candidate's ms and its ratio
    to the fastest. Nothing when the run tuned nothing."""
    path = Path(out) / "autotune.csv"
    if not path.is_file():
        return []
    groups: Dict[tuple, List[dict]] = {}
    for r in load_csv(path):
        groups.setdefault((r.get("kernel", ""), r.get("kind", ""), r.get("key", "")),
                          []).append(r)
    L = ["## Autotune", "", "Every candidate of each autotuned launch as Triton's autotuner "
         "timed it on this card (median ms at that key; x: the ratio to the fastest; the "
         "candidate lists are diffit_kernels/_attention_launch.py `_CONFIG_TABLE` and "
         "diffit_kernels/norm.py `candidates`), and lists `plan` and `table`: the attention "
         "backward's plans and the global table's read (slabs or gather), each timed whole at "
         "the shape's first backward or forward (_attention_plans.py `_choose_plan`).", "",
         "| kernel | list | key | chosen | candidates: ms (x fastest) |", "|---|---|---|---|---|"]
    for (kernel, kind, key), rows in groups.items():
        chosen = next((short_candidate(r["candidate"]) for r in rows
                       if r.get("chosen") == "yes"), "-")
        cells = []
        for r in rows:
            t = _num(r.get("ms"))
            cells.append(f"{short_candidate(r['candidate'])}: " + (
                f"{_fmt(t)} ({_num(r.get('vs_fastest')) or 0:.2f})" if t is not None
                else (r.get("note") or "-")))
        L.append(f"| {kernel} | {kind} | {key} | {chosen} | {'; '.join(cells)} |")
    return L + ["", f"Data: [{path.name}]({path.name})", ""]


def build_summary(out: Path) -> str:
    """The text of summary.md for a results folder (run.json + the CSVs it lists)."""
    out = Path(out)
    meta = {}
    if (out / "run.json").exists():
        meta = json.loads((out / "run.json").read_text())
    env = meta.get("environment", {})
    entries = meta.get("benchmarks")
    if entries is None:  # a folder of CSVs without run.json: take them all
        entries = [dict(name=p.stem, csv=[p.name], status="ok")
                   for p in sorted(out.glob("*.csv"))]
    claimed = {c for e in entries for c in e.get("csv", [])}
    for e in entries:  # a benchmark killed mid-run: its CSV is on disk but in no entry
        if not e.get("csv") and str(e.get("status", "")).startswith(("running", "interrupted")):
            e["csv"] = sorted(p.name for p in out.glob("*.csv") if p.name not in claimed)
            claimed.update(e["csv"])
    csvs = {e["name"]: [out / c for c in e.get("csv", []) if (out / c).exists()]
            for e in entries}
    rows_of = {p: load_csv(p) for ps in csvs.values() for p in ps}  # each CSV read once
    peak_rows = [r for p in csvs.get("peak", []) for r in rows_of[p]]
    peaks = measured_peaks(peak_rows)
    if not env:  # no run.json: fall back on what every row carries
        first = next((rows[0] for rows in rows_of.values() if rows), {})
        env = {k: first[k] for k in ("card", "torch", "triton") if k in first}

    dtype = meta.get("dtype", "?")
    L = [f"# diffit-kernels benchmarks: {env.get('card', '?')}", ""]
    if meta.get("tiny_cpu"):
        L += ["**Harness check on CPU at tiny sizes (`--tiny-cpu`): these are not benchmark "
              "results.**", ""]
    if meta and meta.get("finished") is False:
        L += ["**This run did not finish: the tables hold what was measured before it "
              "stopped (see each benchmark's status).**", ""]
    L += ["| | |", "|---|---|"]
    for label, value in (("card", env.get("card")), ("driver", env.get("driver")),
                         ("CUDA", env.get("cuda")), ("PyTorch", env.get("torch")),
                         ("Triton", env.get("triton")), ("Python", env.get("python")),
                         ("dtype", dtype), ("commit", meta.get("git")),
                         ("date", meta.get("started")),
                         ("time budget", f"{meta['budget_s']:.0f} s" if meta.get("budget_s")
                          else None)):
        L.append(f"| {label} | {value if value else '-'} |")
    cmd = meta.get("command") or env.get("command")
    L.append(f"| command | `{cmd}` |" if cmd else "| command | - |")
    L.append("")
    note = out / NOTE
    if note.is_file():  # what this run is for; a new run in the folder removes it
        L += [note.read_text().strip(), ""]
    if peaks:
        parts = []
        if "gbps" in peaks:
            parts.append(f"device-to-device copy **{peaks['gbps']:,.0f} GB/s**")
        if "tflops" in peaks:
            parts.append(f"{dtype} GEMM (torch.matmul) **{peaks['tflops']:,.1f} TFLOP/s**")
        L += ["Peaks measured in this run: " + ", ".join(parts) + ". A \"% of peak\" column "
              "is a row's rate as a fraction of these.", ""]
    timings = {r.get("timing", "") for rows in rows_of.values() for r in rows}
    if "cuda graph" in timings:
        fell_back = sorted({t for t in timings if t.startswith("do_bench (")})
        how = ("The op rows are GPU times: medians of `triton.testing.do_bench_cudagraph` (the "
               "call captured in a CUDA graph and replayed, as training replays it: no host "
               "launch cost, L2 not flushed); the model steps and the peaks are medians of "
               "`triton.testing.do_bench` (one call at a time from the host, L2 flushed "
               "between calls: host time included). Warm-up, compilation and autotuning "
               "excluded." + (f" {len(fell_back)} kind(s) of op row fell back to do_bench "
                              "(the CSVs' timing column says why)." if fell_back else ""))
    else:
        how = ("Times are medians of `triton.testing.do_bench` (warm-up, compilation and "
               "autotuning excluded, L2 flushed between calls).")
    L += [how + " TFLOP/s for attention use FlashAttention's "
          "convention (forward 4·B·H·N²·d, backward 2.5x that). \"ours speed-up\" is a "
          "row's ms divided by `ours`' ms at the same case and pass (above 1: ours is "
          "faster). Each benchmark's CSV holds every column.", ""]
    goals = goals_table(out)
    if goals:
        L += ["## Goals", "", "The performance goals as ratios of rows measured in this run "
              "(ms ratios: above 1 means the denominator is faster; GB/s as a fraction of "
              "the measured copy bandwidth).", "", goals]
    for e in entries:
        name = e["name"]
        L.append(f"## {name}")
        L.append("")
        if e.get("status", "ok") != "ok":
            L += [f"Status: {e['status']}", ""]
        if name == "explore":
            from benchmarks.explore import section

            L.append(section(csvs.get(name, [])))
            L += ["", "Data: " + ", ".join(f"[{p.name}]({p.name})" for p in csvs[name]), ""]
            continue
        if name == "profile":
            from benchmarks.profile_step import section

            L.append(section(csvs.get(name, [])))
            L += [f"![{Path(q).stem}]({q})" for q in e.get("png", []) if (out / q).exists()]
            L += ["", "Data: " + ", ".join(f"[{p.name}]({p.name})" for p in csvs[name]), ""]
            continue
        for p in csvs.get(name, []):
            L.append(table([normalize(r, name) for r in rows_of[p]], peaks))
            pngs = [q for q in e.get("png", []) if (out / q).exists()] if "png" in e else \
                sorted(q.name for q in out.glob(p.stem + "*.png"))
            mine = [q for q in pngs if len(csvs[name]) == 1 or Path(q).stem.startswith(p.stem)]
            L += [f"![{Path(q).stem}]({q})" for q in mine]
            L += ["", f"Data: [{p.name}]({p.name})", ""]
    L += autotune_section(out)
    if any("seconds" in e for e in entries):
        L += ["## Wall time", "", "| benchmark | status | seconds |", "|---|---|---|"]
        for e in entries:
            L.append(f"| {e['name']} | {e.get('status', '')} | {e.get('seconds', '-')} |")
        if "seconds" in meta:
            L.append(f"| all | | {meta['seconds']} |")
        L.append("")
    return "\n".join(L)


# ---- the goals of the performance issues, as ratios measured in one run --------------------
# (label, csv stem prefix, case regex, pass, numerator provider, denominator provider, column,
#  "<=" or ">=", target). Ratio = numerator / denominator of `column` at the same case and pass;
# "peak:gbps" as denominator means the copy bandwidth measured in the same run.
GOALS = [
    ("attention fwd+bwd {case}: tmsa / flash without bias", "attention", r"^latent",
     "fwd+bwd", "tmsa", "sdpa-flash", "ms", "<=", 1.25),
    ("attention fwd {case}: tmsa / flash without bias", "attention", r"^latent", "fwd",
     "tmsa", "sdpa-flash", "ms", "<=", 1.2),
    ("attention fwd+bwd {case}: Flex / tmsa", "attention", r"^latent", "fwd+bwd", "flex",
     "tmsa", "ms", ">=", 2.5),
    ("attention fwd+bwd {case}: SDPA dense bias / tmsa", "attention", r"^latent", "fwd+bwd",
     "sdpa-membias", "tmsa", "ms", ">=", 1.7),
    ("attention fwd+bwd {case}: tmsa / memory-traffic limit", "attention", r"^img",
     "fwd+bwd", "tmsa", "memory limit", "ms", "<=", 2.0),
    ("attention fwd+bwd {case}: SDPA dense bias / tmsa", "attention", r"^img", "fwd+bwd",
     "sdpa-membias", "tmsa", "ms", ">=", 4.0),
    ("time_qkv fwd {case}: ours / bare GEMM", "time_qkv", r"ln\+temb", "fwd", "ours", "cublas",
     "ms", "<=", 1.1),
    ("time_qkv bwd {case}: ours / bare GEMMs dX + dW", "time_qkv", r"ln\+temb", "bwd", "ours",
     "cublas", "ms", "<=", 1.1),
    ("time_qkv fwd+bwd {case}: compile / ours", "time_qkv", r"ln\+temb", "fwd+bwd",
     "compile", "ours", "ms", ">=", 1.3),
    ("adaln_norm fwd {case}: ours / copy bandwidth", "adaln_norm", r"", "fwd", "ours",
     "peak:gbps", "gbps", ">=", 0.85),
    ("adaln_norm bwd {case}: ours / copy bandwidth", "adaln_norm", r"", "bwd", "ours",
     "peak:gbps", "gbps", ">=", 0.70),
    ("adaln_norm fwd {case}: compile / ours", "adaln_norm", r"", "fwd", "compile", "ours",
     "ms", ">=", 1.0),
    ("adaln_norm bwd {case}: compile / ours", "adaln_norm", r"", "bwd", "compile", "ours",
     "ms", ">=", 1.0),
    ("model {case}: compile / ours", "model", r"256px B32$", "fwd+bwd+adamw", "compile",
     "ours", "ms", ">=", 1.5),
    ("model {case}: compile / ours+compile", "model", r"256px B32$", "fwd+bwd+adamw",
     "compile", "ours+compile", "ms", ">=", 1.5),
    # ours+graphs: what `python -m diffit train` runs in one process on CUDA with our kernels
    ("model {case}: compile / ours+graphs", "model", r"256px B32$", "fwd+bwd+adamw",
     "compile", "ours+graphs", "ms", ">=", 1.5),
    # the same yardstick with CUDA graphs: what the trainer runs when its trial picks the
    # reference, so also which of the two a run of `python -m diffit train` should pick
    ("model {case}: compile+graphs / ours+graphs", "model", r"256px B32$", "fwd+bwd+adamw",
     "compile+graphs", "ours+graphs", "ms", ">=", 1.5),
    ("model {case}: peak memory ours+compile / compile", "model", r"256px B32$",
     "fwd+bwd+adamw", "ours+compile", "compile", "peak_mb", "<=", 1.0),
    ("model {case}: peak memory ours+graphs / compile", "model", r"256px B32$",
     "fwd+bwd+adamw", "ours+graphs", "compile", "peak_mb", "<=", 1.0),
    ("model {case}: compile / ours+compile", "model", r"512px", "fwd+bwd+adamw", "compile",
     "ours+compile", "ms", ">=", 1.5),
    ("model {case}: compile / ours+graphs", "model", r"512px", "fwd+bwd+adamw", "compile",
     "ours+graphs", "ms", ">=", 1.5),
    ("model {case}: compile / ours+compile", "model", r"U-Net", "fwd+bwd+adamw", "compile",
     "ours+compile", "ms", ">=", 1.3),
    ("model {case}: compile / ours+graphs", "model", r"U-Net", "fwd+bwd+adamw", "compile",
     "ours+graphs", "ms", ">=", 1.3),
    ("model {case}: compile+graphs / ours+graphs", "model", r"U-Net", "fwd+bwd+adamw",
     "compile+graphs", "ours+graphs", "ms", ">=", 1.3),
    ("model {case} guided sampling: compile / ours+compile", "model", r"DDIM", "guided sampling",
     "compile", "ours+compile", "ms", ">=", 1.3),
]


def goal_rows(out: Path) -> List[Tuple[str, Optional[float], str, str]]:
    """(goal, measured ratio or None, target such as "<= 1.25", "met" / "NOT met" / why not
    measured) for every goal whose benchmark has rows in the folder."""
    out = Path(out)
    peaks = measured_peaks([r for p in out.glob("peak*.csv") for r in load_csv(p)])
    res = []
    for label, stem, case_re, pass_, num, den, col, op, target in GOALS:
        rows = [normalize(r, stem) for p in sorted(out.glob(stem + "*.csv"))
                for r in load_csv(p)]
        cases = list(dict.fromkeys(r["case"] for r in rows
                                   if re.search(case_re, str(r["case"])) and
                                   r.get("pass") == pass_))

        def value(case, prov):
            if prov.startswith("peak:"):
                return peaks.get(prov.split(":", 1)[1])
            hits = [_num(r.get(col)) for r in rows if r["case"] == case and
                    r.get("pass") == pass_ and r.get("provider") == prov]
            return hits[0] if len(hits) == 1 else None

        for case in cases:
            a, b = value(case, num), value(case, den)
            ratio = a / b if a is not None and b else None
            status = "not measured" if ratio is None else (
                "met" if (ratio <= target if op == "<=" else ratio >= target) else "NOT met")
            res.append((label.format(case=case), ratio, f"{op} {target:g}", status))
    return res


def goals_table(out: Path) -> str:
    rows = goal_rows(out)
    if not rows:
        return ""
    L = ["| goal | measured | target | |", "|---|---|---|---|"]
    for label, ratio, target, status in rows:
        L.append(f"| {label} | {'-' if ratio is None else f'{ratio:.2f}'} | {target} | "
                 f"{status} |")
    return "\n".join(L) + "\n"


def write_summary(out: Path) -> Path:
    out = Path(out)
    text = build_summary(out)
    path = out / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def result_dirs(root: Path = RESULTS) -> List[Path]:
    """Committed results folders: benchmarks/results/<gpu>/ holding a summary.md."""
    if not root.exists():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith("_tmp") and (d / "summary.md").exists())


def readme_section(dirs: Sequence[Path], readme: Path) -> str:
    """The generated text between the markers: every summary.md, headings two levels down and
    links made relative to the README."""
    parts = []
    for d in dirs:
        rel = os.path.relpath(d, readme.parent).replace(os.sep, "/")
        text = (d / "summary.md").read_text()
        # the per-candidate autotune table is data for the kernels' authors: summary.md only
        text = re.sub(r"^## Autotune\n.*?(?=^## |\Z)", "", text, flags=re.M | re.S)
        text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text,
                      flags=re.M)
        text = re.sub(r"\]\(([^)/:#]+\.(?:png|csv))\)", lambda m: f"]({rel}/{m.group(1)})", text)
        parts.append(f"<!-- generated by `python -m benchmarks.summary --readme` from "
                     f"{rel}/summary.md: do not edit by hand -->\n\n{text.strip()}\n")
    return "\n".join(parts)


def update_readme(readme: Path, dirs: Sequence[Path]) -> bool:
    """Replace the text between the markers; True when the README changed."""
    readme = Path(readme)
    if not readme.exists():
        raise FileNotFoundError(f"{readme} does not exist")
    if not dirs:
        raise ValueError("no benchmarks/results/<gpu>/summary.md to quote: run "
                         "`python -m benchmarks` on a CUDA GPU first")
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i or text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"{readme} must hold exactly one {START} followed by one {END}")
    new = text[:i + len(START)] + "\n" + readme_section(dirs, readme) + text[j:]
    if new == text:
        return False
    tmp = readme.with_suffix(readme.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", type=Path,
                   help="results folders (default: every benchmarks/results/<gpu>/)")
    p.add_argument("--readme", action="store_true",
                   help="rewrite the README's benchmark section from the folders' summary.md")
    p.add_argument("--goals", action="store_true",
                   help="print the goal ratios of the folders' CSVs (met / NOT met) and exit")
    p.add_argument("--readme-file", type=Path, default=README, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.goals:
        for d in a.dirs or result_dirs():
            rows = goal_rows(d)
            print(f"{d}: {sum(r[3] == 'met' for r in rows)} of {len(rows)} goals met")
            for label, ratio, target, status in rows:
                print(f"  {'-' if ratio is None else f'{ratio:6.2f}':>6}  {target:8} "
                      f"{status:12} {label}")
        return 0
    if a.readme:
        dirs = a.dirs or result_dirs()
        try:
            changed = update_readme(a.readme_file, dirs)
        except (FileNotFoundError, ValueError) as e:
            print(f"python -m benchmarks.summary --readme: {e}", file=sys.stderr)
            return 1
        print(f"{a.readme_file}: benchmark section {'rewritten' if changed else 'unchanged'} "
              f"from {', '.join(str(d / 'summary.md') for d in dirs)}")
        return 0
    dirs = a.dirs or [d for d in (sorted(RESULTS.iterdir()) if RESULTS.exists() else [])
                      if d.is_dir() and not d.name.startswith("_tmp")
                      and (d / "run.json").exists()]
    if not dirs:
        print("no results folder with a run.json: run `python -m benchmarks` first",
              file=sys.stderr)
        return 1
    for d in dirs:
        print(f"wrote {write_summary(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
