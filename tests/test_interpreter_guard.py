"""The interpreter's guard (diffit_kernels.testing.interpreter_guard), which every
interpreter test runs under (conftest): it must fire on what a GPU would get wrong and the
interpreter silently gets right (or reads as garbage), and stay quiet on what is correct."""
import contextlib

import numpy as np
import pytest
import torch

from diffit_kernels import testing
from diffit_kernels._common import triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="needs triton")

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _shift_kernel(X, Y, SHIFT, N, BLOCK: tl.constexpr):
        # program p reads X[p*BLOCK + SHIFT + i], writes Y[p*BLOCK + i]
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs + SHIFT, mask=offs + SHIFT < N, other=0.0)
        tl.store(Y + offs, x + 1.0, mask=offs < N)

    @triton.jit
    def _sum_into_kernel(X, ACC, N, BLOCK: tl.constexpr):
        # every program adds its block into ACC[0:BLOCK] (a read-modify-write shared by all)
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + pid * BLOCK + offs, mask=pid * BLOCK + offs < N, other=0.0)
        acc = tl.load(ACC + offs)
        tl.store(ACC + offs, acc + x)

    @triton.jit
    def _masked_sum_kernel(X, OUT, N, BLOCK: tl.constexpr, OTHER: tl.constexpr):
        # the sum of X[:N] in one block: right only where the masked-off lanes load 0
        offs = tl.arange(0, BLOCK)
        if OTHER:
            x = tl.load(X + offs, mask=offs < N, other=0.0)
        else:
            x = tl.load(X + offs, mask=offs < N)
        tl.store(OUT, tl.sum(x, 0))

    @triton.jit
    def _hinted_copy_kernel(X, Y, START, BLOCK: tl.constexpr, HINT: tl.constexpr):
        # copies X[START : START + BLOCK], claiming START is a multiple of HINT
        offs = tl.max_contiguous(tl.multiple_of(START + tl.arange(0, BLOCK), HINT), BLOCK)
        tl.store(Y + tl.arange(0, BLOCK), tl.load(X + offs))

    @triton.jit
    def _twice(x):
        return x * 2.0 + tl.zeros_like(x)

    @triton.jit
    def _helper_kernel(X, Y, BLOCK: tl.constexpr):
        # three calls of a @triton.jit helper inside the kernel
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        for _ in range(3):
            x = _twice(x)
        tl.store(Y + offs, x)

    @triton.jit
    def _scatter_kernel(X, Y, BLOCK: tl.constexpr, SAME: tl.constexpr):
        # lanes i and i + BLOCK / 2 store to Y[i % (BLOCK / 2)]: X's values, or zeros
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        if SAME:
            x = x * 0.0
        tl.store(Y + offs % (BLOCK // 2), x)

    @triton.jit
    def _reload_kernel(X, Y, BLOCK: tl.constexpr, HOW: tl.constexpr):
        # stores X's block to Y, then reads Y back: in the same lanes (0), reversed (1),
        # reversed after a barrier (2), as a [2, BLOCK / 2] tile (3); writes it to X
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs) * 2.0)
        if HOW == 0:
            back = tl.load(Y + offs)
        elif HOW == 1:
            back = tl.load(Y + BLOCK - 1 - offs)
        elif HOW == 2:
            tl.debug_barrier()
            back = tl.load(Y + BLOCK - 1 - offs)
        else:
            two = tl.arange(0, 2)[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
            back = tl.reshape(tl.load(Y + two), [BLOCK])
        tl.store(X + offs, back)

    @triton.jit
    def _own_rmw_kernel(ACC, ROUNDS, BLOCK: tl.constexpr):
        # each program reads and rewrites its own block several times (stores then loads)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        for _ in range(ROUNDS):
            tl.store(ACC + offs, tl.load(ACC + offs) * 2.0)


@pytest.mark.interpreter
def test_clean_launches_pass():
    x = torch.randn(100)
    y = torch.full((100,), float("nan"))
    _shift_kernel[(4,)](x, y, 0, 100, BLOCK=32)  # the conftest guard is on
    torch.testing.assert_close(y, x + 1.0)
    acc = torch.ones(96)
    _own_rmw_kernel[(3,)](acc, 3, BLOCK=32)
    torch.testing.assert_close(acc, torch.full((96,), 8.0))


@pytest.mark.interpreter
def test_read_of_another_programs_write_is_a_race():
    # in place: program p reads the first element of program p + 1's block, which that
    # program overwrites; the interpreter's order gives one answer, a GPU any
    x = torch.randn(128)
    with pytest.raises(testing.RaceBetweenPrograms, match="loads .* which program 1"):
        _shift_kernel[(4,)](x, x, 1, 128, BLOCK=32)


@pytest.mark.interpreter
def test_two_programs_writing_one_address_is_a_race():
    acc = torch.zeros(32)
    with pytest.raises(testing.RaceBetweenPrograms, match="both store"):
        _sum_into_kernel[(3,)](torch.randn(96), acc, 96, BLOCK=32)


@pytest.mark.interpreter
def test_masked_lanes_without_other_are_undefined():
    """A masked load without `other` leaves masked-off lanes undefined on a GPU; the
    interpreter's zeros would make the sum below right, the guard's NaN makes it fail."""
    x = torch.randn(20)
    out = torch.empty(1)
    _masked_sum_kernel[(1,)](x, out, 20, BLOCK=32, OTHER=True)
    torch.testing.assert_close(out[0], x.sum())
    _masked_sum_kernel[(1,)](x, out, 20, BLOCK=32, OTHER=False)
    assert out.isnan().all()
    full = torch.randn(32)
    _masked_sum_kernel[(1,)](full, out, 32, BLOCK=32, OTHER=False)  # no lane masked off
    torch.testing.assert_close(out[0], full.sum())


@pytest.mark.interpreter
def test_false_alignment_hint_is_caught():
    x = torch.randn(64)
    y = torch.empty(16)
    _hinted_copy_kernel[(1,)](x, y, 32, BLOCK=16, HINT=16)  # true: 32 is a multiple of 16
    torch.testing.assert_close(y, x[32:48])
    # false: a card would load 16-element vectors from 16-aligned addresses around 40
    with pytest.raises(Exception, match="multiple_of claims 16 along dim 0, but 40"):
        _hinted_copy_kernel[(1,)](x, y, 40, BLOCK=16, HINT=16)


def test_hint_rule():
    import numpy as np

    rows = np.arange(4)[:, None] * 24          # [4, 1] row offsets, stride 24
    assert testing.hint_problem(rows, "tt.divisibility", [8, 8]) is None
    assert "claims 16 along dim 0" in testing.hint_problem(rows, "tt.divisibility", [16, 1])
    cols = np.concatenate([np.arange(16, 24), np.arange(40, 48)])
    assert testing.hint_problem(cols, "tt.divisibility", [8]) is None
    assert testing.hint_problem(cols, "tt.contiguity", [8]) is None
    assert "do not hold" in testing.hint_problem(cols, "tt.contiguity", [16])
    assert "but 17" in testing.hint_problem(cols + 1, "tt.divisibility", [8])
    # contiguity 1 (all starts): every element must be a multiple
    assert "but 12" in testing.hint_problem(np.array([0, 8, 12]), "tt.divisibility", [4 * 2])
    assert testing.hint_problem(np.array(48), "tt.divisibility", [16]) is None


@pytest.mark.interpreter
def test_out_of_bounds_load_is_caught():
    x = torch.randn(64)
    y = torch.empty(64)
    # the mask allows lanes past x's end: garbage under the interpreter, a fault on a card
    # (raised inside the program, so the interpreter may wrap it in an error of its own)
    with pytest.raises(Exception, match="OutOfBoundsAccess|load touched address") as err:
        _shift_kernel[(2,)](x, y, 40, 200, BLOCK=32)
    assert "outside every tensor passed to the kernel" in str(err.value)


@pytest.mark.interpreter
def test_grid_past_the_cards_y_and_z_limit_is_caught(monkeypatch):
    from diffit_kernels import _common

    x = torch.randn(64)
    y = torch.empty(64)
    # a card launches at most 65535 programs along y and z; lowered here to see it fire
    monkeypatch.setattr(_common, "GRID_YZ_MAX", 2)
    _shift_kernel[(4, 1, 1)](x, y, 0, 64, BLOCK=16)   # x is not limited so
    assert torch.equal(y, x + 1.0)
    for grid in ((2, 3, 1), (2, 1, 3)):   # (the programs past x would race: never reached)
        with pytest.raises(Exception, match="GridTooLarge|programs along y and z") as err:
            _shift_kernel[grid](x, y, 0, 64, BLOCK=32)
        assert "at most 2 programs along y and z" in str(err.value)


@pytest.mark.interpreter
def test_lanes_of_one_store_writing_one_address_differently_is_a_race():
    y = torch.zeros(4)
    _scatter_kernel[(1,)](torch.arange(8.0), y, BLOCK=8, SAME=True)   # equal values: fine
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0]
    # (raised inside the program: the interpreter may wrap it in an error of its own)
    with pytest.raises(Exception, match="writes different values to 0x.* from two lanes"):
        _scatter_kernel[(1,)](torch.arange(8.0), y, BLOCK=8, SAME=False)


@pytest.mark.interpreter
def test_reload_of_a_programs_own_store_needs_the_same_lane_or_a_barrier():
    """A program reading back what it stored: fine from the same lane (the same thread) or
    after tl.debug_barrier; through another lane or another tile shape with no barrier, a
    card's other thread may read before the store lands."""
    x = torch.arange(8.0)
    y = torch.empty(8)
    _reload_kernel[(1,)](x, y, BLOCK=8, HOW=0)
    assert x.tolist() == [2.0 * i for i in range(8)]
    x = torch.arange(8.0)
    _reload_kernel[(1,)](x, y, BLOCK=8, HOW=2)
    assert x.tolist() == [2.0 * i for i in reversed(range(8))]
    with pytest.raises(Exception, match="through one lane what another lane of it stored"):
        _reload_kernel[(1,)](torch.arange(8.0), y, BLOCK=8, HOW=1)
    with pytest.raises(Exception, match=r"as a \[2, 4\] tile, what it stored as a \[8\]"):
        _reload_kernel[(1,)](torch.arange(8.0), y, BLOCK=8, HOW=3)


def test_race_rule_on_recorded_accesses():
    """The rule itself, on hand-made records (start addresses, element bytes, program)."""
    a = lambda *v: np.array(v, dtype=np.uint64)
    assert testing.races([], []) is None
    # the same program loading what it stores, others reading untouched memory: fine
    assert testing.races([(a(0, 4), 4, 0), (a(64), 4, 1)], [(a(0, 4), 4, 0), (a(8), 4, 1)]) is None
    assert "both store" in testing.races([], [(a(0), 4, 0), (a(0), 4, 1)])
    # a 2-byte store inside another program's 4-byte element overlaps it
    assert "both store" in testing.races([], [(a(0), 4, 0), (a(2), 2, 1)])
    assert "program 1 loads" in testing.races([(a(8), 4, 1)], [(a(8), 4, 0)])
    assert testing.races([(a(12), 4, 1)], [(a(8), 4, 0)]) is None
    nan = float("nan")
    assert testing.lanes_disagree(a(0, 4, 0), np.array([1.0, 2.0, 1.0]), True) is None
    assert testing.lanes_disagree(a(0, 0), np.array([nan, nan]), True) is None
    assert "different values" in testing.lanes_disagree(a(0, 0), np.array([1.0, 2.0]), True)
    assert testing.lanes_disagree(a(0, 0), np.array([1.0, 2.0]), np.array([True, False])) is None


def test_autotune_key_rule():
    """_common.autotuner_repeats: one repeat at the first launch of a key (the values of the
    key arguments, then every tensor argument's dtype, as Triton's autotuner keys), none after
    it, none with the hook off."""
    from diffit_kernels import _common

    class Kernel:
        arg_names = ["X", "N", "D", "FLAG"]

        class fn:
            __name__ = "k"

    x16, x32 = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    assert _common.autotuner_repeats(Kernel, ["N"], (x16, 64, 8), {"FLAG": True}) == 0  # off
    with testing.autotuner_repeats():
        seen = _common._REPEATS["seen"]
        seen.clear()
        assert _common.autotuner_repeats(Kernel, ["N"], (x16, 64, 8), {"FLAG": True}) == 1
        assert _common.autotuner_repeats(Kernel, ["N"], (x16, 64, 9), {"FLAG": True}) == 0
        assert _common.autotuner_repeats(Kernel, ["N"], (x32, 64, 8), {"FLAG": True}) == 1
        assert _common.autotuner_repeats(Kernel, ["N", "FLAG"], (x16, 64, 8), {"FLAG": 0}) == 1
        assert _common.autotuner_repeats(Kernel, ["N"], (x16, 128, 8), {}) == 1


@pytest.mark.interpreter
def test_repeated_first_launches_catch_an_accumulating_launch(monkeypatch):
    """The attention backward's dK/dV pass adds its later batch-share steps into the table
    partials its first step stored: right only because a card's autotuner tunes (repeats)
    the key's first launch, the storing one. Treating every launch as a key's first repeats
    the adding steps too, and the table gradient comes out wrong: the hook sees what a
    repeated accumulating launch would do."""
    import diffit_kernels
    from diffit_kernels import _common, attention as A

    class EveryLaunchFirst(set):
        def __contains__(self, key):
            return False

    def grads(backend="triton"):
        torch.manual_seed(0)
        q, k, v = (torch.randn(4, 2, 64, 16, requires_grad=True) for _ in range(3))
        table = torch.randn(15 * 15, 2, requires_grad=True)
        log = []
        with A._emulate_card(1, elt=2, log=log):  # one SM: shares of 2 samples, 2 steps
            o = diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(8, 8),
                                              backend=backend)
            g = torch.autograd.grad(o.square().sum(), (q, table))
        assert backend == "torch" or ("ds-shares", (2, 2)) in log
        return g

    dq_ref, dtable_ref = grads("torch")
    dq, dtable = grads()  # the conftest hook is on: first launches repeated, and right
    torch.testing.assert_close(dtable, dtable_ref, rtol=1e-4, atol=1e-4)
    monkeypatch.setitem(_common._REPEATS, "seen", EveryLaunchFirst())
    dq2, dtable2 = grads()
    assert torch.equal(dq, dq2)   # dQ stores: repeats change nothing
    assert not torch.allclose(dtable2, dtable_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.interpreter
def test_helpers_inside_a_launch_reuse_its_language_patch(monkeypatch):
    """language_patched_once: a launch patches triton.language once, its helpers' calls skip
    the interpreter's repatch (without it, every call of a helper or of a jit function of the
    language, tl.zeros_like here, repatches), and the results are the same."""
    from triton.runtime import interpreter as interp

    calls = []
    below = interp._patch_lang

    def counted(fn):
        calls.append(fn.__name__)
        return below(fn)

    monkeypatch.setattr(interp, "_patch_lang", counted)
    x = torch.randn(16)
    for once in (False, True):
        calls.clear()
        y = torch.full((16,), float("nan"))
        with testing.language_patched_once() if once else contextlib.nullcontext():
            _helper_kernel[(1,)](x, y, BLOCK=16)
            _helper_kernel[(1,)](x, y, BLOCK=16)
        assert torch.equal(y, x * 8)
        if once:  # each launch, and the first call reaching triton.language.core in it
            assert calls == ["_helper_kernel", "zeros_like"] * 2, calls
        else:  # the helper's calls, and those of the language's own jit functions in it
            assert calls.count("_helper_kernel") == 2 and calls.count("_twice") == 6, calls
