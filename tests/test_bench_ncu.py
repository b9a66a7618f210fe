"""benchmarks.ncu_kernels, the program gpu_session.sh runs under Nsight Compute: its cases run
(fwd+bwd, every gradient finite) at tiny shapes under the interpreter, and the case names the
session script asks for exist. The counters themselves need a card with ncu."""
import math
import re
from pathlib import Path

import pytest
import torch

from benchmarks import ncu_kernels

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_case_is_named():
    with pytest.raises(ValueError, match="no-such-case"):
        ncu_kernels.cases(["attention latent256-B32", "no-such-case"])


def test_default_cases_put_the_training_step_first():
    names = [c[0] for c in ncu_kernels.cases()]
    assert names[:3] == ["attention latent256-B32", "time_qkv xl256-B32", "adaln_norm xl256-B32"]
    assert {op for _, op, _ in ncu_kernels.CASES} == set(ncu_kernels.BUILDERS)


def test_session_script_asks_for_known_cases():
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    asked = re.findall(r'--cases "([^"]+)"', script)
    assert asked, "gpu_session.sh no longer narrows the ncu cases when time is short"
    for names in asked:
        ncu_kernels.cases(names.split(","))  # raises on an unknown name


def test_settings_name_cases_and_come_back():
    import importlib

    names = {c[0] for c in ncu_kernels.CASES}
    assert set(ncu_kernels.SETTINGS) <= names
    for name, (module, attr, value) in ncu_kernels.SETTINGS.items():
        module = importlib.import_module(f"diffit_kernels.{module}")
        before = getattr(module, attr)
        with ncu_kernels.setting(name):
            assert getattr(module, attr) == value != before
        assert getattr(module, attr) == before


def test_no_cuda_is_explained(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ncu_kernels.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out


@pytest.mark.interpreter
def test_tiny_cases_run_forward_and_backward():
    for name, op, shape in ncu_kernels.cases(tiny_cpu=True):
        step, leaves = ncu_kernels.BUILDERS[op](shape, torch.bfloat16, torch.device("cpu"))
        grads = step()
        assert len(grads) == len(leaves), name
        for g, leaf in zip(grads, leaves):
            assert g.shape == leaf.shape, name
            assert math.isfinite(g.float().abs().sum().item()), name
    assert ncu_kernels.run(tiny_cpu=True) == [c[0] for c in ncu_kernels.cases(tiny_cpu=True)]
