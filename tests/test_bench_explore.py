"""benchmarks/explore.py (the attention tiles beyond the shipped lists, timed on a card): its
lists, the rows it makes of the autotuners' records, its summary section, and (interpreter)
that a widened list's tiles are what the launchers run."""
import math

import pytest
import torch

from benchmarks import explore


def test_each_explored_list_is_the_shipped_one_then_the_space():
    from diffit_kernels import _attention_launch as AL

    assert {(k, d) for k, _, d in explore.LISTS} == {
        (k, c[5]) for c in explore.CASES for k, _ in c[6]}
    for kind, _, d in explore.LISTS:
        ship, cfgs = explore.shipped(kind, d), explore.candidates(kind, d)
        assert ship and cfgs[:len(ship)] == ship and len(set(cfgs)) == len(cfgs)
        assert set(explore.SPACE[kind]) <= set(cfgs)
        assert explore.candidates(kind, d, tiny=True) == [ship[0], next(
            c for c in explore.SPACE[kind] if c not in ship)]
        saved = AL._CONFIG_TABLE[(kind, False, 2)]
        with explore.widened(kind, cfgs, d):
            assert AL._card_list(kind, *AL._head_split(d), 2, False) == cfgs
            assert AL._card_list(kind, 32, 16, True, 2, False) == \
                saved[1].get((32, 16), saved[0])                      # other head dims kept
        assert AL._CONFIG_TABLE[(kind, False, 2)] is saved


def test_the_windowed_grids_keep_to_the_window():
    """The U-Net's lists: tiles within its 8x8 windows, enough scores per warp, a second stage
    only where the loop has a tile to prefetch; the fused backward's tile is the window."""
    for kind in ("fwd-win", "dkdv-win-acc", "dq-win", "dkdv-win"):
        loop = 0 if kind.startswith("dkdv") else 1
        for bm, bn, w, st in explore.SPACE[kind]:
            assert max(bm, bn) <= 64 and w * explore.MIN_SCORES_PER_WARP <= bm * bn
            assert st == 1 or (bm, bn)[loop] < 64
            assert explore.live_per_thread(kind, bm, bn, w, 64) <= explore.LIVE_MAX
    assert {c[:2] for c in explore.SPACE["window-wide"]} == {(64, 64)}
    assert explore.padded(72) == 80 and explore.padded(64) == 64


@pytest.mark.parametrize("kind,case", [("dq", 0), ("window-wide", 1)])
def test_rows_are_the_autotuners_times_of_the_widened_list(monkeypatch, tmp_path, kind, case):
    """Each candidate's row carries the time the kind's autotuner recorded for it, its ratio to
    the fastest, whether the shipped list has it (and first), and why it has no time (the
    fused backward's records name warps and stages only: its tile is the window)."""
    import triton

    import diffit_kernels
    from diffit_kernels import _attention_launch as AL
    from diffit_kernels import _common

    case = explore.TINY_CASES[case]
    d = case[5]
    cfgs = explore.candidates(kind, d)
    times = {c: 1.0 + 0.01 * i for i, c in enumerate(cfgs)}
    times[cfgs[1]] = 0.5                    # a shipped candidate is the fastest
    times[cfgs[-1]] = math.inf              # past the card's shared memory

    def name(c):  # what _common.record_tuning names a candidate: its triton.Config's
        tile = {} if kind == "window-wide" else {"BLOCK_M": c[0], "BLOCK_N": c[1]}
        return _common._candidate(triton.Config(tile, num_warps=c[2], num_stages=c[3]))

    def fake_op(q, k, v, **kw):
        # what a card's launcher records: the widened list the launch took, its times
        listed = AL._card_list(kind, *AL._head_split(d), 2, False)
        _common.record_choice("_tmsa_attention_bwd_kernel_dq", kind, "N_BUCKET=256",
                              name(listed[0]), [(name(c), times[c]) for c in listed])
        return (q * 1.0).transpose(1, 2)

    monkeypatch.setattr(diffit_kernels, "tmsa_attention", fake_op)
    monkeypatch.setattr(_common, "_TUNED", [])
    rows = explore._run_kind(kind, "samples", case, torch.device("cpu"), False)
    assert [r["candidate"] for r in rows] == [explore._short(c) for c in cfgs]
    by = {r["candidate"]: r for r in rows}
    first, fastest, last = (by[explore._short(c)] for c in (cfgs[0], cfgs[1], cfgs[-1]))
    assert first["shipped"] == "first" and first["ms"] == 1.0 and first["vs_best"] == 2.0
    assert fastest["shipped"] == "listed" and fastest["vs_best"] == 1.0
    assert last["shipped"] == "" and math.isnan(last["ms"])
    assert last["error"] == "did not fit the card"
    assert {r["key"] for r in rows} == {"N_BUCKET=256"}
    assert _common._TUNED == []            # explore.csv's: autotune.csv keeps to shipped lists

    from benchmarks.common import write_csv
    write_csv(tmp_path / "explore.csv", rows)
    text = explore.section([tmp_path / "explore.csv"])
    line = next(x for x in text.splitlines() if x.startswith(f"| {case[0]} {kind} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    top = explore._short(cfgs[1])
    assert cells[1].startswith(f"{top} 0.5 (1.00); ") and cells[1].count(";") == explore.TOP - 1
    assert cells[2] == f"{top} 0.5 (1.00)"                             # the shipped best
    assert cells[3] == f"{explore._short(cfgs[0])} 1 (2.00)"             # the shipped first
    assert cells[4] == f"{len(cfgs) - 1} of {len(cfgs)}"


def test_a_kind_that_fails_is_a_row_and_the_others_run(monkeypatch, tmp_path):
    calls = []

    def run_kind(kind, plan, case, device, tiny):
        calls.append(kind)
        if kind.startswith("dq"):
            raise RuntimeError("a tile this Triton cannot build")
        return [dict(op="explore", case=f"{case[0]} {kind}", kind=kind, kernel="k", key="",
                     provider="a", candidate="a", ms=1.0, vs_best=1.0, shipped="first",
                     error="", **{"pass": kind})]

    monkeypatch.setattr(explore, "_run_kind", run_kind)
    monkeypatch.setattr(explore, "cuda_or_explain", lambda name: True)
    rows = explore.run(out_dir=str(tmp_path))
    assert calls == [k for c in explore.CASES for k, _ in c[6]]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == len(explore.CASES) and all(r["kind"].startswith("dq") for r in bad)
    assert all("cannot build" in r["error"] for r in bad)
    assert [r["case"] for r in rows] == [f"{c[0]} {k}" for c in explore.CASES for k, _ in c[6]]
    assert (tmp_path / "explore.csv").is_file()


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,plan,d", explore.LISTS, ids=[k for k, _, _ in explore.LISTS])
def test_a_widened_list_runs_its_tiles(kind, plan, d, monkeypatch):
    """Under the interpreter with a card's 16-bit lists (entry `pick` of each), a tile only
    SPACE has is what the kind's launch runs, and its results are the reference's (float32
    operands on the 16-bit tiles, as the config-table tests run them): global attention at
    d 72, 8x8 windows at d 64."""
    from test_attention import _check

    from diffit_kernels import _attention_plans as AP
    from diffit_kernels import attention as A

    cfgs = explore.candidates(kind, d)
    i = len(explore.shipped(kind, d))        # the first tile the shipped list lacks
    log = []
    monkeypatch.setattr(AP, "BWD_PLAN", plan)
    shape = (dict(grid=(16, 8), window=(8, 8)) if kind in dict(explore.WINDOW_KINDS)
             else dict(grid=(8, 8)))
    with explore.widened(kind, cfgs, d), A._emulate_card(132, elt=2, pick=i, log=log):
        _check(torch.float32, 2 if d == 72 else 1, 1, 64 if d == 72 else 128, d, table=True,
               **shape)
    assert any(e[0] == kind and cfgs[i] in e[1:] for e in log), (kind, cfgs[i], log)


def test_the_readme_states_the_grid_size():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    n = sum(len(explore.candidates(kind, d)) for kind, _, d in explore.LISTS)
    assert re.search(rf"times a grid of {n} attention\s+tiles", text)


def test_the_rank_plot_is_written_with_untimed_lists_too(tmp_path):
    cfgs = explore.candidates("fwd")
    ship = explore.shipped("fwd")
    rows = [dict(case="latent256-B32 fwd", ms=1.0 + i, shipped=explore._shipped(c, ship))
            for i, c in enumerate(cfgs)]
    rows += [dict(case="latent256-B32 dq", ms=math.nan, shipped="")]
    explore.rank_plot(tmp_path / "explore.png", rows)
    png = tmp_path / "explore.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and oct(png.stat().st_mode)[-3:] == "644"
    assert [p.name for p in tmp_path.iterdir()] == ["explore.png"]    # no temporary left
