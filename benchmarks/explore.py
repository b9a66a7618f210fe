"""Tile exploration on the card: `python -m benchmarks --ops explore`.

The attention kernels' shipped candidate lists (diffit_kernels/_attention_launch.py
`_CONFIG_TABLE`) were chosen without a card, from compile reports: what each tile costs in
registers, spills, shared memory and SASS instructions per score. Only a card can say which tile
is fastest, and cards are lent for minutes. This benchmark is sized for a minute or two of
one (an estimate, not yet run on a card: the tiles compiled in threads, each timed once per
case) to time a whole grid of tiles (SPACE) at the shapes that dominate DiffiT training:
DiffiT-XL/2 at 256 px (B32, 16 heads, 16x16 tokens, d 72, the bias table and its gradient,
bf16) and at 512 px (B8, 32x32 tokens), then the ffhq64 U-Net's costliest attention (its 64x64
level: 8x8 windows, 2 heads of d 64, B64), so a later session can reorder and prune the shipped
lists by measurement. The cases run in that order, each list's time budget checked first.

How: for each kernel kind, the kind's list at the case's head dim is widened to SPACE plus its
shipped configs, and one forward (and backward) of tmsa_attention runs with the backward plan
that launches that kind (the case's kinds; where a shape lacks that plan, another that
launches the kind). The kind's autotuner, a new one for the widened list, compiles every
candidate in threads and times each on the card as any tuned launch does (do_bench,
_common.tuning_bench): those times are the rows (explore.csv's only: autotune.csv keeps to the
shipped lists). A candidate past the card's shared memory or registers is a row that did not
fit. Each kind runs in its own try, so one that fails (a tile this Triton cannot build) is a
row with its error and the others still run; the time budget (--budget-s) is checked before
each kind.

explore.csv: one row per candidate: case, kind (the list), kernel, key (the autotune key),
candidate (BLOCK_M x BLOCK_N, warps, stages), ms (median), vs_best (its ms over the fastest's),
shipped ("first": the list's first config, what runs untuned; "listed": another of the list;
empty: only in SPACE). summary.md gets a row per list: the fastest candidates, the shipped
list's fastest and its first, each with its time (section(), which benchmarks.summary calls).

    python -m benchmarks --ops explore [--out DIR]
On CPU (--tiny-cpu, the harness) nothing is tuned: the same code runs the widened lists at a
tiny shape through the ops' CPU path and writes rows without times.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from benchmarks.common import (after_error, cuda_or_explain, environment, error_text,
                               out_of_time, results_dir, save_figure, skipped_text,
                               write_csv)

# (kind, backward plan that launches it; None: forward only). dkdv-acc: the dK/dV pass that
# sums dS into the table partials (plans "samples" and "shares"); dkdv: without them (plan
# "separate", the table's gradient in a pass of its own). Windows: the same kinds' windowed
# lists, and the fused backward at one 8x8 window per 64x64 tile (plan "wide"), whose configs
# vary only warps and stages
GLOBAL_KINDS: Tuple[Tuple[str, Optional[str]], ...] = (
    ("fwd", None), ("dkdv-acc", "samples"), ("dq", "samples"), ("dkdv", "separate"))
WINDOW_KINDS: Tuple[Tuple[str, Optional[str]], ...] = (
    ("fwd-win", None), ("dkdv-win-acc", "samples"), ("dq-win", "samples"),
    ("dkdv-win", "separate"), ("window-wide", "wide"))
# (label, B, H, grid, window, d, kinds): DiffiT-XL/2's training shapes, 256 px at the trainer's
# B32, then 512 px at B8 (its key's own tiles: N 1024; the builds are the first case's, only
# timed again); the ffhq64 U-Net's 64x64 level at B64 (128 channels: 2 heads of d 64)
CASES = (("latent256-B32", 32, 16, (16, 16), None, 72, GLOBAL_KINDS),
         ("latent512-B8", 8, 16, (32, 32), None, 72, GLOBAL_KINDS),
         ("ffhq64-64px-B64", 64, 2, (64, 64), (8, 8), 64, WINDOW_KINDS))
TINY_CASES = (("tiny-global", 2, 2, (4, 4), None, 72, GLOBAL_KINDS),
              ("tiny-win", 1, 2, (16, 8), (8, 8), 64, WINDOW_KINDS))
# every explored list once: (kind, plan, d)
LISTS = tuple(dict.fromkeys((kind, plan, c[5]) for c in CASES for kind, plan in c[6]))
# A rough count of the 32-bit registers a thread's tiles take (fp32 score tiles and
# accumulators, 16-bit operands at half, d in its padded chunks: 72 as 64 + 16): tiles past
# LIVE_MAX spill hundreds of bytes (ptxas then takes seconds each) and are left out of the
# grids. It undercounts (the shipped dK/dV tile 32x64 w8, 76 here at d 72, takes 165 registers
# on sm_90a): a ranking, not a count.
LIVE_MAX = 160
# windowed grids: a warp keeps at least this many scores of a tile (8 a thread; more warps idle
# on the small tiles)
MIN_SCORES_PER_WARP = 256


def shape_of(d: int) -> Tuple[int, int]:
    """The _CONFIG_TABLE key of head dim d: its chunks (D0, D1), D1 0 for one chunk."""
    from diffit_kernels._attention_launch import _head_split

    D0, D1, has_d1 = _head_split(d)
    return D0, D1 if has_d1 else 0


def padded(d: int) -> int:
    """The head dim as the kernels hold it: its one or two power-of-two chunks."""
    return sum(shape_of(d))


def live_per_thread(kind: str, bm: int, bn: int, warps: int, d: int = 72) -> float:
    threads, dp = 32 * warps, padded(d)
    if kind.startswith("fwd"):     # scores, the output accumulator, q
        return (bm * bn + bm * dp + bm * dp / 2) / threads
    if kind.startswith("dq"):      # scores and dP, the dq accumulator, q and dO
        return (2 * bm * bn + bm * dp + bm * dp) / threads
    return (2 * bm * bn + 2 * bn * dp + bn * dp) / threads  # dK/dV: + dk, dv, k and v


def _grid(kind: str, d: int, bms, bns, warps, stages) -> List[Tuple[int, int, int, int]]:
    return [c for c in itertools.product(bms, bns, warps, stages)
            if live_per_thread(kind, *c[:3], d) <= LIVE_MAX]


def _win_grid(kind: str, span: int = 64) -> List[Tuple[int, int, int, int]]:
    """A windowed kind's grid at d 64: tiles up to the window's span (a wider one computes
    scores of other windows), 1 to 8 warps with at least MIN_SCORES_PER_WARP scores each, and
    a second stage only where the loop has a second tile to prefetch (its tile, keys for the
    forward and dQ, queries for dK/dV, narrower than the span)."""
    loop = 0 if kind.startswith("dkdv") else 1
    return [c for c in _grid(kind, 64, _WIN_TILES, _WIN_TILES, (1, 2, 4, 8), (1, 2))
            if c[2] * MIN_SCORES_PER_WARP <= c[0] * c[1] and (c[3] == 1 or c[loop] < span)]


# (BLOCK_M, BLOCK_N, warps, stages) grids per kind; the shipped configs join each
_WIN_TILES = (16, 32, 64)
SPACE: Dict[str, List[Tuple[int, int, int, int]]] = {
    "fwd": _grid("fwd", 72, (64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4)),
    "dkdv-acc": _grid("dkdv-acc", 72, (16, 32, 64), (32, 64, 128), (4, 8), (1, 2, 3)),
    "dq": _grid("dq", 72, (32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3)),
    "dkdv": _grid("dkdv", 72, (16, 32, 64), (32, 64, 128), (4, 8), (1, 2, 3)),
    "fwd-win": _win_grid("fwd-win"),
    "dkdv-win-acc": _win_grid("dkdv-win-acc"),
    "dq-win": _win_grid("dq-win"),
    "dkdv-win": _win_grid("dkdv-win"),
    "window-wide": [(64, 64, w, st) for w in (4, 8) for st in (1, 2, 3)],
}
TINY_SPACE = 2  # candidates per kind on CPU: the shipped first and one of SPACE
# the backward plans that launch each backward kind (a shape without the kind's own plan among
# its plans runs the first of these it has)
_RUNS = {"dkdv-acc": ("samples", "shares"), "dq": ("samples", "shares", "separate"),
         "dkdv": ("separate", "separate-64"), "dkdv-win-acc": ("samples", "shares"),
         "dq-win": ("samples", "shares", "separate"), "dkdv-win": ("separate",),
         "window-wide": ("wide",)}


def shipped(kind: str, d: int = 72) -> List[Tuple[int, int, int, int]]:
    """The kind's shipped 16-bit list at head dim d (no dense bias)."""
    from diffit_kernels._attention_launch import _CONFIG_TABLE

    default, per_shape = _CONFIG_TABLE[(kind, False, 2)]
    return list(per_shape.get(shape_of(d), default))


def candidates(kind: str, d: int = 72, tiny: bool = False) -> List[Tuple[int, int, int, int]]:
    """The widened list: the shipped configs first (in their order), then SPACE's others."""
    ship = shipped(kind, d)
    if tiny:
        return ship[:1] + [c for c in SPACE[kind] if c not in ship][:TINY_SPACE - 1]
    return ship + [c for c in SPACE[kind] if c not in ship]


@contextlib.contextmanager
def widened(kind: str, configs: Sequence[tuple], d: int = 72) -> Iterator[None]:
    """The kind's 16-bit list at head dim d set to `configs` for the block (a new list is a
    new autotuner: the launchers key theirs on the list)."""
    from diffit_kernels import _attention_launch as AL

    key = (kind, False, 2)
    saved = AL._CONFIG_TABLE[key]
    AL._CONFIG_TABLE[key] = (saved[0], {**saved[1], shape_of(d): list(configs)})
    try:
        yield
    finally:
        AL._CONFIG_TABLE[key] = saved


def _short(cfg: tuple) -> str:
    """'64x32 w4 s3': a (BLOCK_M, BLOCK_N, warps, stages) config as summary.short_candidate
    writes the autotuners' names of it."""
    bm, bn, w, s = cfg
    return f"{bm}x{bn} w{w} s{s}"


def _tuned_name(kind: str, cfg: tuple) -> str:
    """The config as the kind's autotune record names it (summary.short_candidate): the fused
    backward's "wide" tile is fixed, so its records name warps and stages only."""
    return _short(cfg) if kind != "window-wide" else f"w{cfg[2]} s{cfg[3]}"


def _take_tuned(n0: int, kind: str, size: int) -> List[dict]:
    """The autotune records (diffit_kernels._common._TUNED) made after the first n0 of the
    kind's launches whose candidate list has `size` entries, the widened list's, taken out of
    the process's record: they are explore.csv's, and autotune.csv keeps to the shipped lists
    (whose candidates the card chose among)."""
    from diffit_kernels import _common

    mine = [i for i, r in enumerate(_common._TUNED) if i >= n0 and r["kind"] == kind
            and len(r["candidates"]) == size]
    taken = [_common._TUNED[i] for i in mine]
    gone = set(mine)
    _common._TUNED[:] = [r for i, r in enumerate(_common._TUNED) if i not in gone]
    return taken


def _run_kind(kind: str, plan: Optional[str], case: tuple, device, tiny: bool) -> List[dict]:
    """One kind's widened list tuned at the case (rows per candidate; without CUDA rows with
    no times)."""
    from diffit_kernels import _attention_plans as AP
    from diffit_kernels import attention as A
    from diffit_kernels import tmsa_attention
    from diffit_kernels import _common
    from diffit_kernels.testing import module_setting

    from benchmarks.bench_attention import _inputs

    label, B, H, grid, window, d = case[:6]
    N = grid[0] * grid[1]
    cfgs = candidates(kind, d, tiny)
    ship = shipped(kind, d)
    # the attention benchmark's inputs: q, k, v views of one packed projection, the table
    q, k, v, table = _inputs(B, H, grid, window, d, torch.bfloat16, device)
    if plan is not None:  # the kind's plan where the shape has it, else the first that
        plans = AP._plans_of(B, H, N, d, torch.bfloat16, [*grid, *(window or grid)], device)
        plan = plan if plan in plans else next((p for p in plans if p in _RUNS[kind]),
                                               plans[0])  # runs it
    n0 = len(_common._TUNED)
    with widened(kind, cfgs, d), module_setting(AP, "BWD_PLAN", plan), \
            module_setting(A, "TABLE_READ", "slabs"):
        o = tmsa_attention(q, k, v, table=table, grid=grid, window=window)
        if plan is not None:
            o.backward(torch.randn_like(o))
    if device.type == "cuda":
        torch.cuda.synchronize()
    recs = _take_tuned(n0, kind, len(cfgs))
    if not recs:  # nothing tuned: no CUDA (or one config): the candidates, untimed
        return [_row(label, kind, candidate=_short(c), shipped=_shipped(c, ship),
                     error="" if device.type != "cuda" else "not tuned") for c in cfgs]
    from benchmarks.summary import short_candidate

    rows = []
    for rec in recs:
        times = {short_candidate(cand): t for cand, t in rec["candidates"]}
        finite = [t for t in times.values() if t is not None and math.isfinite(t)]
        best = min(finite, default=math.nan)
        for c in cfgs:
            t = times.get(_tuned_name(kind, c))
            ok = t is not None and math.isfinite(t)
            rows.append(_row(label, kind, kernel=rec["kernel"], key=rec["key"],
                             candidate=_short(c), ms=t if ok else math.nan,
                             vs_best=t / best if ok and best > 0 else math.nan,
                             shipped=_shipped(c, ship),
                             error="" if ok else ("did not fit the card" if t is not None
                                                  else "not measured")))
    return rows


def _row(label: str, kind: str, **fields) -> dict:
    """One explore.csv row of a case's list: every column, `fields` over the defaults (the
    candidate is also the row's provider, the column summary tables read)."""
    row = dict(op="explore", case=f"{label} {kind}", kind=kind, kernel="", key="",
               candidate="", ms=math.nan, vs_best=math.nan, shipped="", error="",
               **{"pass": kind})
    row.update(fields)
    row["provider"] = row["candidate"]
    return row


def _shipped(cfg: tuple, ship: List[tuple]) -> str:
    return "first" if ship and cfg == ship[0] else "listed" if cfg in ship else ""


def run(quick: bool = False, dtype: str = "bf16", out_dir: Optional[str] = None,
        tiny_cpu: bool = False) -> List[dict]:
    """Tune each of a case's kinds' widened lists at the case, case after case; write
    explore.csv; return the rows. The cases are bf16 whatever `dtype` (the training default);
    quick changes nothing."""
    if not tiny_cpu and not cuda_or_explain("explore"):
        return []
    device = torch.device("cpu" if tiny_cpu else "cuda")
    env = environment()
    out = results_dir(out_dir)
    rows: List[dict] = []
    for case, (kind, plan) in ((c, k) for c in (TINY_CASES if tiny_cpu else CASES)
                               for k in c[6]):
        if out_of_time():
            got = [_row(case[0], kind, error=skipped_text())]
        else:
            try:
                got = _run_kind(kind, plan, case, device, tiny_cpu)
            except Exception as e:  # noqa: BLE001 - recorded in the row, the others still run
                if tiny_cpu:
                    raise
                got = [_row(case[0], kind, error=error_text(e))]
                del e
                after_error()
        rows += [dict(r, card=env["card"], torch=env["torch"], triton=env["triton"])
                 for r in got]
        timed = [r for r in got if not math.isnan(r["ms"])]
        fastest = min(timed, key=lambda r: r["ms"], default=None)
        print(f"explore {case[0] + ' ' + kind:29} {len(got)} candidates, {len(timed)} timed"
              + (f", fastest {fastest['candidate']} {fastest['ms']:.4g} ms" if fastest else
                 f": {got[0]['error']}" if got and got[0]["error"] else ""), flush=True)
        write_csv(out / "explore.csv", rows)  # after every kind: a killed run keeps them
    rank_plot(out / "explore.png", rows)
    return rows


def rank_plot(path, rows: List[dict]) -> None:
    """One panel per list and case: every timed candidate's ms over the fastest's, ranked
    fastest first, the shipped ones marked (the first, what runs untuned, apart): how far the
    shipped list is from the best tile, and how many tiles are near it. Atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r["case"], []).append(r)
    cols = max(1, min(4, len(groups)))
    lines = max(1, -(-len(groups) // cols))
    fig, axes = plt.subplots(lines, cols, squeeze=False, figsize=(4.2 * cols, 3.4 * lines))
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (case, sub) in zip(axes.flat, groups.items()):
        ax.set_visible(True)
        timed = sorted((r for r in sub if not math.isnan(r["ms"])), key=lambda r: r["ms"])
        ax.set_title(case, fontsize=9)
        if not timed:
            ax.text(0.5, 0.5, "none timed", ha="center", va="center", transform=ax.transAxes)
            continue
        best = timed[0]["ms"]
        ax.plot(range(len(timed)), [r["ms"] / best for r in timed], ".", color="0.6",
                label="explored")
        for mark, which, color in (("o", "listed", "tab:blue"), ("*", "first", "tab:red")):
            got = [(i, r["ms"] / best) for i, r in enumerate(timed) if r["shipped"] == which]
            if got:
                ax.plot(*zip(*got), mark, color=color, markersize=8,
                        label="shipped first (untuned)" if which == "first" else "shipped")
        ax.set_xlabel("candidates, fastest first", fontsize=8)
        ax.set_ylabel("ms / fastest", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("attention tiles explored (benchmarks/explore.py)")
    save_figure(fig, path)


TOP = 5  # fastest candidates listed per list in summary.md


def section(paths: Sequence) -> str:
    """summary.md's explore section from explore.csv: per widened list and key, its TOP
    fastest candidates, the shipped list's fastest and its first (what runs untuned), each
    with its ms and its ratio to the fastest."""
    from benchmarks.summary import load_csv

    groups: Dict[tuple, List[dict]] = {}
    for p in paths:
        for r in load_csv(p):
            groups.setdefault((r.get("case", ""), r.get("key", "")), []).append(r)
    if not groups:
        return "_no rows_\n"

    def ms(r) -> float:
        try:
            return float(r.get("ms") or "nan")
        except ValueError:
            return math.nan

    L = ["Each list widened to a grid of tiles and timed by its autotuner on this card "
         "(benchmarks/explore.py; median ms, x: the ratio to the fastest).", "",
         "| list | fastest | shipped list's fastest | shipped first (untuned) | timed |",
         "|---|---|---|---|---|"]
    for (case, key), rows in groups.items():
        timed = sorted((r for r in rows if not math.isnan(ms(r))), key=ms)
        if not timed:
            err = next((r.get("error") for r in rows if r.get("error")), "") or "none timed"
            L.append(f"| {case} | - | - | - | 0 of {len(rows)}: {err} |")
            continue
        best = ms(timed[0])

        def cell(r) -> str:
            return f"{r['candidate']} {ms(r):.4g} ({ms(r) / best:.2f})" if r else "-"

        ship = [r for r in timed if r.get("shipped")]
        first = next((r for r in timed if r.get("shipped") == "first"), None)
        top = "; ".join(cell(r) for r in timed[:TOP])
        L.append(f"| {case} | {top} | {cell(ship[0] if ship else None)} | {cell(first)} | "
                 f"{len(timed)} of {len(rows)} |")
    return "\n".join(L) + "\n"
