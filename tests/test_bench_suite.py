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
    assert meta["finished"] is True and "did not finish" not in summary

    # the README section generated from this very folder, between the markers, links intact
    from benchmarks import summary as S

    readme = tmp_path / "README.md"
    readme.write_text("# P\n\n" + S.START + "\nstale section\n" + S.END + "\n")
    assert S.main(["--readme", "--readme-file", str(readme), str(tmp_path)]) == 0
    inner = readme.read_text().split(S.START)[1].split(S.END)[0]
    assert "stale section" not in inner and "### diffit-kernels benchmarks: " in inner
    for e in meta["benchmarks"]:
        assert f"#### {e['name']}\n" in inner
        for name in e["csv"] + e["png"]:
            assert f"](./{name})" in inner, name  # relative to the README, beside it here
    assert S.update_readme(readme, [tmp_path]) is False


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


# ---- the providers that need CUDA or a compiler, exercised on CPU ---------------------------
@pytest.fixture
def cpu_compile(monkeypatch):
    """Dynamo with the aot_eager backend (the same guards and graphs as inductor, no code
    generation), and flex_attention's backward allowed on CPU (its dense reference path).
    Dynamo's recompile limit is held at 2 (one grad and one no-grad graph): a benchmark that
    let graphs pile up across its cases would fall back to eager here, and build fewer graphs."""
    import torch.nn.attention.flex_attention as fa

    from benchmarks import common

    monkeypatch.setattr(common, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(common, "raise_recompile_limit", lambda *a: None)
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):  # (pytest's monkeypatch breaks it)
        yield common
    torch._dynamo.reset()


@pytest.mark.parametrize("grid,window", [((4, 4), None), ((4, 6), (2, 3))],
                         ids=["global", "window-2x3"])
def test_flex_provider_is_the_reference_and_compiles_twice_per_shape(cpu_compile, grid, window):
    """The score_mod's index arithmetic and its captured table (gradient included) against the
    reference; a stable score_mod keeps Dynamo at one graph per grad mode, however many calls."""
    from benchmarks import bench_attention as ba
    from diffit_kernels import reference

    before = cpu_compile.compile_counts()
    q, k, v, table = ba._inputs(2, 2, grid, window, 16, torch.float32, "cpu")
    ref = reference.tmsa_attention(q, k, v, table=table, grid=grid, window=window)
    go = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [q, k, v, table], go)
    assert want[3].abs().max() > 0
    f = ba._flex(grid, window)
    for _ in range(3):
        o = f(q, k, v, table)
        torch.testing.assert_close(o, ref)
        for g, w in zip(torch.autograd.grad(o, [q, k, v, table], go), want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(f(q, k, v, table), ref)
    assert cpu_compile.counts_since(before) == dict(graphs=2, graph_breaks=0,
                                                    recompile_limit_hits=0)


@pytest.mark.parametrize("grid,window", [((4, 4), None), ((4, 6), (2, 3))],
                         ids=["global", "window-2x3"])
def test_sdpa_with_dense_bias_is_the_reference(grid, window):
    """The dense-bias provider (math backend on CPU) on the partitioned windows: the bias and
    the partition are right, and the table's gradient flows through the expanded bias."""
    from torch.nn.attention import SDPBackend

    from benchmarks import bench_attention as ba
    from diffit_kernels import reference

    gh, gw = window or grid
    q, k, v, table = ba._inputs(2, 2, grid, window, 16, torch.float32, "cpu")
    bias = ba._dense_bias(table, gh, gw)
    assert bias.shape == (1, 2, gh * gw, gh * gw) and bias.is_contiguous()  # nothing to pad
    ref = reference.tmsa_attention(q, k, v, table=table, grid=grid, window=window)
    part = (lambda t: ba._partition(t, grid, window)) if window else (lambda t: t)
    qp, kp, vp = (part(t.detach()).requires_grad_() for t in (q, k, v))
    o = ba._sdpa_membias(gh, gw, backend=SDPBackend.MATH)(qp, kp, vp, table)
    torch.testing.assert_close(o, part(ref))
    go = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [table], go)[0]
    torch.testing.assert_close(torch.autograd.grad(o, [table], part(go))[0], want,
                               rtol=1e-4, atol=1e-5)


def test_attention_run_with_flex_on_cpu(cpu_compile, tmp_path, monkeypatch):
    from benchmarks import bench_attention as ba

    monkeypatch.setattr(ba, "TINY_CPU", ba.TINY_CPU + [("tiny-2x8", 1, 2, (2, 8), None, 16)])
    before = cpu_compile.compile_counts()
    rows = ba.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path), providers=["flex"])
    assert [r["error"] for r in rows] == [""] * len(rows) and len(rows) == 9
    # a grad and a no-grad graph per shape: flex_attention's graphs from one shape never count
    # against the recompile limit at the next
    assert cpu_compile.counts_since(before) == dict(graphs=6, graph_breaks=0,
                                                    recompile_limit_hits=0)


@pytest.mark.parametrize("modname", ["bench_adaln_norm", "bench_time_qkv"])
def test_compile_baselines_are_two_clean_graphs(cpu_compile, tmp_path, modname):
    import importlib

    mod = importlib.import_module(f"benchmarks.{modname}")
    rows = mod.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path), providers=["compile"])
    assert rows and all(r["error"] == "" and r["ms"] > 0 for r in rows), rows
    per_case = {}
    for r in rows:
        per_case[r["case"] + r["variant"]] = (r["graphs"], r["graph_breaks"],
                                              r["recompile_limit_hits"])
    assert set(per_case.values()) == {(2, 0, 0)}, per_case  # no-grad and grad graph, clean


def test_model_compile_is_one_graph_for_every_block(cpu_compile):
    from benchmarks import bench_model as bm

    case = bm.ModelCase("DiffiT-tiny", "latent", 32, 2, "fwd+bwd+adamw", ("compile",), rep_ms=1)
    for quick in (True, False):  # blocks (regional) and the whole model
        row = bm.measure(case, "compile", "bf16", torch.device("cpu"), quick)
        assert (row["graphs"], row["graph_breaks"], row["recompile_limit_hits"]) == (1, 0, 0)
        assert row["ms"] > 0, row


@pytest.mark.parametrize("modname", ["bench_adaln_norm", "bench_time_qkv", "bench_attention"])
def test_a_failed_case_is_a_row_and_the_run_goes_on(monkeypatch, tmp_path, modname):
    import importlib

    mod = importlib.import_module(f"benchmarks.{modname}")
    calls = []
    real = mod.bench

    def flaky(fn, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(fn, *a, **kw)

    monkeypatch.setattr(mod, "bench", flaky)
    rows = mod.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path))
    errors = [r["error"] for r in rows]
    assert errors[1].startswith("OutOfMemoryError: CUDA out of memory"), errors
    assert errors[:1] + errors[2:] == [""] * (len(rows) - 1)
    assert all(math.isnan(r["ms"]) == bool(r["error"]) for r in rows)


def test_time_budget_skips_cases_and_says_so(tmp_path):
    from benchmarks import common
    from benchmarks.__main__ import _status, main

    (tmp_path / "run.json").write_text(json.dumps({"benchmarks": [
        {"name": "x", "csv": ["old.csv"], "png": ["old.png"]}]}))
    for n in ("old.csv", "old.png", "mine.csv"):
        (tmp_path / n).write_text("a\n1\n")
    rc = main(["--tiny-cpu", "--ops", "adaln_norm", "--budget-s", "0.001", "--out",
               str(tmp_path)])
    assert rc == 2  # nothing failed; the budget left cases out
    assert not (tmp_path / "old.csv").exists() and not (tmp_path / "old.png").exists()
    assert (tmp_path / "mine.csv").exists()  # not the previous run's: left alone
    meta = json.loads((tmp_path / "run.json").read_text())
    st = {e["name"]: e["status"] for e in meta["benchmarks"]}
    assert st["peak"] == "ok" and st["adaln_norm"] == "partial: 9 of 9 rows skipped (time budget)"
    rows = _rows(tmp_path / "adaln_norm.csv")
    assert all(r["error"].startswith(common.SKIPPED) and "--budget-s" in r["error"]
               for r in rows)
    assert "| time budget | 0 s |" in (tmp_path / "summary.md").read_text()
    assert _status([{"error": ""}, {"error": "E: x"}, {"error": common.skipped_text()}]) == \
        "error: 1 of 3 rows failed; 1 of 3 rows skipped (time budget)"
    assert common.time_left() is None  # the driver leaves no deadline behind


def test_sigterm_stops_the_run_and_leaves_a_consistent_folder(tmp_path, monkeypatch):
    import signal

    import threading

    import benchmarks.__main__ as drv
    from benchmarks.common import write_csv

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")

    def stopped(quick, dtype, out_dir, tiny_cpu=False):
        write_csv(Path(out_dir) / "half.csv", [dict(case="c", provider="eager", **{"pass": "fwd"},
                                                    ms=1.0, tflops=1.0)])
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the benchmark")

    name = _fake_module(monkeypatch, "benchmarks._fake_sigterm", stopped)
    monkeypatch.setattr(drv, "BENCHMARKS", {"half": name, "never": name})
    assert drv.main(["--tiny-cpu", "--out", str(tmp_path)]) == 130
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["finished"] is False and [e["name"] for e in meta["benchmarks"]] == ["peak", "half"]
    half = meta["benchmarks"][1]
    assert half["status"].startswith("interrupted") and half["csv"] == ["half.csv"]
    assert half["rows"] == 1
    text = (tmp_path / "summary.md").read_text()
    assert "did not finish" in text and "[half.csv](half.csv)" in text
    assert signal.getsignal(signal.SIGTERM) is not drv._on_sigterm  # handler restored


def test_summary_of_a_killed_run_keeps_its_last_csv(tmp_path):
    """SIGKILL: run.json still says the last benchmark is running; its CSV is on disk."""
    from benchmarks import summary

    _write(tmp_path / "peak.csv", [dict(op="peak", case="copy", kind="copy", provider="c",
                                        **{"pass": "fwd"}, ms=1.0, gbps=100.0)])
    _write(tmp_path / "model.csv", [dict(op="model", case="XL", provider="eager",
                                         **{"pass": "fwd"}, ms=5.0, images_per_s=3.0)])
    (tmp_path / "run.json").write_text(json.dumps(dict(finished=False, benchmarks=[
        dict(name="peak", csv=["peak.csv"], status="ok"),
        dict(name="model", csv=[], status="running: started but never finished")])))
    text = summary.build_summary(tmp_path)
    assert "did not finish" in text and "[model.csv](model.csv)" in text
    assert "| XL | fwd | eager | 5.00 |" in text


def test_bench_uses_do_bench_median_whatever_its_signature(monkeypatch):
    import triton.testing

    from benchmarks import common

    seen = []

    def new(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        seen.append(("new", return_mode, quantiles))
        return 1.5

    def old(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None):
        seen.append(("old", quantiles))
        return 2.5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", new)
    assert common.bench(lambda: None) == 1.5
    monkeypatch.setattr(triton.testing, "do_bench", old)
    assert common.bench(lambda: None) == 2.5
    assert seen == [("new", "median", None), ("old", [0.5])]


def test_gpu_session_script_parses():
    p = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_session.sh")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_gpu_session_runs_the_stages_asked(tmp_path):
    """STAGES picks the session's stages (a second, short device call runs one of them): with
    none, each says it was skipped and the call still ends 0; an unknown name stops it before
    anything runs, naming the known ones."""
    script = str(ROOT / "benchmarks" / "gpu_session.sh")
    env = dict(os.environ, CPU_CHECK="1", OUT=str(tmp_path / "out"), STAGES="")
    p = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    for stage in ("gpu tests", "diffit check", "benchmarks", "profile", "explore", "ncu"):
        assert f"== {stage}: not in STAGES, skipped" in p.stdout, stage
    env["STAGES"] = "tests,explor"
    p = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert "unknown stage 'explor'" in p.stdout and "== install check" not in p.stdout


def test_op_timing_by_cuda_graph_with_a_named_fallback(monkeypatch):
    """bench(graph=True): do_bench_cudagraph's median with the leaves' gradients reset inside
    every captured call; a capture the call refuses falls back to do_bench and says why."""
    import triton.testing

    from benchmarks import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    leaf = torch.ones(2, requires_grad=True)
    seen = []

    def fn():
        seen.append(leaf.grad)
        (leaf * 2).sum().backward()

    def graphed(call, return_mode="mean", **kw):
        assert return_mode == "median" and not kw.get("grad_to_none")
        call()
        call()
        return 0.25

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", graphed)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: 1.5)
    assert common.bench(fn, grad_to_none=[leaf], graph=True) == 0.25
    assert common.last_timing() == common.GRAPH == "cuda graph"
    assert seen == [None, None]  # each call starts from no gradient, as do_bench's calls do

    def refuses(call, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", refuses)
    assert common.bench(fn, grad_to_none=[leaf], graph=True) == 1.5
    assert common.last_timing() == ("do_bench (no CUDA graph: RuntimeError: operation not "
                                    "permitted when stream is capturing)")
    assert common.bench(fn) == 1.5 and common.last_timing() == "do_bench"


class _Tuner:
    """What record_tuning reads of a triton.autotune object: configs, keys, cache and the
    timings of its latest benchmark."""

    def __init__(self, configs, keys):
        self.configs, self.keys, self.cache = configs, keys, {}

    def tune(self, key, timings):
        self.configs_timings = dict(zip(self.configs, timings))
        self.cache[key] = min(self.configs_timings, key=lambda c: self.configs_timings[c][0])


def test_autotune_candidate_times_are_recorded_written_and_summarised(tmp_path, monkeypatch):
    import triton

    from benchmarks import common, summary
    from diffit_kernels import _common

    monkeypatch.setattr(_common, "_TUNED", [])
    cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)]
    tuner = _Tuner(cfgs, ["N_BUCKET", "D"])
    _common.record_tuning("_k", "fwd", tuner, 0)          # nothing tuned: nothing recorded
    assert _common.autotune_timings() == []
    tuner.tune((256, 72, "torch.bfloat16", "torch.float32"),
               [[0.02, 0.019, 0.021], [0.01, 0.009, 0.011], [float("inf")] * 3])
    _common.record_tuning("_k", "fwd", tuner, 0)
    _common.record_tuning("_k", "fwd", tuner, 1)          # the same key again: cached
    rec, = _common.autotune_timings()
    assert rec["key"] == "N_BUCKET=256 D=72 bfloat16 float32"
    assert rec["best"] == "BLOCK_M=64 BLOCK_N=64 w4 s2"
    assert rec["candidates"] == [("BLOCK_M=64 BLOCK_N=32 w8 s3", 0.02),
                                 ("BLOCK_M=64 BLOCK_N=64 w4 s2", 0.01),
                                 ("BLOCK_M=128 BLOCK_N=64 w8 s3", float("inf"))]

    assert common.write_autotune(tmp_path) == 3
    assert common.write_autotune(tmp_path) == 0          # each row once, however often written
    rows = _rows(tmp_path / common.AUTOTUNE_CSV)
    assert [r["vs_fastest"] for r in rows] == ["2.000", "1.000", ""]
    assert [r["chosen"] for r in rows] == ["", "yes", ""]
    assert rows[2]["note"] == "did not fit the card" and rows[2]["ms"] == ""

    # a key whose single pruned config was never benchmarked keeps no stale timings
    tuner.configs_timings = {triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}): [1.0]}
    tuner.cache[(1024, 72, "torch.bfloat16")] = cfgs[0]
    _common.record_tuning("_k", "fwd", tuner, 1)
    assert all(t is None for _, t in _common.autotune_timings()[1]["candidates"])
    # a second process of the same run (--append) adds its rows after the first's
    monkeypatch.setattr(_common, "_TUNED", _common._TUNED[1:])
    assert common.write_autotune(tmp_path) == 3
    assert len(_rows(tmp_path / common.AUTOTUNE_CSV)) == 6

    lines = "\n".join(summary.autotune_section(tmp_path))
    assert "| _k | fwd | N_BUCKET=256 D=72 bfloat16 float32 | 64x64 w4 s2 |" in lines
    assert "64x32 w8 s3: 0.0200 (2.00); 64x64 w4 s2: 0.0100 (1.00); " \
           "128x64 w8 s3: did not fit the card" in lines
    assert "64x32 w8 s3: not measured" in lines
    assert summary.autotune_section(tmp_path / "none") == []

    # summary.md has the section; the README's copy of it does not
    (tmp_path / "summary.md").write_text(summary.build_summary(tmp_path))
    assert "## Autotune" in (tmp_path / "summary.md").read_text()
    inner = summary.readme_section([tmp_path], tmp_path / "README.md")
    assert "Autotune" not in inner and "_k" not in inner


def test_model_run_measures_every_cases_first_two_providers_first(tmp_path, monkeypatch):
    """A spent budget skips extra providers, not a goal's case: the run measures each case's
    first two providers (the default, the yardstick) before any case's third; the CSV lists
    rows case by case in provider order."""
    from benchmarks import bench_model as bm

    MC = bm.ModelCase
    fake = [MC("DiffiT-tiny", "latent", 32, 2, "fwd+bwd+adamw", ("ours", "eager", "compile"),
               rep_ms=1),
            MC("tiny", "unet", 8, 2, "fwd+bwd+adamw", ("eager", "ours"), rep_ms=1),
            MC("DiffiT-tiny", "latent", 32, 2, "fwd", ("eager", "ours", "ours+compile"),
               rep_ms=1)]
    calls = []

    def measure(case, provider, dtype, device, quick):
        calls.append((case.id, provider))
        return dict(ms=1.0, images_per_s=2.0, tflops=0.0, peak_mb=0.0, activations_mb=0.0)

    monkeypatch.setattr(bm, "cases", lambda quick=False, tiny_cpu=False: fake)
    monkeypatch.setattr(bm, "measure", measure)
    rows = bm.run(tiny_cpu=True, out_dir=str(tmp_path))
    firsts = [(c.id, p) for c in fake for p in c.providers[:2]]
    assert calls[:len(firsts)] == firsts, calls
    assert [(r["case"], r["provider"]) for r in rows] == \
        [(c.name, p) for c in fake for p in c.providers]
    assert [(r["case"], r["provider"]) for r in _rows(tmp_path / "model.csv")] == \
        [(c.name, p) for c in fake for p in c.providers]


def test_launch_tuned_builds_each_autotuner_once_and_records_what_it_tunes(monkeypatch):
    """_common.launch_tuned, the attention and adaln_norm launchers' path on CUDA: the
    autotuner of a key is built at its first use and reused, each call launches it on the
    grid with the arguments, and a newly tuned key lands in the autotune record."""
    import triton

    from diffit_kernels import _common

    monkeypatch.setattr(_common, "_TUNED", [])
    monkeypatch.setattr(_common, "_TUNERS", {})
    cfgs = [triton.Config({"AHEAD": a}, num_warps=8, num_stages=1) for a in (1, 2)]
    launched, built = [], []

    class Launching(_Tuner):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append((grid, args, kwargs))
                if not self.cache:
                    self.tune((1152,), [[0.02], [0.01]])
            return run

    def build():
        built.append(1)
        return Launching(cfgs, ["C"])

    first = _common.launch_tuned(("_k", 1), build, "_k", "rows", (4,), (1, 2), {"X": 3})
    again = _common.launch_tuned(("_k", 1), build, "_k", "rows", (4,), (5,), {})
    assert first is again and built == [1]
    assert launched == [((4,), (1, 2), {"X": 3}), ((4,), (5,), {})]
    rec, = _common.autotune_timings()                   # tuned once, recorded once
    assert rec["kernel"] == "_k" and rec["best"] == "AHEAD=2 w8 s1"


def test_the_autotuners_time_each_candidate_for_a_quarter_of_tritons_default(monkeypatch):
    """Every autotuner of the ops (_common.autotuner) times with _common.tuning_bench:
    do_bench's warm-up and repetition budgets at TUNE_WARMUP_MS / TUNE_REP_MS, not Triton's
    25 / 100 ms (first calls wait for every candidate's timing)."""
    import triton
    import triton.language as tl
    import triton.testing

    from diffit_kernels import _common

    @triton.jit
    def kernel(X, N, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), 0.0, mask=tl.arange(0, BLOCK) < N)

    tuner = _common.autotuner([triton.Config({"BLOCK": b}) for b in (16, 32)], ("N",), kernel)
    assert tuner.do_bench is _common.tuning_bench and tuner.keys == ["N"]
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, **kw: calls.append(kw) or [1.0, 0.9, 1.1])
    assert _common.tuning_bench(lambda: None, (0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert calls == [dict(warmup=_common.TUNE_WARMUP_MS, rep=_common.TUNE_REP_MS,
                          quantiles=(0.5, 0.2, 0.8))]
    assert (_common.TUNE_WARMUP_MS, _common.TUNE_REP_MS) == (5, 25)
