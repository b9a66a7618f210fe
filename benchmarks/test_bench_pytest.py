"""pytest-benchmark front end: `pytest benchmarks --benchmark-only` times the cases of
`python -m benchmarks` with calibrated rounds, for users who track regressions with it.

The cases are not written twice. Collection runs each per-op benchmark's own run() once with
benchmarks.common.bench swapped for a recorder, which keeps every callable the benchmark would
have timed (with the grad / autocast mode it was timed under) instead of timing it; those rows
and files are thrown away. The model benchmark builds one model at a time, so its cases come
from bench_model.cases() and each test builds and frees its own model.

Each test runs pedantic rounds: before every round the gradients named by the benchmark are
reset and L2 is flushed (as do_bench does), outside the timed region; the number of rounds is
calibrated so a case takes about --bench-seconds. Options (benchmarks/conftest.py):
--bench-full (the full case list; default the --quick one), --bench-dtype, --bench-ops,
--bench-seconds. Without CUDA every test is skipped with the reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import re
import statistics
import tempfile
import time
from typing import Callable, ContextManager, Dict, List, Optional, Sequence
from unittest import mock

import pytest
import torch

import benchmarks.common as common

FLUSH_BYTES = 256 * 2 ** 20  # what do_bench zeroes between calls to clear L2


@dataclasses.dataclass
class BenchCase:
    id: str
    fn: Optional[Callable[[], object]] = None           # ready to call (recorded)
    open: Optional[Callable[[], ContextManager[Callable[[], object]]]] = None  # builds, frees
    grad_to_none: Sequence[torch.Tensor] = ()
    info: Dict[str, object] = dataclasses.field(default_factory=dict)
    skip: str = ""
    error: str = ""


def _modes() -> dict:
    return dict(grad=torch.is_grad_enabled(), inference=torch.is_inference_mode_enabled(),
                autocast={d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                          for d in ("cuda", "cpu")})


def replayable(fn: Callable[[], object], modes: dict) -> Callable[[], object]:
    """fn, called under the grad / inference / autocast modes it was recorded under."""
    def call():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(modes["inference"]))
            stack.enter_context(torch.set_grad_enabled(modes["grad"]))
            for dev, (on, dt) in modes["autocast"].items():
                stack.enter_context(torch.autocast(dev, dtype=dt, enabled=on))
            return fn()
    return call


def _id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "-", text).strip("-")


def record_cases(name: str, modname: str, quick: bool, dtype: str,
                 tiny_cpu: bool = False) -> List[BenchCase]:
    """Every callable `modname`.run() times, recorded instead of timed (see module doc)."""
    if importlib.util.find_spec(modname) is None:
        return [BenchCase(id=name, skip=f"{modname.replace('.', '/')}.py does not exist")]
    mod = importlib.import_module(modname)
    recorded: List[BenchCase] = []

    def recorder(fn, grad_to_none=(), warmup=25, rep=100, **_):
        recorded.append(BenchCase(id="", fn=replayable(fn, _modes()),
                                  grad_to_none=list(grad_to_none or ())))
        return 1.0  # a placeholder the module's arithmetic can use; its rows are discarded

    kwargs = dict(quick=quick, dtype=dtype)
    if tiny_cpu:
        kwargs["tiny_cpu"] = True
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pytest-") as tmp, \
                contextlib.redirect_stdout(io.StringIO()), \
                mock.patch.object(common, "bench", recorder), \
                (mock.patch.object(mod, "bench", recorder) if hasattr(mod, "bench")
                 else contextlib.nullcontext()):
            rows = mod.run(out_dir=tmp, **kwargs) or []
    except Exception as e:  # noqa: BLE001 - reported by the test of this benchmark
        return [BenchCase(id=name, error=f"{modname}.run() raised {type(e).__name__}: {e}")]
    if not recorded:
        return [BenchCase(id=name, error=f"{modname}.run() timed nothing through "
                                         "benchmarks.common.bench")]
    rows = [r for r in rows if not r.get("computed")]  # e.g. a memory-traffic limit: untimed
    if len(rows) == len(recorded):
        from benchmarks.summary import normalize

        for c, r in zip(recorded, map(normalize, rows, [name] * len(rows))):
            c.id = _id(f"{name}-{r['case']}-{r.get('provider', '')}-{r['pass']}")
            c.info = {k: r[k] for k in ("op", "case", "provider", "pass", "dtype") if k in r}
    else:
        for i, c in enumerate(recorded):
            c.id = f"{name}-{i}"
    return recorded


def model_cases(quick: bool, dtype: str, device, tiny_cpu: bool = False) -> List[BenchCase]:
    """bench_model's cases, each building its model when its test runs."""
    from benchmarks import bench_model

    out = []
    for case in bench_model.cases(quick, tiny_cpu):
        for provider in case.providers:
            out.append(BenchCase(
                id=_id(f"model-{case.id}-{provider}"),
                open=(lambda c=case, p=provider:
                      bench_model.prepared(c, p, dtype, device, quick)),
                info=dict(op="model", case=case.name, provider=provider, dtype=dtype,
                          **{"pass": case.pass_})))
    return out


def collect(ops: Sequence[str], quick: bool, dtype: str) -> List[BenchCase]:
    from benchmarks.__main__ import BENCHMARKS, PEAK

    cases = record_cases(*PEAK, quick=quick, dtype=dtype)
    for name in ops:
        if name == "model":
            cases += model_cases(quick, dtype, torch.device("cuda"))
        else:
            cases += record_cases(name, BENCHMARKS[name], quick=quick, dtype=dtype)
    seen: Dict[str, int] = {}
    for c in cases:  # pytest ids must be unique
        n = seen[c.id] = seen.get(c.id, 0) + 1
        if n > 1:
            c.id = f"{c.id}-{n}"
    return cases


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    if not torch.cuda.is_available():  # conftest skips these with the reason
        metafunc.parametrize("bench_case", [BenchCase(id="no-cuda", skip="no CUDA GPU")],
                             ids=["no-cuda"])
        return
    from benchmarks.__main__ import _parse_ops

    cfg = metafunc.config
    cases = collect(_parse_ops(cfg.getoption("bench_ops")), quick=not cfg.getoption("bench_full"),
                    dtype=cfg.getoption("bench_dtype"))
    metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases])


def calibrated_pedantic(benchmark, fn: Callable[[], object], grad_to_none=(),
                        seconds: float = 1.0) -> None:
    """benchmark.pedantic with L2 flushed and grads reset before each round (untimed) and
    enough rounds (5..1000) to fill about `seconds`."""
    cache = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def setup():
        for t in grad_to_none:
            t.grad = None
        cache.zero_()
        torch.cuda.synchronize()

    def target():
        fn()
        torch.cuda.synchronize()

    setup()
    target()  # compile / autotune / lazy state, outside every measurement
    est = []
    for _ in range(3):
        setup()
        t0 = time.perf_counter()
        target()
        est.append(time.perf_counter() - t0)
    rounds = int(min(1000, max(5, seconds / max(statistics.median(est), 1e-6))))
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


def test_bench(bench_case: BenchCase, benchmark, request):
    if bench_case.skip:
        pytest.skip(bench_case.skip)
    if bench_case.error:
        pytest.fail(bench_case.error)
    seconds = request.config.getoption("bench_seconds")
    benchmark.extra_info.update(bench_case.info)
    if bench_case.open is not None:
        with bench_case.open() as fn:
            calibrated_pedantic(benchmark, fn, (), seconds)
    else:
        calibrated_pedantic(benchmark, bench_case.fn, bench_case.grad_to_none, seconds)
