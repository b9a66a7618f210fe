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
    """tmsa-2pass really runs the old design (a dbias pass, no in-pass sums), tmsa-1launch
    one batch share per sample (one dK/dV launch) and tmsa-gather gathers the table in every
    kernel, while tmsa sums dS in the dK/dV pass over shares of the batch and reads the table's
    slabs (a grid 16 wide); all four give the same gradients, and the library's settings come
    back. A 2-SM card, so that tmsa's shares hold two samples each."""
    from diffit_kernels import attention

    grads, kinds, shares = {}, {}, {}
    q, k, v, table = bench_attention._inputs(4, 2, (4, 16), None, 16, torch.float16, "cpu")
    for name in ("tmsa", "tmsa-2pass", "tmsa-1launch", "tmsa-gather"):
        fn = bench_attention._providers((4, 16), None, [name])[name]
        log: list = []
        with attention._emulate_card(2, log=log), bench_attention._variant(name):
            o = fn(q, k, v, table)
            grads[name] = torch.autograd.grad(o, (q, k, v, table), torch.ones_like(o))
        kinds[name] = {entry[0] for entry in log}
        shares[name] = [entry[1] for entry in log if entry[0] == "ds-shares"]
    assert any("acc" in kd for kd in kinds["tmsa"]) and "dbias" not in kinds["tmsa"], kinds
    assert "dbias" in kinds["tmsa-2pass"] and not any("acc" in kd for kd in kinds["tmsa-2pass"])
    assert "table-slab" in kinds["tmsa"] and "table-slab" not in kinds["tmsa-gather"], kinds
    assert shares["tmsa"] == [(2, 2)] and shares["tmsa-1launch"] == [(4, 1)], shares
    for other in ("tmsa-2pass", "tmsa-1launch", "tmsa-gather"):
        for a, b in zip(grads["tmsa"], grads[other]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert attention._DS_MAX_ELEMENTS > 0 and attention.SLAB_MAX_BYTES > 0
    assert attention.DS_ONE_SHARE_MAX_BYTES == 0
    with pytest.raises(ValueError, match="windows always gather"):
        bench_attention._providers((8, 8), (4, 4), ["tmsa-gather"])


@pytest.mark.interpreter
def test_fused64_runs_the_wide_fused_backward():
    """tmsa-fused64 runs 8x8 windows through the fused backward (one window per 64-wide tile)
    where tmsa runs dK/dV and dQ; the gradients agree, and the library's setting comes back."""
    from diffit_kernels import attention

    grads, kinds = {}, {}
    q, k, v, table = bench_attention._inputs(2, 2, (8, 16), (8, 8), 64, torch.float16, "cpu")
    for name in ("tmsa", "tmsa-fused64"):
        fn = bench_attention._providers((8, 16), (8, 8), [name])[name]
        log: list = []
        with attention._emulate_card(132, elt=2, log=log), bench_attention._variant(name):
            o = fn(q, k, v, table)
            grads[name] = torch.autograd.grad(o, (q, k, v, table), torch.ones_like(o))
        kinds[name] = {entry[0] for entry in log}
    assert "window-wide" in kinds["tmsa-fused64"] and "dq-win" not in kinds["tmsa-fused64"]
    assert "dq-win" in kinds["tmsa"] and "window-wide" not in kinds["tmsa"], kinds
    for a, b in zip(grads["tmsa"], grads["tmsa-fused64"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert attention.FUSED_WIDE_SPAN == 0


def test_backward_variants_have_backward_rows_where_their_choice_exists(tmp_path):
    # no forward row (it is tmsa's); none at windows small enough for the fused backward (the
    # tiny window is 2x2 tokens). On CPU the triton provider fails: error rows, still rows.
    rows = bench_attention.run(tiny_cpu=True, dtype=torch.float32, out_dir=str(tmp_path),
                               providers=["eager", "tmsa-1launch"])
    got = [(r["shape"], r["mode"]) for r in rows if r["provider"] == "tmsa-1launch"]
    assert got == [("tiny-global", "bwd"), ("tiny-global", "fwd+bwd")], got
    assert sum(r["provider"] == "eager" for r in rows) == 2 * len(bench_attention.MODES)
    # tmsa-fused64 only at windows of 33-64 tokens, which neither tiny shape has (16 and 4)
    rows = bench_attention.run(tiny_cpu=True, dtype=torch.float32, out_dir=str(tmp_path),
                               providers=["eager", "tmsa-fused64"])
    assert not any(r["provider"] == "tmsa-fused64" for r in rows)
