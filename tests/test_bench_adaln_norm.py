"""The adaln_norm benchmark's code path on CPU at a tiny size (reference provider only), so the
harness cannot rot unnoticed; real timings need CUDA."""
import csv

import pytest
import torch


def test_tiny_cpu_run_writes_csv_and_plot(tmp_path):
    from benchmarks import bench_adaln_norm

    rows = bench_adaln_norm.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path))
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["variant"] for r in rows} == set(bench_adaln_norm.VARIANTS)
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows)
    with open(tmp_path / "adaln_norm.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "adaln_norm.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_it_says_so_and_measures_nothing(capsys):
    from benchmarks import bench_adaln_norm

    assert bench_adaln_norm.run(quick=True) == []
    assert "need a CUDA GPU" in capsys.readouterr().out
