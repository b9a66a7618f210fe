"""Eager calls skip the custom ops' dispatcher (diffit_kernels._common.direct_call): the direct
path must give bitwise the results of the custom-op path (what torch.compile traces), for every
output and gradient of the three ops, and profiles must still see each call once."""
import pytest
import torch

import diffit_kernels
from diffit_kernels import _common, projection

OPS = ("tmsa_attention", "adaln_norm", "time_qkv")


def _leaves(op: str, gen: torch.Generator) -> dict:
    def r(*shape):
        return torch.randn(*shape, generator=gen)
    if op == "tmsa_attention":
        return dict(q=r(2, 3, 36, 24), k=r(2, 3, 36, 24), v=r(2, 3, 36, 24),
                    table=r(11 * 11, 3) * 0.5)
    if op == "adaln_norm":
        return dict(x=r(2, 9, 40), res=r(2, 9, 40), mod=r(2, 120) * 0.5)
    return dict(x=r(2, 9, 40), temb=r(2, 12), w=r(3 * 48, 40) * 0.2, b=r(3 * 48),
                tw=r(3 * 48, 12) * 0.2)


def _call(op: str, t: dict):
    if op == "tmsa_attention":
        return (diffit_kernels.tmsa_attention(t["q"], t["k"], t["v"], table=t["table"],
                                              grid=(6, 6), backend="triton"),)
    if op == "adaln_norm":
        sh, sc, g = t["mod"].chunk(3, dim=1)
        return diffit_kernels.adaln_norm(t["x"], sh, sc, residual=t["res"], gate=g,
                                         activation="silu", backend="triton")
    return diffit_kernels.time_qkv(t["x"], t["temb"], t["w"], t["b"], t["tw"], None, 4,
                                   norm_eps=1e-6, backend="triton")


def _run(op: str, dtype: torch.dtype, direct: bool, monkeypatch, grad: bool = True):
    calls = []
    for mod in (_common, projection):  # where the ops look direct_call up
        real = mod.direct_call
        monkeypatch.setattr(mod, "direct_call",
                            lambda *a, _r=real: calls.append(_r(*a) and direct) or calls[-1])
    gen = torch.Generator().manual_seed(7)
    leaves = {k: v.to(dtype).requires_grad_(grad) for k, v in _leaves(op, gen).items()}
    with torch.set_grad_enabled(grad):
        outs = _call(op, leaves)
    monkeypatch.undo()
    assert calls and all(c == direct for c in calls), calls  # the path asked for was taken
    if not grad:
        return [o.detach() for o in outs]
    dys = [torch.randn(o.shape, generator=gen).to(dtype) for o in outs]
    torch.autograd.backward(outs, dys)
    return [o.detach() for o in outs] + [leaves[k].grad for k in sorted(leaves)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_direct_eager_calls_equal_the_custom_op_bitwise(op, dtype, monkeypatch):
    for grad in (True, False):
        direct = _run(op, dtype, True, monkeypatch, grad)
        via_op = _run(op, dtype, False, monkeypatch, grad)
        assert len(direct) == len(via_op)
        for i, (a, b) in enumerate(zip(direct, via_op)):
            assert a is not None and b is not None, (op, i)
            assert torch.equal(a, b), (op, grad, i, (a.float() - b.float()).abs().max())


def test_direct_call_is_for_plain_eager_tensors_only():
    from diffit_kernels._common import direct_call

    t = torch.randn(2)
    assert direct_call(t, None, torch.nn.Parameter(torch.randn(2)))
    assert not direct_call(t, torch.empty(2, device="meta"))

    class Sub(torch.Tensor):
        pass
    assert not direct_call(t.as_subclass(Sub))
    seen = []
    torch.compile(lambda x: seen.append(direct_call(x)) or x + 1, backend="eager")(t)
    assert seen == [False]  # traced by torch.compile: the custom op, never the direct path


def test_every_launcher_runs_on_its_tensors_device():
    """Triton launches on the current CUDA device; each op's launchers make it their tensors'
    (_common.on_tensor_device), so ops on a second card work without torch.cuda.set_device."""
    from diffit_kernels import attention, norm

    for fn in (attention._tmsa_attention_fwd, attention._tmsa_attention_bwd,
               norm._adaln_norm_fwd, norm._adaln_norm_bwd,
               projection._time_qkv_fwd, projection._time_qkv_bwd):
        assert getattr(fn, "on_tensor_device", False), fn.__name__


@pytest.mark.parametrize("message", _common.CAPTURE_REFUSALS)
def test_a_call_refused_inside_a_cuda_graph_capture_says_what_to_do(message):
    """Triton loads a kernel onto the card at its first launch, which CUDA refuses inside a
    graph capture, and Triton's error says only that. The launchers re-raise it saying to run
    the calls once before the capture, keeping CUDA's words and the original error; any other
    error passes through unchanged."""
    def launcher(x):
        raise RuntimeError(f"Triton Error [CUDA]: {message}")

    def other(x):
        raise RuntimeError("Triton Error [CUDA]: out of memory")

    with pytest.raises(RuntimeError, match="once outside the capture first") as info:
        _common.on_tensor_device(launcher)(torch.ones(1))
    assert message in str(info.value) and "launcher" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="^Triton Error \\[CUDA\\]: out of memory$"):
        _common.on_tensor_device(other)(torch.ones(1))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("op", OPS)
def test_gpu_op_on_a_second_card_while_the_first_is_current(op):
    """Tensors on cuda:1 with cuda:0 current: outputs and gradients on cuda:1, bitwise those
    of the same call with cuda:1 current (Triton alone would launch on cuda:0)."""
    leaves = _leaves(op, torch.Generator().manual_seed(0))

    def run(current: int):
        with torch.cuda.device(current):
            t = {k: v.to("cuda:1", torch.bfloat16).requires_grad_() for k, v in leaves.items()}
            outs = _call(op, t)
            grads = torch.autograd.grad([o.float().square().sum() for o in outs],
                                        list(t.values()), allow_unused=True)
        torch.cuda.synchronize(1)
        return [x for x in (*outs, *grads) if x is not None]

    other, own = run(0), run(1)
    for x, y in zip(other, own):
        assert x.device == torch.device("cuda", 1)
        assert torch.equal(x, y)
