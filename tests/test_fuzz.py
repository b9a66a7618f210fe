"""tests/fuzz.py, the randomized parity run: a few cases of each family pass, and a kernel
made wrong is reported with its case."""
import pytest
import torch

import fuzz
import test_adaln_norm


@pytest.mark.interpreter
def test_a_few_random_cases_of_each_family_pass():
    lines = []
    assert fuzz.fuzz(list(fuzz.FAMILIES), cases=3, seed=1, out=lines.append) == 0, lines
    assert lines[-1] == "3 cases, 0 failed"


@pytest.mark.interpreter
def test_a_wrong_kernel_is_reported_with_its_case(monkeypatch):
    from diffit_kernels import norm

    real = norm._adaln_norm_fwd

    def doubled(*args):
        y, h, mean, rstd = real(*args)
        return y * 2, h, mean, rstd

    monkeypatch.setattr(norm, "_adaln_norm_fwd", doubled)
    monkeypatch.setitem(fuzz.FAMILIES, "only", lambda rng: (
        "adaln_norm doubled",
        lambda: test_adaln_norm._run(torch.float32, 2, 3, 8, True, False, True, True, False)))
    lines = []
    assert fuzz.fuzz(["only"], cases=2, out=lines.append) == 2
    assert lines[0].startswith("FAIL adaln_norm doubled") and "parity" in lines[0]
