"""Package-level contract: imports without a GPU, backend choice, the reference's building blocks."""
import os
import subprocess
import sys

import pytest
import torch

import diffit_kernels
from diffit_kernels import reference
from diffit_kernels._common import resolve_backend


def test_imports_query_no_gpu():
    code = ("import torch, diffit_kernels, diffit; "
            "assert not torch.cuda.is_initialized(), 'a GPU was queried at import'; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_public_api_names():
    for name in ("adaln_norm", "time_qkv", "tmsa_attention", "relative_position_index"):
        assert name in diffit_kernels.__all__ and callable(getattr(diffit_kernels, name))
        if name != "relative_position_index":
            assert callable(getattr(reference, name))


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("DIFFIT_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(RuntimeError, match="cannot run on tensors on \\['cpu'\\]"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv("DIFFIT_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"  # an explicit choice beats the variable


@pytest.mark.parametrize("gh,gw", [(1, 1), (2, 3), (4, 4), (16, 16)])
def test_relative_position_index_formula(gh, gw):
    idx = diffit_kernels.relative_position_index(gh, gw)
    assert idx.dtype == torch.int64 and idx.shape == (gh * gw, gh * gw)
    for a in range(0, gh * gw, max(1, gh * gw // 7)):
        for b in range(0, gh * gw, max(1, gh * gw // 5)):
            ia, ja, ib, jb = a // gw, a % gw, b // gw, b % gw
            assert idx[a, b] == (ia - ib + gh - 1) * (2 * gw - 1) + (ja - jb + gw - 1)
    assert idx.min() == 0 and idx.max() == (2 * gh - 1) * (2 * gw - 1) - 1


def test_relative_position_index_rejects_bad_windows():
    with pytest.raises(ValueError, match="positive ints"):
        diffit_kernels.relative_position_index(0, 3)


def test_reference_windowed_attention_equals_masked_global_attention():
    """Windowed attention == global attention where cross-window scores are -inf: an independent
    check of the reference's partition / reverse."""
    B, H, Gh, Gw, gh, gw, D = 2, 3, 4, 6, 2, 3, 8
    N = Gh * Gw
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    table = torch.randn((2 * gh - 1) * (2 * gw - 1), H, dtype=torch.float64)
    out = reference.tmsa_attention(q, k, v, table=table, grid=(Gh, Gw), window=(gh, gw))
    i, j = torch.arange(N) // Gw, torch.arange(N) % Gw
    win = (i // gh) * (Gw // gw) + (j // gw)
    same = win[:, None] == win[None, :]
    di = i[:, None] - i[None, :] + gh - 1
    dj = j[:, None] - j[None, :] + gw - 1
    idx = (di * (2 * gw - 1) + dj).clamp(0, table.shape[0] - 1)
    bias = table[idx].permute(2, 0, 1).masked_fill(~same, float("-inf"))
    s = q @ k.transpose(-1, -2) * D ** -0.5 + bias
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


def test_reference_upcast_returns_input_dtype():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    y = reference.adaln_norm(x, upcast=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.adaln_norm(x.float()), atol=2e-2, rtol=0)


def test_check_command_on_a_cpu_machine():
    """`python -m diffit_kernels check` (the README's) runs every op against the reference under
    the interpreter, with the interpreter guard and autotuner repeats on, and passes."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                           "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-m", "diffit_kernels", "check", "--no-report"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "made to fail" in out.stdout and "check: all within bounds" in out.stdout
    for op in ("tmsa_attention", "adaln_norm", "time_qkv"):
        assert f"\n{op} " in out.stdout, op
    assert "FAIL" not in out.stdout


def test_ends_only_keeps_the_first_and_last_case_of_each_test():
    """The second Triton release's interpreter run (tests/aot_triton.sh): --ends-only keeps
    each parametrized test's first and last case, and every unparametrized test."""
    here = os.path.dirname(os.path.abspath(__file__))

    def collected(*extra):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", *extra,
                              os.path.join(here, "test_package.py")], capture_output=True,
                             text=True, timeout=300, cwd=os.path.dirname(here))
        return [ln.split("::", 1)[1] for ln in out.stdout.splitlines() if "::" in ln]

    every, ends = collected(), collected("--ends-only")
    cases = [t for t in every if t.startswith("test_relative_position_index_formula[")]
    assert len(cases) > 2
    assert [t for t in ends if t.startswith("test_relative_position_index_formula[")] == [
        cases[0], cases[-1]]
    assert [t for t in ends if "[" not in t] == [t for t in every if "[" not in t]
