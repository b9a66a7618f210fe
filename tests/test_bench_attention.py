"""The attention benchmark's code path, on CPU at tiny sizes against the reference provider."""
import csv
import math

import pytest
import torch

from benchmarks import bench_attention


def test_tiny_cpu_run_writes_rows_csv_and_plots(tmp_path):
    rows = bench_attention.run(tiny_cpu=True, dtype=torch.float32, out_dir=str(tmp_path))
    assert len(rows) == len(bench_attention.TINY_CPU) * len(bench_attention.MODES)
    for r in rows:
        assert r["provider"] == "eager" and r["error"] == "", r
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["tflops"] > 0
    with open(tmp_path / "attention_float32.csv") as f:
        got = list(csv.DictReader(f))
    assert [g["mode"] for g in got] == [r["mode"] for r in rows]
    assert {"env_torch", "env_triton", "env_card"} <= set(got[0])
    for mode in ("fwd", "bwd", "fwd_bwd"):
        assert (tmp_path / f"attention_float32_{mode}.png").stat().st_size > 0


def test_flops_follow_the_flash_attention_convention():
    # forward 4 * B * H * N * keys * d; keys = the window's tokens when windowed
    assert bench_attention._flops(2, 16, (16, 16), None, 72) == 4 * 2 * 16 * 256 * 256 * 72
    assert bench_attention._flops(2, 16, (32, 32), (4, 4), 72) == 4 * 2 * 16 * 1024 * 16 * 72


def test_without_cuda_it_explains_and_returns_nothing(capsys, monkeypatch):
    monkeypatch.setattr(bench_attention.torch.cuda, "is_available", lambda: False)
    assert bench_attention.run(quick=True) == []
    assert "need a CUDA GPU" in capsys.readouterr().out


@pytest.mark.interpreter
def test_ab_providers_run_the_designs_they_name():
    """tmsa-shares sums dS in the dK/dV pass over shares of the batch (what tmsa runs where
    plans are not timed), tmsa-samples over one share per sample (one dK/dV launch),
    tmsa-separate in a dbias pass of its own, tmsa-gather gathers the table in every kernel
    where tmsa reads its slabs (a grid 16 wide); all give the same gradients, and the
    library's settings come back. A 2-SM card, so that the shares hold two samples each."""
    from diffit_kernels import _attention_plans, attention

    grads, kinds, shares, plans = {}, {}, {}, {}
    q, k, v, table = bench_attention._inputs(4, 2, (4, 16), None, 16, torch.float16, "cpu")
    names = ("tmsa", "tmsa-shares", "tmsa-samples", "tmsa-separate", "tmsa-gather")
    for name in names:
        fn = bench_attention._providers((4, 16), None, [name])[name]
        log: list = []
        with attention._emulate_card(2, log=log), bench_attention._variant(name):
            o = fn(q, k, v, table)
            grads[name] = torch.autograd.grad(o, (q, k, v, table), torch.ones_like(o))
        kinds[name] = {entry[0] for entry in log}
        shares[name] = [entry[1] for entry in log if entry[0] == "ds-shares"]
        plans[name] = [entry[1] for entry in log if entry[0] == "plan"]
    assert plans == {"tmsa": ["shares"], "tmsa-shares": ["shares"], "tmsa-samples": ["samples"],
                     "tmsa-separate": ["separate"], "tmsa-gather": ["shares"]}, plans
    assert any("acc" in kd for kd in kinds["tmsa"]) and "dbias" not in kinds["tmsa"], kinds
    assert "dbias" in kinds["tmsa-separate"] and not any(
        "acc" in kd for kd in kinds["tmsa-separate"]), kinds
    assert "table-slab" in kinds["tmsa"] and "table-slab" not in kinds["tmsa-gather"], kinds
    assert shares["tmsa-shares"] == [(2, 2)] and shares["tmsa-samples"] == [(4, 1)], shares
    for other in names[1:]:
        for a, b in zip(grads["tmsa"], grads[other]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert _attention_plans.BWD_PLAN is None and attention.SLAB_MAX_BYTES > 0
    with pytest.raises(ValueError, match="windows always gather"):
        bench_attention._providers((8, 8), (4, 4), ["tmsa-gather"])


@pytest.mark.interpreter
def test_wide_row_runs_the_wide_fused_backward():
    """tmsa-wide runs 8x8 windows through the fused backward (one window per 64-wide tile)
    where untimed tmsa runs dK/dV and dQ; the gradients agree, and the library's setting
    comes back."""
    from diffit_kernels import _attention_plans, attention

    grads, kinds = {}, {}
    q, k, v, table = bench_attention._inputs(2, 2, (8, 16), (8, 8), 64, torch.float16, "cpu")
    for name in ("tmsa", "tmsa-wide"):
        fn = bench_attention._providers((8, 16), (8, 8), [name])[name]
        log: list = []
        with attention._emulate_card(132, elt=2, log=log), bench_attention._variant(name):
            o = fn(q, k, v, table)
            grads[name] = torch.autograd.grad(o, (q, k, v, table), torch.ones_like(o))
        kinds[name] = {entry[0] for entry in log}
    assert "window-wide" in kinds["tmsa-wide"] and "dq-win" not in kinds["tmsa-wide"]
    assert "dq-win" in kinds["tmsa"] and "window-wide" not in kinds["tmsa"], kinds
    for a, b in zip(grads["tmsa"], grads["tmsa-wide"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert _attention_plans.BWD_PLAN is None


def test_plan_rows_only_where_the_shape_has_the_plan(tmp_path):
    """A plan row exists at a shape with several plans, for each plan it has (the CUDA
    config lists, on a card the size of the CPU's plans), and times the backward only."""
    names = list(bench_attention.PROVIDERS)
    plan_rows = list(bench_attention.PLAN_ROWS)

    def rows_at(label):
        _, B, H, grid, window, d = next(s for s in bench_attention.SHAPES if s[0] == label)
        got = bench_attention._shape_names(names, B, H, grid, window, d, torch.bfloat16, "cpu")
        return [n for n in got if n in plan_rows]

    assert rows_at("latent256-B64") == ["tmsa-shares", "tmsa-samples", "tmsa-separate",
                                        "tmsa-separate-64"]
    assert rows_at("img64-win8-B16") == plan_rows
    assert rows_at("img32-win4-B64") == []                 # the fused backward: one plan
    # the tiny shapes in fp32, whose CUDA lists have no fused tile: two plans each (B 1: no
    # "samples"); on CPU the triton provider fails: error rows, still rows
    rows = bench_attention.run(tiny_cpu=True, dtype=torch.float32, out_dir=str(tmp_path),
                               providers=["eager", *plan_rows])
    got = [(r["shape"], r["provider"], r["mode"]) for r in rows if r["provider"] != "eager"]
    assert got == [(shape, name, "bwd") for shape in ("tiny-global", "tiny-win")
                   for name in ("tmsa-shares", "tmsa-separate")], got
    assert sum(r["provider"] == "eager" for r in rows) == 2 * len(bench_attention.MODES)
