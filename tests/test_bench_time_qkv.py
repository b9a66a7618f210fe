"""The time_qkv benchmark's code path on CPU at a tiny size (reference provider only), so the
harness cannot rot unnoticed; real timings need CUDA."""
import csv

import pytest
import torch


def test_tiny_cpu_run_writes_csv_and_plot(tmp_path):
    from benchmarks import bench_time_qkv

    rows = bench_time_qkv.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path))
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["variant"] for r in rows} == set(bench_time_qkv.VARIANTS)
    assert {r["provider"] for r in rows} == {"eager"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    fwd = [r for r in rows if r["pass"] == "fwd"][0]
    assert fwd["tflops"] == pytest.approx(2 * 32 * 64 * 192 / (fwd["ms"] * 1e-3) / 1e12, rel=0.02)
    with open(tmp_path / "time_qkv.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "time_qkv.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_it_says_so_and_measures_nothing(capsys):
    from benchmarks import bench_time_qkv

    assert bench_time_qkv.run(quick=True) == []
    assert bench_time_qkv.main(["--quick"]) == 0
    assert "need a CUDA GPU" in capsys.readouterr().out
