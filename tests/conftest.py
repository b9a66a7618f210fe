"""Test processes: plain CPU tests, `interpreter` tests (TRITON_INTERPRET=1 set before triton is
imported, so they run in their own pytest process) and `aot` tests (no TRITON_INTERPRET).
tests/run.sh runs the three processes; a marker run in the wrong process is skipped with why."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_configure(config):
    # the interpreter process (xdist workers inherit the controller's verdict): when this
    # Triton / NumPy pair cannot run the kernels, every test would fail with an opaque error
    wanted = "interpreter" in (config.option.markexpr or "interpreter")
    if INTERPRET and wanted and not hasattr(config, "workerinput"):
        from diffit_kernels.testing import interpreter_problem

        problem = interpreter_problem()
        if problem:
            pytest.exit(f"interpreter tests cannot run: {problem}", returncode=3)


def pytest_addoption(parser):
    parser.addoption(
        "--ends-only", action="store_true",
        help="run only the first and the last case of each parametrized test (the interpreter "
             "tests under a second Triton release: every test and code path, its cases' two ends "
             "of the dtype and size grid, at a fraction of the time)")


def ends_only(items):
    """(kept, dropped): of each test function's cases, the first and the last in collection
    order (the simplest and, by the usual parametrize order, the widest 16-bit one)."""
    cases: dict = {}
    for item in items:
        cases.setdefault(item.nodeid.split("[")[0], []).append(item)
    ends = {id(c[0]) for c in cases.values()} | {id(c[-1]) for c in cases.values()}
    return ([i for i in items if id(i) in ends], [i for i in items if id(i) not in ends])


def pytest_collection_modifyitems(config, items):
    if config.getoption("ends_only"):
        items[:], dropped = ends_only(items)
        config.hook.pytest_deselected(items=dropped)
    for item in items:
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(pytest.mark.skip(
                reason="interpreter test: run with TRITON_INTERPRET=1 (tests/run.sh does)"))
        if "aot" in item.keywords and INTERPRET:
            item.add_marker(pytest.mark.skip(
                reason="aot test: needs a process without TRITON_INTERPRET"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible"))


@pytest.fixture(autouse=True)
def _guards(request):
    """Interpreter tests: under the interpreter guard (what a card would get wrong made to fail)
    and with first launches repeated as a card's autotuner repeats them; seeds are fresh per test
    but reproducible from the test id."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    if INTERPRET and "interpreter" in request.keywords:
        from diffit_kernels.testing import autotuner_repeats, interpreter_guard

        with interpreter_guard(), autotuner_repeats():
            yield
    else:
        yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_thread():
    """Tiny matrices: a second OpenMP thread only spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def trial_picks_ours(monkeypatch):
    """Backend "auto" times both backends on this CPU too (under the interpreter both run), one
    warm-up and one timed pass each, and the choice is forced to ours (the interpreter's kernels
    are far slower than the reference) unless ours was left out. Yields the list of what each
    trial timed, merged over ranks as pick_fastest returns it."""
    from diffit import accel

    monkeypatch.setattr(accel, "TRIAL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(accel, "TRIAL_WARMUP", 1)
    monkeypatch.setattr(accel, "TRIAL_STEPS", 1)
    timed, pick = [], accel.pick_fastest

    def ours_win(per_rank):  # unless ours was left out (failed, or a wrong result)
        chosen, merged = pick(per_rank)
        timed.append(merged)
        return ("triton" if not isinstance(merged["triton"], str) else chosen), merged

    monkeypatch.setattr(accel, "pick_fastest", ours_win)
    yield timed
