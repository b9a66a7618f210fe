"""Tile exploration on the card: `python -m benchmarks --ops explore`.

The attention kernels' shipped candidate lists (diffit_kernels/_attention_launch.py
`_CONFIG_TABLE`) were chosen without a card, from compile reports: what each tile costs in
registers, spills, shared memory and SASS instructions per score. Only a card can say which tile
is fastest, and cards are lent for minutes. This benchmark is sized for about a minute of one
(an estimate, not yet run on a card: 163 tiles compiled in threads, each timed at two shapes) to
time a whole grid of tiles (SPACE) at the shapes that dominate DiffiT training, DiffiT-XL/2 at
256 px (B32, 16 heads, 16x16 tokens, d 72, the bias table and its gradient, bf16) and at 512 px
(B8, 32x32 tokens), so a later session can reorder and prune the shipped lists by measurement.

How: for each kernel kind, the kind's list at d 72 is widened to SPACE plus its shipped
configs, and one forward (and backward) of tmsa_attention runs with the backward plan that
launches that kind (KINDS; where a shape lacks that plan, another that launches the kind). The
kind's autotuner, a new one for the widened list, compiles every candidate in threads and times
each on the card as any tuned launch does (do_bench, _common.tuning_bench): those times are the
rows (explore.csv's only: autotune.csv keeps to the
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

# DiffiT-XL/2's training shapes (label, B, H, grid, d): 256 px at the trainer's B32, then 512
# px at B8 (its key's own tiles: N 1024; the builds are the first case's, only timed again)
CASES = (("latent256-B32", 32, 16, (16, 16), 72), ("latent512-B8", 8, 16, (32, 32), 72))
TINY_CASE = ("tiny-global", 2, 2, (4, 4), 72)
SHAPE = (64, 16)  # d 72's head-dim chunks: the lists this explores
# (kind, backward plan that launches it; None: forward only). dkdv-acc: the dK/dV pass that
# sums dS into the table partials (plans "samples" and "shares"); dkdv: without them (plan
# "separate", the table's gradient in a pass of its own)
KINDS: Tuple[Tuple[str, Optional[str]], ...] = (
    ("fwd", None), ("dkdv-acc", "samples"), ("dq", "samples"), ("dkdv", "separate"))
# A rough count of the 32-bit registers a thread's tiles take (fp32 score tiles and
# accumulators, 16-bit operands at half, d 72 padded to 80): tiles past LIVE_MAX spill hundreds
# of bytes (ptxas then takes seconds each) and are left out of the grids. It undercounts (the
# shipped dK/dV tile 32x64 w8, 76 here, takes 165 registers on sm_90a): a ranking, not a count.
D_PAD, LIVE_MAX = 80, 160


def live_per_thread(kind: str, bm: int, bn: int, warps: int) -> float:
    threads = 32 * warps
    if kind == "fwd":      # scores, the output accumulator, q
        return (bm * bn + bm * D_PAD + bm * D_PAD / 2) / threads
    if kind == "dq":       # scores and dP, the dq accumulator, q and dO
        return (2 * bm * bn + bm * D_PAD + bm * D_PAD) / threads
    return (2 * bm * bn + 2 * bn * D_PAD + bn * D_PAD) / threads  # dK/dV: + dk, dv, k and v


def _grid(kind: str, bms, bns, warps, stages) -> List[Tuple[int, int, int, int]]:
    return [c for c in itertools.product(bms, bns, warps, stages)
            if live_per_thread(kind, *c[:3]) <= LIVE_MAX]


# (BLOCK_M, BLOCK_N, warps, stages) grids per kind; the shipped configs join each
SPACE: Dict[str, List[Tuple[int, int, int, int]]] = {
    "fwd": _grid("fwd", (64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4)),
    "dkdv-acc": _grid("dkdv-acc", (16, 32, 64), (32, 64, 128), (4, 8), (1, 2, 3)),
    "dq": _grid("dq", (32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3)),
    "dkdv": _grid("dkdv", (16, 32, 64), (32, 64, 128), (4, 8), (1, 2, 3)),
}
TINY_SPACE = 2  # candidates per kind on CPU: the shipped first and one of SPACE
# the backward plans that launch each backward kind (a shape without the kind's own plan in
# KINDS runs the first of these it has)
_RUNS = {"dkdv-acc": ("samples", "shares"), "dq": ("samples", "shares", "separate"),
         "dkdv": ("separate", "separate-64")}


def shipped(kind: str) -> List[Tuple[int, int, int, int]]:
    """The kind's shipped 16-bit list at d 72 (no dense bias)."""
    from diffit_kernels._attention_launch import _CONFIG_TABLE

    default, per_shape = _CONFIG_TABLE[(kind, False, 2)]
    return list(per_shape.get(SHAPE, default))


def candidates(kind: str, tiny: bool = False) -> List[Tuple[int, int, int, int]]:
    """The widened list: the shipped configs first (in their order), then SPACE's others."""
    ship = shipped(kind)
    if tiny:
        return ship[:1] + [c for c in SPACE[kind] if c not in ship][:TINY_SPACE - 1]
    return ship + [c for c in SPACE[kind] if c not in ship]


@contextlib.contextmanager
def widened(kind: str, configs: Sequence[tuple]) -> Iterator[None]:
    """The kind's 16-bit list at d 72 set to `configs` for the block (a new list is a new
    autotuner: the launchers key theirs on the list)."""
    from diffit_kernels import _attention_launch as AL

    key = (kind, False, 2)
    saved = AL._CONFIG_TABLE[key]
    AL._CONFIG_TABLE[key] = (saved[0], {**saved[1], SHAPE: list(configs)})
    try:
        yield
    finally:
        AL._CONFIG_TABLE[key] = saved


def _short(cfg: tuple) -> str:
    """'64x32 w4 s3': a (BLOCK_M, BLOCK_N, warps, stages) config as summary.short_candidate
    writes the autotuners' names of it."""
    bm, bn, w, s = cfg
    return f"{bm}x{bn} w{w} s{s}"


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

    label, B, H, grid, d = case
    N = grid[0] * grid[1]
    cfgs = candidates(kind, tiny)
    ship = shipped(kind)
    # the attention benchmark's inputs: q, k, v views of one packed projection, the table
    q, k, v, table = _inputs(B, H, grid, None, d, torch.bfloat16, device)
    if plan is not None:  # the kind's plan where the shape has it, else the first that
        plans = AP._plans_of(B, H, N, d, torch.bfloat16, [*grid, *grid], device)  # runs it
        plan = plan if plan in plans else next((p for p in plans if p in _RUNS[kind]),
                                               plans[0])
    n0 = len(_common._TUNED)
    with widened(kind, cfgs), module_setting(AP, "BWD_PLAN", plan), \
            module_setting(A, "TABLE_READ", "slabs"):
        o = tmsa_attention(q, k, v, table=table, grid=grid)
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
            t = times.get(_short(c))
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
    """Tune each kind's widened list at each case; write explore.csv; return the rows. The
    cases are bf16 whatever `dtype` (the training default); quick changes nothing."""
    if not tiny_cpu and not cuda_or_explain("explore"):
        return []
    device = torch.device("cpu" if tiny_cpu else "cuda")
    env = environment()
    out = results_dir(out_dir)
    rows: List[dict] = []
    for case, (kind, plan) in itertools.product([TINY_CASE] if tiny_cpu else CASES, KINDS):
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
        print(f"explore {case[0]} {kind:9} {len(got)} candidates, {len(timed)} timed"
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
