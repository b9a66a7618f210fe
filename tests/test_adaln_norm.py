"""adaln_norm: the fused kernel against the reference, every output and gradient."""
import itertools

import pytest
import torch

import diffit_kernels
from diffit_kernels import norm, reference
from diffit_kernels.testing import assert_parity, nan_fill, parity, untuned_capture

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEATURES = [  # (residual, gate, shift, scale, silu): every combination (gate needs residual)
    f for f in itertools.product([False, True], repeat=5) if not (f[1] and not f[0])
]


def _case(B, N, C, residual, gate, shift, scale, silu, strided_x=False):
    """float32 leaves and a builder: shift/scale/gate are chunks of one [B, 3C] projection
    (strided views), x optionally a slice of a wider buffer."""
    leaves = {"x": torch.randn(B, N, C + (5 if strided_x else 0)) * 2 + 0.5,
              "mod": torch.randn(B, 3 * C) * 0.6}
    if residual:
        leaves["res"] = torch.randn(B, N, C)

    def build(t):
        sh, sc, g = t["mod"].chunk(3, dim=1)
        return dict(x=t["x"][..., :C] if strided_x else t["x"], shift=sh if shift else None,
                    scale=sc if scale else None, residual=t.get("res"), gate=g if gate else None,
                    activation="silu" if silu else None)

    grads = ["x"] + (["res"] if residual else []) + (["mod"] if (gate or shift or scale) else [])
    outs = ("y", "h") if residual else ("y",)
    return leaves, build, outs, grads


def _run(dtype, *case_args, keep_fp32=(), **kw):
    leaves, build, outs, grads = _case(*case_args, **kw)
    rows = parity(diffit_kernels.adaln_norm, reference.adaln_norm, leaves, build, dtype=dtype,
                  out_names=outs, grad_leaves=grads, op_kwargs={"backend": "triton"},
                  keep_fp32=keep_fp32)
    assert_parity(rows)
    return rows


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("vectors", ["x", "residual"], ids=["16bit-mod", "fp32-mod"])
@pytest.mark.parametrize("gate,silu", [(True, True), (False, False)], ids=["gate+silu", "plain"])
def test_float32_residual_stream_with_a_16bit_branch(dtype, vectors, gate, silu):
    # autocast: the residual stream stays float32, the branch (x) is 16-bit; h keeps float32,
    # y takes x's dtype, every gradient its input's dtype (no cast kernels around the op)
    keep = ("res",) + (("mod",) if vectors == "residual" else ())
    rows = _run(dtype, 2, 7, 72, True, gate, True, True, silu, keep_fp32=keep)
    assert {r.name for r in rows} >= {"y", "h", "dx", "dres", "dmod"}
    x = torch.randn(2, 3, 40).to(dtype)
    res = torch.randn(2, 3, 40, requires_grad=True)
    mod = torch.randn(2, 120, dtype=torch.float32 if vectors == "residual" else dtype,
                      requires_grad=True)
    sh, sc, g = mod.chunk(3, dim=1)
    y, h = diffit_kernels.adaln_norm(x.requires_grad_(), sh, sc, residual=res, gate=g,
                                     backend="triton")
    assert (y.dtype, h.dtype) == (dtype, torch.float32)
    torch.autograd.backward((y, h), (torch.ones_like(y), torch.ones_like(h)))
    assert (x.grad.dtype, res.grad.dtype, mod.grad.dtype) == (dtype, torch.float32, mod.dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("feat", FEATURES, ids=lambda f: "".join(
    n for n, on in zip(["res", "+gate", "+shift", "+scale", "+silu"], f) if on) or "plain")
def test_every_feature_combination(feat, dtype):
    _run(dtype, 3, 5, 64, *feat)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,N,C", [pytest.param(B, N, C, id=f"B{B}-N{N}-C{C}")
                                   for C in (64, 1000, 1152) for N in (1, 63) for B in (1, 3)])
def test_shapes_full_features(B, N, C, dtype):
    _run(dtype, B, N, C, True, True, True, True, True, strided_x=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_chunked_backward_for_wide_rows(monkeypatch, dtype):
    # rows wider than the backward's chunk are walked twice with accumulators in memory;
    # shrink the chunk so the interpreter exercises that path at a small C
    monkeypatch.setattr(norm, "BWD_BLOCK_C", 64)
    monkeypatch.setattr(norm, "BWD_CHUNK_C", 64)
    _run(dtype, 2, 9, 200, True, True, True, True, True)
    _run(dtype, 2, 9, 200, False, False, True, False, False)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("plans,C", list(norm.plans().items()),
                         ids=lambda p: f"C{p}" if isinstance(p, int) else
                         "fwd{}w{}{}-bwd{}{}w{}".format(*p[0][:2], "W" * p[0][2], p[1][0],
                                                         "c" * p[1][1], p[1][2]))
def test_every_plan_a_gpu_can_take(plans, C, dtype):
    # the block widths, warps and chunking of both kernels are the same on CUDA and here:
    # every plan the launchers can pick runs (bf16 with the same tiles as fp32)
    _run(dtype, 2, 3, C, True, True, True, True, True)


@pytest.mark.interpreter
@pytest.mark.parametrize("sms", [108, 132, 58, 128, 2],
                         ids=["A100-108", "H100-132", "L4-58", "4090-128", "tiny-2"])
def test_launch_plans_of_real_cards(sms):
    # the row splits a card's SM count picks, run under the interpreter: several backward
    # programs per sample, each walking several rows (the smallest such batch: ~4 rows per
    # SM), several forward programs per sample (several rows each from 16 rows per SM up:
    # the tiny card shows that split)
    B, N = 2, max(2 * sms + 3, 41)
    assert N > norm._fwd_rows_per_program(B, N, sms) > (sms == 2)
    assert 1 < norm._bwd_rows_per_program(B, N, sms) < N
    with norm._emulate_card(sms):
        _run(torch.float32, B, N, 64, True, True, True, True, True)


@pytest.mark.interpreter
def test_rows_with_large_mean_and_tiny_variance():
    leaves, build, outs, grads = _case(2, 7, 1152, True, True, True, True, False)
    leaves["x"] = leaves["x"] * 0.01 + 30.0
    rows = parity(diffit_kernels.adaln_norm, reference.adaln_norm, leaves, build,
                  dtype=torch.float32, out_names=outs, grad_leaves=grads,
                  op_kwargs={"backend": "triton"})
    assert_parity(rows)


@pytest.mark.interpreter
def test_one_channel_rows_held_to_the_float64_truth():
    """A LayerNorm over one channel: every row's variance is 0, so rstd = 1 / sqrt(eps) (1000)
    amplifies eager float32's cancellation in its backward (dres off by ~1e-4, where the exact
    gradient of the normalised part is 0). The kernel is checked against the float64 reference,
    within the tight bound or eager float32's own error; its residual gradient is the exact
    one, the output gradient of h passed through."""
    leaves, build, outs, grads = _case(2, 33, 1, True, True, False, True, False)
    rows = parity(diffit_kernels.adaln_norm, reference.adaln_norm, leaves, build,
                  dtype=torch.float32, out_names=outs, grad_leaves=grads,
                  op_kwargs={"backend": "triton"})
    assert_parity(rows)
    assert max(r.pt_err for r in rows if r.name == "dres") > 1e-5   # eager float32's own error
    x, res = (leaves[k].requires_grad_() for k in ("x", "res"))
    y, h = diffit_kernels.adaln_norm(**build(dict(leaves, x=x, res=res)), backend="triton")
    dh = torch.randn_like(h)
    assert torch.equal(torch.autograd.grad((y, h), res, (torch.randn_like(y), dh))[0], dh)


@pytest.mark.interpreter
def test_non_unit_channel_stride_is_copied_and_correct():
    x = torch.randn(2, 64, 6).transpose(1, 2)  # [2, 6, 64], channel stride 6
    y = diffit_kernels.adaln_norm(x, backend="triton")
    torch.testing.assert_close(y, reference.adaln_norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_backward_is_deterministic():
    leaves, build, _, _ = _case(3, 17, 96, True, True, True, True, True)
    dy = torch.randn(3, 17, 96)

    def grads():
        ls = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        y, h = diffit_kernels.adaln_norm(**build(ls), backend="triton")
        return torch.autograd.grad((y * dy).sum() + h.sum(), list(ls.values()))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_nan_in_input_propagates_to_its_row_only():
    x = torch.randn(2, 4, 64)
    x[1, 2, 5] = float("nan")
    with nan_fill():
        y = diffit_kernels.adaln_norm(x, backend="triton")
    assert torch.isnan(y[1, 2]).all()
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(y[mask]).all()


@pytest.mark.interpreter
def test_opcheck_forward_and_backward_ops():
    x, res = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    sh, sc, g = torch.randn(2, 192).chunk(3, dim=1)
    args = (x.requires_grad_(), sh, sc, res, g, 1e-6, True)
    torch.library.opcheck(norm._adaln_norm_fwd_op, args)
    # autocast's mix (what torch.compile traces in the blocks): the fake outputs' dtypes too
    xb = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    shb, scb, gb = torch.randn(2, 192, dtype=torch.bfloat16).chunk(3, dim=1)
    torch.library.opcheck(norm._adaln_norm_fwd_op,
                          (xb, shb, scb, res.requires_grad_(), g, 1e-6, True))


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_kernel_fp32():
    # the kernel computes in float32 (fp64 is not a kernel dtype); a float32 gradcheck with
    # finite-difference tolerances still catches a wrong formula
    def f(x, res, mod):
        sh, sc, g = mod.chunk(3, dim=1)
        y, h = diffit_kernels.adaln_norm(x, sh, sc, residual=res, gate=g, activation="silu",
                                         backend="triton")
        return y, h

    inputs = (torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 2, 8, requires_grad=True),
              (torch.randn(2, 24) * 0.5).requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-2, atol=5e-2, rtol=5e-2)


def test_gradcheck_reference_fp64():
    def f(x, res, mod):
        sh, sc, g = mod.chunk(3, dim=1)
        return reference.adaln_norm(x, sh, sc, residual=res, gate=g, activation="silu")

    inputs = tuple(t.double().requires_grad_() for t in
                   (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 24)))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.interpreter
def test_torch_compile_fullgraph_forward_backward():
    def f(x, res, mod):
        sh, sc, g = mod.chunk(3, dim=1)
        y, h = diffit_kernels.adaln_norm(x, sh, sc, residual=res, gate=g, activation="silu",
                                         backend="triton")
        return (y * 1.5).sum() + h.square().sum()

    inputs = [torch.randn(2, 3, 64, requires_grad=True), torch.randn(2, 3, 64, requires_grad=True),
              torch.randn(2, 192, requires_grad=True)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*inputs)
    g_c = torch.autograd.grad(loss_c, inputs)
    loss_e = f(*inputs)
    g_e = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.interpreter
def test_float64_is_refused_by_the_kernel_with_a_pointer_to_the_torch_backend():
    with pytest.raises(TypeError, match="backend='torch'"):
        diffit_kernels.adaln_norm(torch.randn(1, 2, 8, dtype=torch.float64), backend="triton")


@pytest.mark.interpreter
def test_channels_beyond_the_kernel_limit_raise():
    x = torch.randn(1, 1, norm.MAX_C + 1)
    with pytest.raises(NotImplementedError, match="C <= 8192"):
        diffit_kernels.adaln_norm(x, backend="triton")


# ---- plain CPU: the torch path, validation, backend choice -----------------------------------
def test_torch_backend_is_the_reference():
    x, res, mod = torch.randn(2, 3, 32), torch.randn(2, 3, 32), torch.randn(2, 96)
    sh, sc, g = mod.chunk(3, 1)
    y, h = diffit_kernels.adaln_norm(x, sh, sc, residual=res, gate=g, backend="torch")
    y_ref, h_ref = reference.adaln_norm(x, sh, sc, residual=res, gate=g)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(2, 3)), ValueError, r"x must have 3 dims"),
    (dict(x=torch.randn(2, 3, 4), shift=torch.randn(2, 5)), ValueError, r"shift must have shape \[2, 4\]"),
    (dict(x=torch.randn(2, 3, 4), scale=torch.randn(3, 4)), ValueError, r"scale must have shape"),
    (dict(x=torch.randn(2, 3, 4), residual=torch.randn(2, 3, 5)), ValueError, r"residual must have shape"),
    (dict(x=torch.randn(2, 3, 4), gate=torch.randn(2, 4)), ValueError, r"pass residual= too"),
    (dict(x=torch.randn(2, 3, 4), shift=torch.randn(2, 4).half()), TypeError, r"shift must have x's dtype torch.float32, got"),
    (dict(x=torch.randn(2, 3, 4), residual=torch.randn(2, 3, 4).half()), TypeError,
     r"residual must have x's dtype torch.float32 \(or be a float32 residual stream for a float16"),
    (dict(x=torch.randn(2, 3, 4).half(), residual=torch.randn(2, 3, 4).bfloat16()), TypeError,
     r"residual must have x's dtype torch.float16"),
    (dict(x=torch.randn(2, 3, 4).half(), residual=torch.randn(2, 3, 4),
          gate=torch.randn(2, 4).bfloat16()), TypeError,
     r"gate must have x's dtype torch.float16 or residual's torch.float32, got"),
    (dict(x=torch.randint(0, 3, (2, 3, 4))), TypeError, r"x must be float32, float16, bfloat16"),
    (dict(x=torch.randn(2, 3, 4), shift=torch.randn(2, 4, device="meta")), ValueError, r"shift must be on cpu"),
    (dict(x=torch.randn(2, 3, 4), activation="gelu"), ValueError, r"activation must be None or 'silu'"),
    (dict(x=[1.0, 2.0]), TypeError, r"x must be a torch.Tensor"),
], ids=["x-2d", "shift-shape", "scale-batch", "residual-shape", "gate-no-residual", "mixed-dtype",
        "residual-narrower", "residual-other-16bit", "gate-third-dtype",
        "int-dtype", "mixed-device", "activation", "not-a-tensor"])
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        diffit_kernels.adaln_norm(**kwargs, backend="torch")


def test_backward_rows_per_program_on_cuda_never_zero():
    # the CUDA branch of the backward's row split: the launcher computes P = cdiv(N, rows), so
    # rows = 0 at N = 0 was a ZeroDivisionError
    for B, N in [(2, 0), (0, 5), (1, 1), (3, 7), (1, 1000), (600, 1)]:
        for rows in (norm._bwd_rows_per_program(B, N, 132), norm._fwd_rows_per_program(B, N, 132)):
            assert rows >= 1 and (N - 1) // rows + 1 <= max(N, 1), (B, N, rows)


def test_plans_lists_every_plan_and_the_compile_report_builds_them():
    # plans() drives the interpreter test below and the compile report: compare it with the
    # launchers' choice at every width the kernels take
    picked = {(norm.fwd_plan(C), norm.bwd_plan(C)) for C in range(1, norm.MAX_C + 1)}
    assert picked == set(norm.plans())
    specs = [s for s in norm.aot_specs() if not s.spill_ok]  # the plans' own builds
    fwd = {(s.constexprs["BLOCK_C"], s.num_warps, s.constexprs["WIDE"]) for s in specs
           if s.kernel == "_adaln_norm_fwd_kernel"}
    bwd = {(s.constexprs["BLOCK_C"], s.constexprs["CHUNKED"], s.num_warps) for s in specs
           if s.kernel == "_adaln_norm_bwd_kernel"}
    assert fwd == {f for f, _ in norm.plans()} and bwd == {b for _, b in norm.plans()}


def test_triton_backend_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        diffit_kernels.adaln_norm(torch.randn(1, 2, 8), backend="triton")


def test_backend_env_variable(monkeypatch):
    monkeypatch.setenv("DIFFIT_KERNELS_BACKEND", "torch")
    x = torch.randn(1, 2, 8)
    assert torch.equal(diffit_kernels.adaln_norm(x), reference.adaln_norm(x))
    monkeypatch.setenv("DIFFIT_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="DIFFIT_KERNELS_BACKEND"):
        diffit_kernels.adaln_norm(x)
    with pytest.raises(ValueError, match="backend must be one of"):
        diffit_kernels.adaln_norm(x, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_cuda_parity_and_determinism(dtype):
    leaves, build, outs, grads = _case(4, 256, 1152, True, True, True, True, True)
    leaves = {k: v.cuda() for k, v in leaves.items()}
    rows = parity(diffit_kernels.adaln_norm, reference.adaln_norm, leaves, build, dtype=dtype,
                  out_names=outs, grad_leaves=grads, op_kwargs={"backend": "triton"})
    assert_parity(rows)


@pytest.mark.gpu
def test_gpu_calls_inside_a_cuda_graph_capture(monkeypatch):
    """torch.cuda.graph around forward + backward at DiffiT's width (C 1152: 16-bit rows have
    several autotune candidates) with no key tuned: after a warm-up that tunes nothing (it
    loads the kernels onto the card, which a capture cannot), the capture runs each launch's
    first candidate (the plan's) and builds no autotuner, so its replay is bitwise an eager
    call that takes the first candidates too (DIFFIT_KERNELS_AUTOTUNE=0)."""
    from diffit_kernels import _common

    monkeypatch.setattr(_common, "_TUNERS", {})

    def inputs(dtype):
        torch.manual_seed(0)
        x, res = (torch.randn(4, 256, 1152, device="cuda", dtype=dtype, requires_grad=True)
                  for _ in range(2))
        mod = torch.randn(4, 3 * 1152, device="cuda", dtype=dtype, requires_grad=True)
        return x, res, mod, torch.randn(4, 256, 1152, device="cuda", dtype=dtype)

    def step(x, res, mod, dy):
        shift, scale, gate = mod.chunk(3, dim=1)
        y, h = diffit_kernels.adaln_norm(x, shift=shift, scale=scale, residual=res, gate=gate,
                                         activation="silu", backend="triton")
        return (y, h) + torch.autograd.grad((y, h), (x, res, mod), (dy, dy))

    args = inputs(torch.bfloat16)
    captured, eager = untuned_capture(step, args, args)
    assert not _common._TUNERS
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_autotune_candidates_keep_the_plan_first_and_the_accumulating_backward_fixed():
    # the plan's (warps, one row ahead) leads: the interpreter's, the compile gate's spill-free
    # default, and what no card can do worse than; then two and three rows in flight, half /
    # twice the warps within 4..32; the chunked backward (partials accumulated across chunks)
    # and the 8192-wide forward are never re-launched by a tuner; rows narrower than
    # TUNE_MIN_BLOCK keep their plan (many small programs per SM), and so do float32 rows
    assert norm.candidates(16, True) == [(16, 1), (16, 2), (16, 3), (8, 1), (8, 2), (32, 1),
                                         (32, 2)]
    assert norm.candidates(2, True) == [(2, 1), (2, 2), (2, 3), (4, 1), (4, 2)]
    assert norm.candidates(1, True) == [(1, 1), (1, 2), (1, 3)]
    assert norm.candidates(32, True) == [(32, 1), (32, 2), (32, 3), (16, 1), (16, 2)]
    assert norm.candidates(16, False) == [(16, 1)]
    specs = norm.aot_specs()
    for (fwd, bwd), C in norm.plans().items():
        full_bf16 = [s for s in specs if s.config.startswith("bf16") and "res+gate" in s.config
                     and "fp32 residual" not in s.config]
        mine = [s for s in full_bf16 if (s.kernel, s.constexprs["BLOCK_C"]) in
                (("_adaln_norm_fwd_kernel", fwd[0]), ("_adaln_norm_bwd_kernel", bwd[0]))]
        built = {(s.kernel, s.num_warps, s.constexprs["AHEAD"]) for s in mine}
        want = {("_adaln_norm_fwd_kernel",) + c for c in norm.fwd_candidates(C)}
        want |= {("_adaln_norm_bwd_kernel",) + c for c in norm.bwd_candidates(C)}
        assert want <= built, (C, want - built)
        assert (len(norm.fwd_candidates(C)) > 1) == (fwd[0] >= norm.TUNE_MIN_BLOCK
                                                     and not fwd[2])
        assert (len(norm.bwd_candidates(C)) > 1) == (bwd[0] >= norm.TUNE_MIN_BLOCK
                                                     and not bwd[1])
    assert len(norm.fwd_candidates(1152)) == 7 and len(norm.bwd_candidates(1152)) == 7
    # float32 rows move twice the bytes per row in flight: their plan alone
    assert norm.fwd_candidates(1152, 4) == [(8, 1)] and norm.bwd_candidates(1152, 4) == [(16, 1)]


@pytest.mark.parametrize("why", ["autotune-off", "capturing", "capturing-tuned"])
def test_first_candidate_where_nothing_is_timed(monkeypatch, why):
    """DIFFIT_KERNELS_AUTOTUNE=0, or a key its autotuner has not tuned inside a CUDA graph
    capture (which cannot time it: Triton's benchmark synchronizes the device): a launch with
    several candidates runs the first (the plan's) directly, as the interpreter does, and
    builds no autotuner. A key tuned before a capture goes through its autotuner there."""
    from diffit_kernels import _common

    launched = []

    class Kernel:
        arg_names = ["X", "C"]
        fn = type("_stand_in_kernel", (), {})

        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, kw["num_warps"], kw["AHEAD"]))

    cfgs = norm.candidates(16, True)
    args = (torch.empty(2), 16)
    monkeypatch.setattr(norm, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_TUNERS", {})
    if why == "autotune-off":
        monkeypatch.setattr(_common, "AUTOTUNE", False)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    if why == "capturing-tuned":
        cache = {(16, "torch.float32"): cfgs[1]}    # Triton's key: C, then the tensors' dtypes
        _common._TUNERS[("_stand_in_kernel", tuple(cfgs))] = type("T", (), {"cache": cache})
        monkeypatch.setattr(norm, "launch_tuned", lambda *a: launched.append("tuner"))
    else:
        monkeypatch.setattr(norm, "launch_tuned", lambda *a: pytest.fail("autotuner built"))
    norm._launch(Kernel(), (4,), cfgs, ["C"], args, {})
    assert launched == (["tuner"] if why == "capturing-tuned" else [((4,), 16, 1)])


@pytest.mark.interpreter
@pytest.mark.parametrize("pick", range(7))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_every_autotune_candidate_of_diffits_width(pick, dtype):
    # each (warps, rows ahead) a card may pick at C = 1152 runs here. A one-SM card makes long
    # programs (forward 3 rows, backward 12, the last ones shorter: N = 23), so the two- and
    # three-deep prefetches rotate and run past a program's last rows (masked);
    # test_launch_plans_of_real_cards runs the first candidate at real cards' SM counts
    with norm._emulate_card(1, pick=pick):
        _run(dtype, 2, 23, 1152, True, True, True, True, True, strided_x=True)
        # the model's mix under autocast: a float32 residual stream, a 16-bit branch
        _run(dtype, 2, 23, 1152, True, True, True, True, True, keep_fp32=("res",))
