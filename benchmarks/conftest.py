"""pytest-benchmark options and the CUDA gate for `pytest benchmarks --benchmark-only`
(see benchmarks/test_bench_pytest.py). pytest.ini's testpaths stay `tests`: these run only
when asked for."""
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    g = parser.getgroup("diffit-kernels benchmarks")
    g.addoption("--bench-full", action="store_true",
                help="the full case list of `python -m benchmarks` (default: the --quick one)")
    g.addoption("--bench-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                help="dtype of the benchmark cases (default bf16)")
    g.addoption("--bench-ops", default="all",
                help="comma-separated: adaln_norm, time_qkv, tmsa_attention, model (default all)")
    g.addoption("--bench-seconds", type=float, default=1.0,
                help="time budget per case that calibrates its rounds (default 1.0)")


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "pytest-benchmark timings need a CUDA GPU; none is visible"
    elif not config.pluginmanager.hasplugin("benchmark"):
        reason = "needs pytest-benchmark (pip install pytest-benchmark)"
    if reason is None:
        return
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))
