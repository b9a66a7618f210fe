"""The benchmark harness on CPU, so it cannot rot unnoticed: `python -m benchmarks --tiny-cpu`
runs every benchmark's code path at tiny sizes against the reference provider and writes CSVs,
plots, run.json and summary.md; the no-CUDA path prints why and runs the compile report (faked
here: the real one takes minutes and has its own tests); summary.md's arithmetic and the README
rewrite; the pytest-benchmark case recorder. Real timings need CUDA and are never asserted."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATE_COLUMNS = ("gbps", "tflops", "images_per_s")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _finite_positive(v) -> bool:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_benchmark(tmp_path, capsys):
    from benchmarks.__main__ import BENCHMARKS, main
    from benchmarks.summary import normalize

    rc = main(["--tiny-cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    missing = {n for n, m in BENCHMARKS.items() if importlib.util.find_spec(m) is None}
    meta = json.loads((tmp_path / "run.json").read_text())
    status = {e["name"]: e["status"] for e in meta["benchmarks"]}
    assert list(status) == ["peak"] + list(BENCHMARKS)
    for name, st in status.items():
        assert st.startswith("missing") if name in missing else st == "ok", (name, st, printed)
    # a benchmark that did not run is a failure of the command, not a silent gap
    assert rc == (1 if missing else 0)
    assert meta["command"] == f"python -m benchmarks --tiny-cpu --out {tmp_path}"
    assert meta["tiny_cpu"] is True and meta["dtype"] == "bf16"

    for e in meta["benchmarks"]:
        if e["status"] != "ok":
            continue
        assert e["csv"] and e["png"] and e["rows"] > 0, e
        for png in e["png"]:
            assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC, png
        for name in e["csv"]:
            rows = [normalize(r, e["name"]) for r in _rows(tmp_path / name)]
            assert len(rows) >= 1
            for r in rows:
                assert {"op", "case", "provider", "pass", "ms"} <= set(r), (name, list(r))
                assert r["case"] and r["provider"] and r["pass"], (name, r)
                assert _finite_positive(r["ms"]), (name, r)
                assert any(_finite_positive(r.get(c)) for c in RATE_COLUMNS), (name, r)
                if e["name"] not in ("peak",):
                    assert r["provider"] == "eager", (name, r)  # the reference, on CPU

    peak = _rows(tmp_path / "peak.csv")
    assert {r["kind"] for r in peak} == {"copy", "gemm"}
    model = _rows(tmp_path / "model.csv")
    assert {r["pass"] for r in model} == {"fwd", "fwd+bwd+adamw", "guided sampling"}
    assert all(_finite_positive(r["tflops"]) and _finite_positive(r["images_per_s"])
               for r in model)

    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# diffit-kernels benchmarks: ")
    assert "not benchmark results" in summary  # a CPU harness run says what it is
    for label in ("card", "driver", "CUDA", "PyTorch", "Triton", "command"):
        assert f"| {label} |" in summary
    assert f"`{meta['command']}`" in summary
    assert f"| PyTorch | {torch.__version__} |" in summary
    for name in status:
        assert f"## {name}\n" in summary
    for e in meta["benchmarks"]:
        for name in e["csv"] + e["png"]:
            assert f"]({name})" in summary, name
    assert "| case | pass | provider | ms |" in summary
    assert "% of peak GB/s" in summary  # adaln_norm / peak rows against the measured copy rate


def _write(path: Path, rows):
    from benchmarks.common import write_csv

    write_csv(path, rows)


def test_summary_fractions_of_peak_and_speedups(tmp_path):
    from benchmarks import summary

    fwd = {"pass": "fwd"}
    _write(tmp_path / "peak.csv", [
        dict(op="peak", case="copy 1024 MiB", kind="copy", provider="torch copy_", **fwd,
             ms=1.0, gbps=3000.0, tflops=""),
        dict(op="peak", case="copy 256 MiB", kind="copy", provider="torch copy_", **fwd,
             ms=0.3, gbps=2500.0, tflops=""),
        dict(op="peak", case="gemm 8192", kind="gemm", provider="torch.matmul", **fwd,
             ms=2.0, gbps="", tflops=800.0)])
    _write(tmp_path / "op.csv", [
        dict(op="x", case="c1", provider="ours", **{"pass": "fwd"}, dtype="bf16", ms=0.5,
             gbps=1500.0),
        dict(op="x", case="c1", provider="eager", **{"pass": "fwd"}, dtype="bf16", ms=1.5,
             gbps=500.0),
        dict(op="x", case="c1", provider="eager", **{"pass": "bwd"}, dtype="bf16", ms=2.0,
             gbps=400.0)])
    _write(tmp_path / "attn.csv", [
        dict(op="a", case="c", provider="ours", **{"pass": "fwd"}, ms=1.0, tflops=400.0),
        dict(op="a", case="c", provider="compile", compile_scope="blocks", **{"pass": "fwd"},
             ms=4.0, tflops=100.0, error=""),
        dict(op="a", case="c", provider="flex", compile_scope="", **{"pass": "fwd"},
             ms="nan", tflops="nan", error="OutOfMemoryError: CUDA out of memory")])
    (tmp_path / "run.json").write_text(json.dumps(dict(
        environment=dict(card="Some GPU", driver="555.1", cuda="12.4", torch="2.x",
                         triton="3.x", python="3.11"),
        command="python -m benchmarks --quick", dtype="bf16", git="abc1234",
        started="2025-01-01 00:00 UTC", seconds=12.5,
        benchmarks=[dict(name="peak", csv=["peak.csv"], status="ok", seconds=1.0),
                    dict(name="op", csv=["op.csv"], status="ok", seconds=2.0),
                    dict(name="attn", csv=["attn.csv"], status="error: 1 of 3 rows failed",
                         seconds=3.0),
                    dict(name="gone", csv=[], status="missing: benchmarks/gone.py does not "
                         "exist", seconds=0.0)])))
    text = summary.write_summary(tmp_path).read_text()
    assert "# diffit-kernels benchmarks: Some GPU" in text
    assert "| driver | 555.1 |" in text and "| CUDA | 12.4 |" in text
    assert "`python -m benchmarks --quick`" in text
    assert "**3,000 GB/s**" in text and "**800.0 TFLOP/s**" in text  # the best of each kind
    lines = text.splitlines()

    def row(prefix):
        hits = [ln for ln in lines if ln.startswith(prefix)]
        assert len(hits) == 1, (prefix, hits)
        return [c.strip() for c in hits[0].strip("|").split("|")]

    # case | pass | provider | ms | GB/s | % of peak GB/s | ours speed-up
    assert row("| c1 | fwd | ours |") == ["c1", "fwd", "ours", "0.500", "1,500", "50%", ""]
    assert row("| c1 | fwd | eager |") == ["c1", "fwd", "eager", "1.50", "500", "17%", "3.00x"]
    assert row("| c1 | bwd | eager |")[-1] == ""  # no ours row at that pass: no ratio
    assert row("| c | fwd | compile (blocks) |")[4:7] == ["100", "12%", "4.00x"]
    flex = row("| c | fwd | flex |")
    assert flex[3] == "-" and flex[-1].startswith("OutOfMemoryError")
    assert "Status: error: 1 of 3 rows failed" in text
    assert "Status: missing: benchmarks/gone.py does not exist" in text
    assert "| all | | 12.5 |" in text


def test_readme_section_is_generated_between_the_markers(tmp_path):
    from benchmarks import summary

    res = tmp_path / "benchmarks" / "results" / "some-gpu"
    res.mkdir(parents=True)
    (res / "summary.md").write_text("# diffit-kernels benchmarks: Some GPU\n\n## model\n\n"
                                    "| a |\n|---|\n| 1 |\n\n![model](model.png)\n\n"
                                    "Data: [model.csv](model.csv)\n")
    readme = tmp_path / "README.md"
    before = "# Project\n\n## Benchmarks\n\nIntro kept.\n\n"
    after = "\n\n## License\n\nMIT\n"
    readme.write_text(before + summary.START + "\nstale text\n" + summary.END + after)

    assert summary.main(["--readme", "--readme-file", str(readme), str(res)]) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(summary.END + after)
    inner = text[text.index(summary.START) + len(summary.START):text.index(summary.END)]
    assert "stale text" not in inner
    assert "### diffit-kernels benchmarks: Some GPU" in inner and "#### model" in inner
    assert "](benchmarks/results/some-gpu/model.png)" in inner
    assert "](benchmarks/results/some-gpu/model.csv)" in inner
    assert "do not edit by hand" in inner
    assert summary.update_readme(readme, [res]) is False  # idempotent

    readme.write_text("# no markers\n")
    assert summary.main(["--readme", "--readme-file", str(readme), str(res)]) == 1
    assert readme.read_text() == "# no markers\n"
    readme.write_text(summary.START + "\n" + summary.END + "\n")
    assert summary.main(["--readme", "--readme-file", str(readme),
                         str(tmp_path / "no-such-results")]) == 1
    assert readme.read_text() == summary.START + "\n" + summary.END + "\n"
    with pytest.raises(ValueError, match="no benchmarks/results"):
        summary.update_readme(readme, [])


def test_without_cuda_the_command_says_so_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--no-report"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "timings need a CUDA GPU" in p.stdout
    assert "compile report was skipped" in p.stdout


def test_without_cuda_the_compile_report_runs_without_the_interpreter(monkeypatch, capsys):
    import benchmarks.__main__ as drv

    calls = []

    def fake_call(args, env=None, cwd=None):
        calls.append((list(args), dict(env), cwd))
        return rc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(drv.subprocess, "call", fake_call)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = 0
    assert drv.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "timings need a CUDA GPU" in out and "compile report" in out
    args, env, cwd = calls[0]
    assert args == [sys.executable, "-m", "diffit_kernels", "report"]
    assert "TRITON_INTERPRET" not in env and cwd == str(ROOT)
    rc = 1  # a report that finds problems is not hidden behind exit status 0
    assert drv.main([]) == 1
    assert "problems found" in capsys.readouterr().out


def test_ops_option():
    from benchmarks.__main__ import BENCHMARKS, parser

    assert parser().parse_args([]).ops == list(BENCHMARKS)
    assert parser().parse_args(["--ops", "model,adaln_norm,model"]).ops == ["model",
                                                                          "adaln_norm"]
    with pytest.raises(SystemExit):
        parser().parse_args(["--ops", "adaln,model"])


def _recorded_modules():
    from benchmarks.__main__ import BENCHMARKS, PEAK

    return [PEAK] + [(n, m) for n, m in BENCHMARKS.items() if n != "model"]


@pytest.mark.parametrize("name,modname", _recorded_modules(), ids=lambda v: str(v))
def test_pytest_benchmark_records_and_replays_every_case(name, modname):
    """The recorder behind `pytest benchmarks --benchmark-only`, on CPU at tiny sizes: each
    benchmark's run() yields one replayable callable per row, named after the row."""
    from benchmarks import test_bench_pytest as tbp

    if importlib.util.find_spec(modname) is None:
        pytest.skip(f"{modname} does not exist yet")
    cases = tbp.record_cases(name, modname, quick=False, dtype="fp32", tiny_cpu=True)
    assert cases and not any(c.error or c.skip for c in cases), [c.error for c in cases]
    assert len({c.id for c in cases}) == len(cases)
    assert all(c.id.startswith(name + "-") and c.info.get("provider") for c in cases)
    for c in cases:
        c.fn()  # a callable whose tensors the module freed after timing fails here


def test_pytest_benchmark_cases_are_the_run_cases():
    from benchmarks import bench_model
    from benchmarks import test_bench_pytest as tbp

    cases = tbp.record_cases("peak", "benchmarks.peak", quick=False, dtype="fp32",
                             tiny_cpu=True)
    assert [c.id for c in cases] == ["peak-copy-1-MiB-torch-copy_-fwd",
                                     "peak-gemm-64x64x64-torch.matmul-fwd"]
    assert tbp.record_cases("nope", "benchmarks.bench_nope", False, "fp32")[0].skip

    # a case recorded under no_grad replays under no_grad
    seen = []
    call = tbp.replayable(lambda: seen.append(torch.is_grad_enabled()),
                          dict(grad=False, inference=False,
                               autocast={"cpu": (False, torch.bfloat16)}))
    call()
    assert seen == [False]

    mc = tbp.model_cases(False, "fp32", torch.device("cpu"), tiny_cpu=True)
    assert len(mc) == sum(len(c.providers) for c in bench_model.cases(tiny_cpu=True))
    assert len({c.id for c in mc}) == len(mc)
    with mc[0].open() as fn:
        out = fn()
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()


def _fake_module(monkeypatch, name, run):
    import importlib.machinery
    import types

    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.run = run
    monkeypatch.setitem(sys.modules, name, mod)
    return name


def test_driver_adapts_to_each_benchmark_module(tmp_path, monkeypatch):
    """A module that writes no CSV gets one (and a plot) from its rows; one that raises, has no
    tiny_cpu mode or returns nothing is an error in run.json, and the others still run."""
    from benchmarks.__main__ import run_benchmark

    def rows_only(quick, dtype, out_dir, tiny_cpu=False):
        return [dict(op="f", case=f"n{n}", provider=p, **{"pass": "fwd"}, ms=float(n),
                     tflops=2.0 * n) for n in (1, 2) for p in ("eager", "ours")]

    name = _fake_module(monkeypatch, "benchmarks._fake_rows", rows_only)
    e = run_benchmark("fake", name, tmp_path, quick=True, dtype="bf16", tiny_cpu=True)
    assert e["status"] == "ok" and e["csv"] == ["fake.csv"] and e["png"] == ["fake.png"]
    assert e["rows"] == 4
    assert len(_rows(tmp_path / "fake.csv")) == 4
    assert (tmp_path / "fake.png").read_bytes()[:8] == PNG_MAGIC

    def raises(quick, dtype, out_dir, tiny_cpu=False):
        raise RuntimeError("kernel exploded")

    e = run_benchmark("bad", _fake_module(monkeypatch, "benchmarks._fake_raise", raises),
                      tmp_path, True, "bf16", False)
    assert e["status"] == "error: RuntimeError: kernel exploded"
    e = run_benchmark("old", _fake_module(monkeypatch, "benchmarks._fake_old",
                                          lambda quick, dtype, out_dir: rows_only(1, 2, 3)),
                      tmp_path, True, "bf16", tiny_cpu=True)
    assert e["status"] == "error: run() has no tiny_cpu mode"
    e = run_benchmark("empty", _fake_module(monkeypatch, "benchmarks._fake_empty",
                                            lambda quick, dtype, out_dir, tiny_cpu: []),
                      tmp_path, True, "bf16", tiny_cpu=True)
    assert e["status"] == "error: run() returned no rows"
    e = run_benchmark("gone", "benchmarks._no_such_bench", tmp_path, True, "bf16", True)
    assert e["status"].startswith("missing")
