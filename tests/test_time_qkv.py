"""time_qkv: the projection (LayerNorm + cuBLAS GEMM + time term) against the reference, every
output and all six gradients, every launch plan of its Triton row kernels."""
import pytest
import torch

import diffit_kernels
from diffit_kernels import projection, reference
from diffit_kernels.testing import assert_parity, nan_fill, parity

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRADS = ("x", "temb", "w", "b", "tw", "tb")


def _case(B, N, C, H, Ct=24, *, ln=True, temb=True, bias=True, temb_bias=True, strided_x=False,
          mean=0.0, std=1.0, CP=None):
    """float32 leaves and a builder; x optionally a channel slice of a wider buffer."""
    CP = CP or C
    leaves = {"x": torch.randn(B, N, C + (7 if strided_x else 0)) * std + mean,
              "w": torch.randn(3 * CP, C) / C ** 0.5}
    if bias:
        leaves["b"] = torch.randn(3 * CP) * 0.5
    if temb:
        leaves["temb"] = torch.randn(B, Ct)
        leaves["tw"] = torch.randn(3 * CP, Ct) / Ct ** 0.5
        if temb_bias:
            leaves["tb"] = torch.randn(3 * CP) * 0.5

    def build(t):
        return dict(x=t["x"][..., :C] if strided_x else t["x"], temb=t.get("temb"),
                    weight=t["w"], bias=t.get("b"), temb_weight=t.get("tw"),
                    temb_bias=t.get("tb"), num_heads=H, norm_eps=1e-6 if ln else None)

    return leaves, build, [g for g in GRADS if g in leaves]


def _run(dtype, *args, keep_fp32=(), **kw):
    leaves, build, grads = _case(*args, **kw)
    rows = parity(diffit_kernels.time_qkv, reference.time_qkv, leaves, build, dtype=dtype,
                  out_names=("q", "k", "v"), grad_leaves=grads, op_kwargs={"backend": "triton"},
                  keep_fp32=keep_fp32)
    assert_parity(rows)
    return rows


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("B,N,C,H", [(2, 9, 72, 2), (1, 5, 40, 4)], ids=["B2-C72", "B1-C40"])
def test_float32_x_under_16bit_weights(dtype, B, N, C, H):
    # autocast: LayerNorm reads the float32 residual stream and writes x-hat in weight's dtype;
    # q, k, v in weight's dtype, dx float32, the other gradients in weight's dtype
    _run(dtype, B, N, C, H, 12, keep_fp32=("x",))
    x = torch.randn(B, N, C, requires_grad=True)
    w = (torch.randn(3 * C, C) / C ** 0.5).to(dtype).requires_grad_()
    q, k, v = diffit_kernels.time_qkv(x, None, w, None, None, None, H, norm_eps=1e-6,
                                      backend="triton")
    assert q.dtype == dtype
    (q.float().sum() + k.float().sum() + v.float().sum()).backward()
    assert (x.grad.dtype, w.grad.dtype) == (torch.float32, dtype)


# (B, N, C, H, Ct, options): DiffiT's d = 72, odd widths, batch 1, N = 1, Ct != C, no biases,
# no time token, row counts that take the dW kernel's per-sample and flat row walks
SHAPES = [
    pytest.param(2, 20, 48, 2, 24, {}, id="B2-N20-C48-H2-ln"),
    pytest.param(2, 20, 48, 2, 24, {"ln": False}, id="B2-N20-C48-H2-noln"),
    pytest.param(1, 33, 144, 2, 40, {}, id="B1-N33-C144-H2-d72"),
    pytest.param(3, 1, 200, 4, 24, {"bias": False, "temb_bias": False}, id="B3-N1-C200-H4-nobias"),
    pytest.param(2, 32, 40, 4, 16, {"temb": False, "strided_x": True},
                 id="B2-N32-C40-H4-notemb-strided"),
    pytest.param(1, 130, 24, 3, 8, {"ln": False, "strided_x": True}, id="B1-N130-C24-H3-strided"),
    pytest.param(2, 64, 64, 4, 24, {"CP": 32}, id="B2-N64-C64-CP32-H4"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,N,C,H,Ct,opts", SHAPES)
def test_outputs_and_all_six_gradients(B, N, C, H, Ct, opts, dtype):
    _run(dtype, B, N, C, H, Ct, **opts)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cols", [True, False], ids=["time-columns", "broadcast-init"])
def test_both_ways_of_adding_the_time_term(monkeypatch, dtype, cols):
    # up to TIME_COLS_MAX samples the time term rides the GEMM as one-hot columns of its operand
    # (written by the LayerNorm row kernel, padded to a multiple of 8); more samples take the
    # broadcast init + beta = 1 GEMM: both against the reference, B = 3 and 9 (a pad of 5 / 7)
    if not cols:
        monkeypatch.setattr(projection, "TIME_COLS_MAX", {2: 2, 4: 2})
    for B, C in ((3, 40), (9, 72)):
        log = []
        with projection._record_launches(log):
            _run(dtype, B, 6, C, 2, 12)
        pad = -(-(C + B) // 8) * 8 - C  # columns after C, and their power-of-two tile
        want = [("time_cols", (pad, 1 << (pad - 1).bit_length()))]
        assert [e for e in log if e[0] == "time_cols"] == (want if cols else []), log


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_time_columns_per_group_of_samples(monkeypatch, dtype):
    # past TIME_GROUP samples the one-hot columns go per group (one batched GEMM, each group
    # against its own [W | cb_g^T]): B 15 in groups of 5 (3 groups), B 12 of 6; a prime B 7
    # has no divisor in range and stays one group of 7 columns
    monkeypatch.setattr(projection, "TIME_GROUP", 6)
    monkeypatch.setattr(projection, "TIME_GROUP_MIN", 4)
    for B, C, groups in ((15, 40, (3, 5)), (12, 72, (2, 6)), (7, 24, None)):
        log = []
        with projection._record_launches(log):
            _run(dtype, B, 5, C, 2, 12)
        G = groups[1] if groups else B
        pad = -(-(C + G) // 8) * 8 - C
        assert [e for e in log if e[0] in ("time_cols", "time_groups")] == (
            [("time_cols", (pad, 1 << (pad - 1).bit_length()))]
            + ([("time_groups", groups)] if groups else [])), log
    # the op's fake (what torch.compile traces) gives the grouped operand's width too
    leaves, build, _ = _case(15, 5, 40, 2)
    kw = build(leaves)
    torch.library.opcheck(projection._time_qkv_fwd_op,
                          tuple(kw[k].to(dtype) for k in ("x", "temb", "weight", "bias",
                                                          "temb_weight", "temb_bias")) + (2, 1e-6))


def test_time_columns_choice():
    # (G, width) at DiffiT-XL's C = 1152: one group up to 32 samples, then groups of the
    # largest divisor in [8, 32], else one group up to TIME_COLS_MAX (16-bit) / none
    bf, f32 = torch.bfloat16, torch.float32
    cols = projection._time_columns
    assert cols(32, 1152, bf, True, True) == (32, 1184)
    assert cols(256, 1152, bf, True, True) == (32, 1184)
    assert cols(40, 1152, bf, True, True) == (20, 1176)
    assert cols(74, 1152, bf, True, True) == (74, 1232)       # 2 x 37: no divisor in range
    assert cols(74, 1152, f32, True, True) == (0, 1152)       # and past float32's 32 columns
    assert cols(512, 1152, bf, True, True) == (32, 1184)
    assert cols(1, 1152, bf, True, True) == (1, 1160)
    assert cols(64, 1152, bf, False, True) == (0, 1152)       # no time term
    assert cols(64, 1152, bf, True, False) == (0, 1152)       # no LayerNorm: no row kernel


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_rows_with_a_large_mean_keep_layernorm_precision(dtype):
    # |mean| / std = 50: the fold subtracts mean * colsum(W) from x W^T; fp32 sums shifted by
    # x[m, 0] (statistics) and fp32 accumulation keep it within the numerics rule
    _run(dtype, 2, 17, 96, 2, 24, mean=50.0, std=1.0)


@pytest.mark.interpreter
def test_near_constant_rows_far_from_zero():
    # bf16 rows of mean 2000 are constant after rounding (std 0, rstd = 1/sqrt(eps)): the MMA
    # runs on x - x[m, 0], exactly 0 there, so the output is the bias + time term as in eager
    _run(torch.bfloat16, 2, 17, 96, 2, 24, mean=2000.0, std=1.0)
    _run(torch.float16, 2, 17, 96, 2, 24, mean=2000.0, std=1.0)
    # fp32: the kernel tracks a float64 evaluation more closely than the fp32 reference does
    leaves, build, _ = _case(2, 17, 96, 2, 24, mean=2000.0, std=1.0)
    out = diffit_kernels.time_qkv(**build(leaves), backend="triton")
    exact = reference.time_qkv(**build({k: v.double() for k, v in leaves.items()}))
    for o, e in zip(out, exact):
        assert (o.double() - e).abs().max().item() <= 2e-5 * e.abs().max().item()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_layernorm_backward_over_row_chunks(monkeypatch, dtype):
    # rows wider than LN_BLOCK_C are walked in chunks (forward: mean, variance, xhat; backward:
    # sums, then dx); a 32-wide chunk makes that three chunks of 16 rows per program
    monkeypatch.setattr(projection, "LN_BLOCK_C", 32)
    _run(dtype, 2, 9, 72, 2, 16)


@pytest.mark.interpreter
def test_diffit_xl_heads_fp32():
    # C = 1152, 16 heads of d = 72 (column tiles of the dY pack straddle heads), a few rows
    _run(torch.float32, 1, 3, 1152, 16, 32)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("plan,C", list(projection.row_plans().items()),
                         ids=lambda p: "x".join(map(str, p)) if isinstance(p, tuple) else f"C{p}")
def test_every_row_plan_a_gpu_can_take(plan, C, dtype):
    # the LayerNorm row kernels take the same plan on CUDA and here: each one the launcher
    # can pick runs, forward and backward (a narrow C' keeps the weight small at wide C)
    log = []
    with projection._record_launches(log):
        _run(dtype, 2, 5, C, 2, 8, CP=16)
    assert ("ln_fwd", plan) in log and ("ln_bwd", plan) in log


def test_row_plans_lists_every_plan_the_launcher_picks():
    # row_plans() drives the test above and the compile report: a plan it missed would ship
    # unrun, so compare it with the launcher's choice at every width up to three chunks
    picked = {projection._row_plan(C) for C in range(1, 3 * projection.LN_BLOCK_C + 2)}
    assert picked == set(projection.row_plans())
    for plan, C in projection.row_plans().items():
        rows, block, chunked, warps = plan
        assert projection._row_plan(C) == plan and rows * block <= projection.ROW_TILE
        assert chunked == (C > block) and 1 <= warps <= 16


@pytest.mark.interpreter
def test_qkv_are_views_of_one_buffer_that_tmsa_attention_takes_as_they_are():
    leaves, build, _ = _case(2, 5, 64, 4)
    q, k, v = diffit_kernels.time_qkv(**build(leaves), backend="triton")
    assert q.shape == k.shape == v.shape == (2, 4, 5, 16)
    # one [B, N, 3C'] buffer: q | k | v side by side in every token row
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() \
        == v.untyped_storage().data_ptr()
    step = 64 * q.element_size()
    assert k.data_ptr() - q.data_ptr() == step and v.data_ptr() - k.data_ptr() == step
    for t in (q, k, v):  # unit last stride: attention's launchers copy nothing
        assert t.stride() == (5 * 192, 16, 192, 1)
    # the same layout as the reference's views, so the two backends are interchangeable
    ref = reference.time_qkv(**build(leaves))
    assert [t.stride() for t in ref] == [t.stride() for t in (q, k, v)]
    if hasattr(diffit_kernels, "tmsa_attention"):
        o = diffit_kernels.tmsa_attention(q, k, v, backend="triton")
        torch.testing.assert_close(o, reference.tmsa_attention(q, k, v), rtol=1e-4, atol=1e-4)


def _assert_backward_repeats_bitwise(leaves, build, grads, dys):
    """Two backward passes from fresh copies of the leaves give bit-identical gradients."""
    def run():
        ls = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        q, k, v = diffit_kernels.time_qkv(**build(ls), backend="triton")
        return torch.autograd.grad([q, k, v], [ls[g] for g in grads], list(dys))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_backward_is_deterministic_and_does_not_stack_the_head_gradients(monkeypatch):
    leaves, build, grads = _case(2, 32, 48, 2)
    seen = []
    real = projection._time_qkv_bwd

    def spy(dq, dk, dv, *a):
        seen.append((dq.data_ptr(), dk.data_ptr(), dv.data_ptr()))
        return real(dq, dk, dv, *a)

    monkeypatch.setattr(projection, "_time_qkv_bwd", spy)
    gq, gk, gv = (torch.randn(2, 2, 32, 24) for _ in range(3))

    _assert_backward_repeats_bitwise(leaves, build, grads, (gq, gk, gv))
    # the incoming gradients reach the backward as the caller's own tensors
    assert seen[0] == (gq.data_ptr(), gk.data_ptr(), gv.data_ptr())


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["packed", "separate-strided"])
def test_head_gradients_are_read_in_place_when_packed_else_packed_once(layout):
    # dq | dk | dv as the head-split views of one [B, N, 3C'] buffer are dY itself (no copy:
    # the pack kernel only sums); separate, strided gradients are packed by it once
    B, N, C, H = 2, 70, 48, 4
    leaves, build, grads = _case(B, N, C, H)
    if layout == "packed":
        dys = projection._split_heads(torch.randn(B, N, 3 * C), H)
    else:
        dys = [torch.randn(B, N, H, C // H).transpose(1, 2) for _ in range(3)]
    ls = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    log = []
    with projection._record_launches(log), nan_fill():
        out = diffit_kernels.time_qkv(**build(ls), backend="triton")
        got = torch.autograd.grad(out, [ls[g] for g in grads], list(dys))
    assert [p[3] for k, p in log if k == "pack"] == [layout != "packed"]
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    want = torch.autograd.grad(reference.time_qkv(**build(ref)), [ref[g] for g in grads],
                               list(dys))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_partial_requires_grad():
    leaves, build, _ = _case(2, 16, 32, 2)
    for wanted in (["x"], ["w"], ["temb"], ["b", "tb"]):
        ls = {k: v.clone().requires_grad_(k in wanted) for k, v in leaves.items()}
        ref = {k: v.clone().requires_grad_(k in wanted) for k, v in leaves.items()}
        out = diffit_kernels.time_qkv(**build(ls), backend="triton")
        exp = reference.time_qkv(**build(ref))
        dy = [torch.randn_like(o) for o in out]
        got = torch.autograd.grad(out, [ls[k] for k in wanted], dy)
        want = torch.autograd.grad(exp, [ref[k] for k in wanted], dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
@pytest.mark.parametrize("through_data", [False, True], ids=["no_grad", "dot-data"])
def test_in_place_weight_update_is_seen_by_the_folded_layernorm(through_data):
    # writes through .data bypass the version counter: the fold's row sums of W must not be
    # cached on it, or the next call is silently wrong
    leaves, build, _ = _case(1, 6, 32, 2, temb=False)
    kw = build(leaves)
    first = diffit_kernels.time_qkv(**kw, backend="triton")
    with torch.no_grad():
        w = kw["weight"].data if through_data else kw["weight"]
        w.mul_(-2.0).add_(0.1)
    second = diffit_kernels.time_qkv(**kw, backend="triton")
    for a, b in zip(second, reference.time_qkv(**kw)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first[0], second[0])


@pytest.mark.interpreter
def test_nan_in_a_row_stays_in_that_row():
    leaves, build, _ = _case(2, 4, 32, 2)
    leaves["x"][1, 2, 5] = float("nan")
    with nan_fill():
        q, k, v = diffit_kernels.time_qkv(**build(leaves), backend="triton")
    for t in (q, k, v):
        assert torch.isnan(t[1, :, 2]).all()
        mask = torch.ones(2, 4, dtype=torch.bool)
        mask[1, 2] = False
        assert torch.isfinite(t.permute(0, 2, 1, 3)[mask]).all()


@pytest.mark.interpreter
def test_empty_token_set():
    leaves, build, _ = _case(2, 0, 16, 2)
    q, k, v = diffit_kernels.time_qkv(**build(leaves), backend="triton")
    assert q.shape == (2, 2, 0, 8)


@pytest.mark.interpreter
def test_op_level_autograd_matches_the_public_path():
    # torch.ops.diffit_kernels.time_qkv_fwd carries its own autograd ([B, N, 3C'] gradient)
    leaves, build, grads = _case(2, 8, 32, 2)
    kw = build({k: v.clone().requires_grad_() for k, v in leaves.items()})
    qkv, _, _, _ = torch.ops.diffit_kernels.time_qkv_fwd(
        kw["x"], kw["temb"], kw["weight"], kw["bias"], kw["temb_weight"], kw["temb_bias"], 2, 1e-6)
    dy = torch.randn_like(qkv)
    ins = [kw[k] for k in ("x", "temb", "weight", "bias", "temb_weight", "temb_bias")]
    got = torch.autograd.grad(qkv, ins, dy)
    kw2 = build({k: v.clone().requires_grad_() for k, v in leaves.items()})
    out = diffit_kernels.time_qkv(**kw2, backend="triton")
    ins2 = [kw2[k] for k in ("x", "temb", "weight", "bias", "temb_weight", "temb_bias")]
    want = torch.autograd.grad(out, ins2, list(projection._split_heads(dy, 2)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.interpreter
def test_opcheck_forward_and_backward_ops():
    leaves, build, _ = _case(2, 5, 32, 2)
    kw = build({k: v.clone().requires_grad_() for k, v in leaves.items()})
    args = (kw["x"], kw["temb"], kw["weight"], kw["bias"], kw["temb_weight"], kw["temb_bias"],
            2, 1e-6)
    torch.library.opcheck(projection._time_qkv_fwd_op, args)
    torch.library.opcheck(projection._time_qkv_fwd_op,
                          (kw["x"], None, kw["weight"], None, None, None, 4, None))
    # autocast's mix (what torch.compile traces in the blocks): a float32 x, bf16 weights
    b16 = {k: (v.detach().bfloat16().requires_grad_() if torch.is_tensor(v) and k != "x" else v)
           for k, v in kw.items()}
    torch.library.opcheck(projection._time_qkv_fwd_op,
                          (kw["x"], b16["temb"], b16["weight"], b16["bias"], b16["temb_weight"],
                           b16["temb_bias"], 2, 1e-6))
    qkv, xhat, mean, rstd = projection._time_qkv_fwd_op(
        *(a.detach() if torch.is_tensor(a) else a for a in args))
    dq, dk, dv = projection._split_heads(torch.randn_like(qkv), 2)  # strided views
    torch.library.opcheck(projection._time_qkv_bwd_op,
                          (dq, dk.contiguous(), dv, kw["x"].detach(), xhat,
                           kw["weight"].detach(), mean, rstd, True, True, True))
    torch.library.opcheck(projection._time_qkv_bwd_op,
                          (dq, dk, dv, kw["x"].detach(), xhat, kw["weight"].detach(), mean,
                           rstd, True, True, True))


@pytest.mark.interpreter
def test_torch_compile_fullgraph_forward_backward():
    leaves, build, grads = _case(2, 6, 32, 2)

    def f(**kw):
        q, k, v = diffit_kernels.time_qkv(**kw, backend="triton")
        return (q * k).sum() + v.square().sum()

    ls = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(**build(ls))
    g_c = torch.autograd.grad(loss_c, [ls[g] for g in grads])
    loss_e = f(**build(ls))
    g_e = torch.autograd.grad(loss_e, [ls[g] for g in grads])
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.interpreter
def test_float64_is_refused_by_the_kernel_with_a_pointer_to_the_torch_backend():
    x, w = torch.randn(1, 2, 8, dtype=torch.float64), torch.randn(24, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        diffit_kernels.time_qkv(x, None, w, None, None, None, 2, backend="triton")


# ---- plain CPU: the torch path, validation -------------------------------------------------
def test_torch_backend_is_the_reference():
    leaves, build, _ = _case(2, 3, 16, 2)
    for a, b in zip(diffit_kernels.time_qkv(**build(leaves), backend="torch"),
                    reference.time_qkv(**build(leaves))):
        assert torch.equal(a, b)


def _bad(**over):
    kw = dict(x=torch.randn(2, 3, 8), temb=torch.randn(2, 5), weight=torch.randn(24, 8),
              bias=torch.randn(24), temb_weight=torch.randn(24, 5), temb_bias=torch.randn(24),
              num_heads=2)
    kw.update(over)
    return kw


@pytest.mark.parametrize("kwargs,exc,match", [
    (_bad(x=torch.randn(2, 8)), ValueError, r"x must have 3 dims"),
    (_bad(weight=torch.randn(24, 9)), ValueError, r"weight must have shape \[3\*C', C=8\]"),
    (_bad(weight=torch.randn(25, 8)), ValueError, r"weight must have shape \[3\*C', C=8\]"),
    (_bad(num_heads=3), ValueError, r"num_heads=3 must divide C'=8"),
    (_bad(num_heads=0), ValueError, r"num_heads must be a positive int"),
    (_bad(num_heads=2.0), ValueError, r"num_heads must be a positive int"),
    (_bad(bias=torch.randn(23)), ValueError, r"bias must have shape \[24\]"),
    (_bad(temb=torch.randn(3, 5)), ValueError, r"temb must have shape \[B=2, Ct\]"),
    (_bad(temb_weight=torch.randn(24, 6)), ValueError, r"temb_weight must have shape \[24, 5\]"),
    (_bad(temb_weight=None), ValueError, r"temb needs temb_weight"),
    (_bad(temb=None), ValueError, r"temb_weight / temb_bias given without temb"),
    (_bad(temb_bias=torch.randn(12)), ValueError, r"temb_bias must have shape \[24\]"),
    (_bad(weight=torch.randn(24, 8).half()), TypeError,
     r"weight must have x's dtype torch.float32 \(or be float16 / bfloat16 for a float32 x with "
     r"norm_eps"),
    (dict(_bad(x=torch.randn(2, 3, 8).half()), norm_eps=1e-6), TypeError,
     r"weight must have x's dtype torch.float16"),
    (_bad(temb=torch.randn(2, 5).bfloat16()), TypeError, r"temb must have dtype torch.float32"),
    (dict(_bad(weight=torch.randn(24, 8).half(), bias=torch.randn(24).half(),
               temb_weight=torch.randn(24, 5).half(), temb_bias=torch.randn(24).half()),
          norm_eps=1e-6), TypeError, r"temb must have dtype torch.float16"),
    (_bad(bias=torch.randn(24, device="meta")), ValueError, r"bias must be on cpu"),
    (_bad(weight=torch.randn(24, 8, device="meta")), ValueError, r"weight must be on cpu"),
    (_bad(x=torch.randint(0, 3, (2, 3, 8))), TypeError, r"x must be float32, float16, bfloat16"),
    (_bad(x=[1.0]), TypeError, r"x must be a torch.Tensor"),
    (dict(_bad(), norm_eps=-1.0), ValueError, r"norm_eps must be None or a non-negative float"),
], ids=["x-2d", "weight-C", "weight-not-3C", "heads-divide", "heads-zero", "heads-float",
        "bias-shape", "temb-batch", "temb-weight-Ct", "temb-without-weight",
        "weight-without-temb", "temb-bias-shape", "weight-dtype", "weight-16bit-x-other",
        "temb-dtype", "temb-not-weights-dtype", "bias-device",
        "weight-device", "x-int", "x-list", "eps-negative"])
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    for backend in ("torch", "auto"):
        with pytest.raises(exc, match=match):
            diffit_kernels.time_qkv(**kwargs, backend=backend)


def test_triton_backend_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        diffit_kernels.time_qkv(**_bad(), backend="triton")


def test_gradcheck_reference_fp64():
    def f(x, temb, w, b, tw, tb):
        return reference.time_qkv(x, temb, w, b, tw, tb, 2, norm_eps=1e-5)

    inputs = tuple(t.double().requires_grad_() for t in
                   (torch.randn(2, 3, 8), torch.randn(2, 5), torch.randn(24, 8), torch.randn(24),
                    torch.randn(24, 5), torch.randn(24)))
    assert torch.autograd.gradcheck(f, inputs)


def test_no_launch_plan_depends_on_the_card():
    # the GEMMs are cuBLAS's and the Triton row / pack kernels take fixed plans, so there is no
    # SM-count split to emulate here (adaln_norm and tmsa_attention have one); a plan that
    # starts asking for the SM count must bring its card tests along
    import inspect

    assert "sm_count" not in inspect.getsource(projection)


def test_aot_specs_and_check_cases_cover_the_kernels():
    specs = projection.aot_specs()
    kernels = {s.kernel for s in specs}
    assert kernels == {"_time_qkv_ln_fwd_kernel", "_time_qkv_bwd_kernel_pack",
                       "_time_qkv_bwd_kernel_ln"}
    # the compile report builds every row plan the launcher can pick, both pack modes
    for name in ("_time_qkv_ln_fwd_kernel", "_time_qkv_bwd_kernel_ln"):
        got = {(s.constexprs["ROWS"], s.constexprs["BLOCK_C"], s.constexprs["CHUNKED"],
                s.num_warps) for s in specs if s.kernel == name}
        assert got == set(projection.row_plans())
    assert {s.constexprs["STORE"] for s in specs
            if s.kernel == "_time_qkv_bwd_kernel_pack"} == {True, False}
    labels = [s.config for s in specs]
    assert len(labels) == len(set((s.kernel, s.config) for s in specs))
    cases = projection.check_cases(torch.device("cpu"))
    assert cases and all(c.op == "time_qkv" for c in cases)


# ---- on a CUDA GPU: DiffiT-XL/2's projection through the compiled, autotuned kernels --------
GPU_CASES = [
    pytest.param(4, 256, 1152, 16, 1152, {}, id="xl256-ln"),
    pytest.param(2, 1024, 1152, 16, 1152, {"ln": False}, id="xl512-noln"),
    pytest.param(3, 250, 200, 4, 24, {"strided_x": True}, id="B3-N250-C200-strided"),
    pytest.param(2, 333, 384, 6, 384, {"mean": 50.0}, id="B2-N333-C384-mean50"),
    pytest.param(40, 64, 256, 4, 64, {}, id="B40-groups-of-20"),  # the batched time columns
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,N,C,H,Ct,opts", GPU_CASES)
def test_gpu_outputs_and_all_six_gradients(B, N, C, H, Ct, opts, dtype):
    leaves, build, grads = _case(B, N, C, H, Ct, **opts)
    leaves = {k: v.cuda() for k, v in leaves.items()}
    rows = parity(diffit_kernels.time_qkv, reference.time_qkv, leaves, build, dtype=dtype,
                  out_names=("q", "k", "v"), grad_leaves=grads, op_kwargs={"backend": "triton"})
    assert_parity(rows)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic():
    leaves, build, grads = _case(4, 256, 1152, 16, 1152)
    leaves = {k: v.cuda().bfloat16() for k, v in leaves.items()}
    gq, gk, gv = (torch.randn(4, 16, 256, 72, device="cuda", dtype=torch.bfloat16)
                  for _ in range(3))

    _assert_backward_repeats_bitwise(leaves, build, grads, (gq, gk, gv))


@pytest.mark.gpu
def test_gpu_packed_and_separate_head_gradients_agree_bitwise():
    # dq | dk | dv as views of one buffer are read in place, separate ones are packed first:
    # the same dY reaches the same cuBLAS GEMMs, so every gradient is bit-identical
    leaves, build, grads = _case(4, 256, 1152, 16, 1152)
    leaves = {k: v.cuda().bfloat16() for k, v in leaves.items()}
    dy = torch.randn(4, 256, 3 * 1152, device="cuda", dtype=torch.bfloat16)
    packed = projection._split_heads(dy, 16)
    separate = [t.contiguous() for t in packed]

    def run(dys):
        ls = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        out = diffit_kernels.time_qkv(**build(ls), backend="triton")
        return torch.autograd.grad(out, [ls[g] for g in grads], list(dys))

    for a, b in zip(run(packed), run(separate)):
        assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
def test_attention_gradients_reach_the_projection_packed(compile_backend):
    """tmsa_attention's backward writes 16-bit dq, dk, dv of spans past the fused kernel's into
    one [B, N, 3, H, D] buffer, the layout of time_qkv's output: time_qkv's backward takes them
    as one [M, 3C'] matrix and its pack kernel only sums (no copy of dY), eager and compiled
    alike."""
    torch.manual_seed(0)
    B, N, C, H, Ct = 2, 64, 64, 4, 32  # 64 tokens: past the fused kernel's spans
    bf = dict(dtype=torch.bfloat16)  # 16-bit: the packed layout (float32 stays unpacked)
    x = torch.randn(B, N, C, **bf, requires_grad=True)
    temb = torch.randn(B, Ct, **bf)
    w = (torch.randn(3 * C, C, **bf) * 0.05).requires_grad_()
    bias = torch.zeros(3 * C, **bf, requires_grad=True)
    tw = (torch.randn(3 * C, Ct, **bf) * 0.05).requires_grad_()
    tb = torch.zeros(3 * C, **bf, requires_grad=True)
    table = torch.randn(225, H, requires_grad=True)
    seen = {}

    def block(x):
        q, k, v = diffit_kernels.time_qkv(x, temb, w, bias, tw, tb, H, norm_eps=1e-6,
                                          backend="triton")
        if compile_backend is None:  # hooks see the eager autograd graph's tensors
            for name, t in zip("qkv", (q, k, v)):
                t.register_hook(lambda g, name=name: seen.__setitem__(name, g))
        return diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(8, 8),
                                             backend="triton")

    fn = block if compile_backend is None else torch.compile(block, backend=compile_backend,
                                                             fullgraph=True)
    log = []
    with projection._record_launches(log):
        fn(x).sum().backward()
    assert [plan[-1] for kernel, plan in log if kernel == "pack"] == [False], log
    if compile_backend is None:
        dq, dk, dv = seen["q"], seen["k"], seen["v"]
        assert dq.untyped_storage().data_ptr() == dv.untyped_storage().data_ptr()
        assert dq.shape == (B, H, N, C // H) and dq.stride() == (N * 3 * C, C // H, 3 * C, 1)
        assert dk.data_ptr() - dq.data_ptr() == C * dq.element_size()
