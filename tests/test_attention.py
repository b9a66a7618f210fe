"""tmsa_attention: the Triton kernels against the reference, forward and every gradient."""
import math

import pytest
import torch

import diffit_kernels
from diffit_kernels import _attention_aot as AA
from diffit_kernels import _attention_launch as AL
from diffit_kernels import _attention_plans as AP
from diffit_kernels import attention as A
from diffit_kernels import reference
from diffit_kernels.testing import assert_parity, parity, untuned_capture

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = lambda d: str(d)[6:]  # noqa: E731


@pytest.fixture(autouse=True)
def _untimed_plans(request, monkeypatch):
    """On a card the op tests run each shape's first backward plan untimed, as the interpreter
    does: each plan has tests of its own, and timing them all at every test shape would compile
    every plan's kernels there too (the GPU session's test stage has a time limit). The
    plan-choice test turns timing back on; the model and training tests keep it."""
    if "gpu" in request.keywords:
        monkeypatch.setattr(AP, "PLAN_TUNING", False)


def _case(B, H, N, D, *, grid=None, window=None, table=False, bias=None, packed=False):
    """float32 leaves and a builder. packed: q, k, v are strided views of one [B, N, 3, H, D]
    buffer, as time_qkv returns them."""
    leaves = {}
    if packed:
        leaves["qkv"] = torch.randn(B, N, 3, H, D)
    else:
        leaves.update(q=torch.randn(B, H, N, D), k=torch.randn(B, H, N, D),
                      v=torch.randn(B, H, N, D))
    if table:
        gh, gw = window or grid
        leaves["table"] = torch.randn((2 * gh - 1) * (2 * gw - 1), H)
    shapes = {"H": (H, N, N), "B": (B, H, N, N), "1H": (1, H, N, N), "B1": (B, 1, N, N),
              "NN": (N, N), "B11N": (B, 1, 1, N), "1HN1": (1, H, N, 1)}
    if bias is not None:
        leaves["bias"] = torch.randn(shapes[bias])

    def build(t):
        if packed:
            q, k, v = t["qkv"].permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = t["q"], t["k"], t["v"]
        return dict(q=q, k=k, v=v, table=t.get("table"), grid=grid, window=window,
                    bias=t.get("bias"))

    return leaves, build, list(leaves)


def _check(dtype, B, H, N, D, device="cpu", **kw):
    leaves, build, grads = _case(B, H, N, D, **kw)
    leaves = {n: t.to(device) for n, t in leaves.items()}
    rows = parity(diffit_kernels.tmsa_attention, reference.tmsa_attention, leaves, build,
                  dtype=dtype, out_names=("o",), grad_leaves=grads,
                  op_kwargs={"backend": "triton"})
    assert_parity(rows)
    assert {r.name for r in rows} == {"o"} | {"d" + g for g in grads}
    return rows


def _p(B, N, H, D, tag="", **kw):
    return pytest.param(B, N, H, D, kw, id=f"B{B}-N{N}-H{H}-D{D}" + (f"-{tag}" if tag else ""))


CASES = [
    # no bias: fused path (N <= 32) and the FlashAttention-2 path
    _p(1, 1, 2, 16, "plain"),
    _p(2, 17, 2, 40, "plain"),
    _p(1, 100, 2, 72, "plain"),
    # table, global attention over the whole grid
    _p(2, 64, 2, 72, "table-8x8", grid=(8, 8), table=True),
    _p(1, 100, 2, 16, "table-10x10", grid=(10, 10), table=True),
    _p(2, 17, 1, 40, "table-1x17", grid=(1, 17), table=True),
    _p(1, 1, 2, 16, "table-1x1", grid=(1, 1), table=True),
    # table, windows: packed small windows, and windows larger than the fused span
    _p(2, 64, 2, 40, "table-8x8-w2x2", grid=(8, 8), window=(2, 2), table=True),
    _p(1, 64, 2, 72, "table-8x8-w4x4", grid=(8, 8), window=(4, 4), table=True),
    _p(2, 24, 2, 16, "table-4x6-w2x3", grid=(4, 6), window=(2, 3), table=True),
    _p(1, 96, 1, 24, "table-8x12-w8x6", grid=(8, 12), window=(8, 6), table=True),
    _p(1, 64, 2, 16, "nobias-8x8-w4x4", grid=(8, 8), window=(4, 4)),
    # windows that fill whole tiles (EVEN: no row, key or window masks)
    _p(1, 128, 1, 40, "table-8x16-w8x8", grid=(8, 16), window=(8, 8), table=True),
    # dense bias
    _p(2, 17, 2, 16, "bias-HNN", bias="H"),
    _p(1, 100, 2, 40, "bias-HNN", bias="H"),
    _p(2, 17, 2, 72, "bias-BHNN", bias="B"),
    _p(2, 64, 1, 16, "bias-BHNN", bias="B"),
    # dense bias broadcast to [B, H, N, N] (stride 0, no copy); gradient in the bias's shape
    _p(3, 40, 2, 16, "bias-1HNN", bias="1H"),
    _p(2, 40, 2, 24, "bias-B1NN", bias="B1"),
    _p(2, 20, 2, 16, "bias-NN", bias="NN"),
    _p(2, 40, 1, 16, "bias-B11N", bias="B11N"),
    _p(2, 17, 2, 16, "bias-1HN1", bias="1HN1"),
    # d = 8 (the tiny presets' head dim): one 16-wide chunk, its upper half masked
    _p(2, 16, 2, 8, "table-4x4-w2x2", grid=(4, 4), window=(2, 2), table=True),
    _p(1, 64, 2, 8, "table-8x8", grid=(8, 8), table=True),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,N,H,D,kw", CASES)
def test_forward_and_gradients(B, N, H, D, kw, dtype):
    _check(dtype, B, H, N, D, **kw)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,N,H,D,kw", [
    _p(1, 64, 2, 72, "table-8x8-w4x4", grid=(8, 8), window=(4, 4), table=True),
    _p(2, 24, 1, 16, "table-4x6-w2x3", grid=(4, 6), window=(2, 3), table=True),
    _p(2, 17, 2, 16, "bias-HNN", bias="H"),
])
def test_windows_on_the_flash_path(B, N, H, D, kw, dtype, monkeypatch):
    """Spans the fused kernel would take, forced through the dK/dV + dQ + dbias kernels."""
    monkeypatch.setattr(AL, "FUSED_MAX_SPAN", 0)
    _check(dtype, B, H, N, D, **kw)


def _table_run(B, H, N, D, grid, dtype, card, slab_cap, monkeypatch, window=None):
    """Output, gradients (q, k, v, table) and launch log of one attention call with a table
    (global, or in windows)."""
    monkeypatch.setattr(A, "SLAB_MAX_BYTES", slab_cap)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D).to(dtype).requires_grad_() for _ in range(3))
    gh, gw = window or grid
    table = torch.randn((2 * gh - 1) * (2 * gw - 1), H, requires_grad=True)
    log = []
    elt, pick = card or (None, 0)
    with A._emulate_card(132, elt=elt, pick=pick, log=log):
        o = diffit_kernels.tmsa_attention(q, k, v, table=table, grid=grid, window=window,
                                          backend="triton")
        grads = torch.autograd.grad(o.float().square().sum(), (q, k, v, table))
    return (o,) + grads, log


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS)
@pytest.mark.parametrize("B,N,H,D,grid,card,ds_pass", [
    # grid widths 16 and 32 (powers of two >= 16 take the slabs); N not a multiple of the
    # blocks (masked tiles, whose tokens past N read token 0's entries) and a multiple
    pytest.param(2, 48, 2, 72, (3, 16), None, False, id="3x16"),
    pytest.param(2, 80, 2, 72, (5, 16), (2, 1), False, id="5x16-16bit-cfg-pick1"),
    pytest.param(1, 32, 2, 72, (1, 32), (2, 0), False, id="1x32"),
    pytest.param(2, 96, 1, 16, (3, 32), (4, 0), False, id="3x32-fp32-cfg"),
    pytest.param(1, 128, 1, 72, (4, 32), (2, 0), False, id="4x32-16bit-cfg"),
    pytest.param(2, 64, 1, 72, (4, 16), (2, 0), True, id="4x16-dbias-pass"),
])
def test_table_slabs_are_bitwise_the_gathered_table(B, N, H, D, grid, card, ds_pass, dtype,
                                                     monkeypatch):
    """Global attention on 16-bit inputs reads its table through per-head slabs of gw x gw
    matrices, one per relative grid row; grids past SLAB_MAX_BYTES, other widths (and
    float32) gather it per score element. The same float32 numbers reach the same sums:
    outputs and every gradient are bitwise equal (the dbias pass, which gathers from the
    [H, R] table beside the slab-reading dK/dV and dQ kernels, included)."""
    if ds_pass:
        monkeypatch.setattr(AP, "_DS_MAX_ELEMENTS", 0)
    slabs, log_s = _table_run(B, H, N, D, grid, dtype, card, A.SLAB_MAX_BYTES,
                              monkeypatch)
    gathered, log_g = _table_run(B, H, N, D, grid, dtype, card, 0, monkeypatch)
    assert sum(e[0] == "table-slab" for e in log_s) == 2   # forward and backward
    assert not any(e[0] == "table-slab" for e in log_g)
    assert any(e[0] == "dbias" for e in log_s) == ds_pass
    for name, a, b in zip(("o", "dq", "dk", "dv", "dtable"), slabs, gathered):
        assert torch.equal(a, b), name


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,card,window", [
    pytest.param(torch.float32, None, None, id="global-fp32-interpreter-cfg"),
    pytest.param(torch.float32, (4, 0), None, id="global-fp32-cfg"),
    *(pytest.param(torch.bfloat16, (2, pick), None, id=f"global-bf16-16bit-cfg-pick{pick}")
      for pick in range(4)),
    pytest.param(torch.float32, None, (8, 8), id="win8x8-fp32-interpreter-cfg"),
    pytest.param(torch.float32, (4, 0), (8, 8), id="win8x8-fp32-cfg"),
    *(pytest.param(torch.bfloat16, (2, pick), (8, 8), id=f"win8x8-bf16-16bit-cfg-pick{pick}")
      for pick in range(4)),
    # 4x4 windows: the forward's 16x16 tile is one whole window (the backward is the fused
    # kernel, which has no masks to drop)
    pytest.param(torch.bfloat16, (2, 3), (4, 4), id="win4x4-bf16-16bit-cfg-16x16"),
])
def test_even_tiles_are_bitwise_the_masked_kernels(dtype, card, window, monkeypatch):
    """Attention whose span (N, or a window) is a multiple of both blocks (DiffiT's latent
    grids, 8x8 windows) runs the forward, dK/dV and dQ kernels without row, key and window
    masks (EVEN); every output and gradient is bitwise what the masked kernels give, for the
    CUDA configs of d = 72 (the 16-bit lists with the most entries have four)."""
    B, H, N, D, grid = 2, 1, 128, 72, (8, 16)
    even, log_e = _table_run(B, H, N, D, grid, dtype, card, A.SLAB_MAX_BYTES,
                             monkeypatch, window)
    monkeypatch.setattr(AL, "_EVEN_OK", False)
    masked, log_m = _table_run(B, H, N, D, grid, dtype, card, A.SLAB_MAX_BYTES,
                               monkeypatch, window)
    ran = {e[1] for e in log_e if e[0] == "even"}
    want = ({"fwd", "dkdv-acc", "dq"} if window is None else {"fwd-win"} if window == (4, 4)
            else {"fwd-win", "dkdv-win-acc", "dq-win"})
    assert ran == want and not any(e[0] == "even" for e in log_m), ran
    for name, a, b in zip(("o", "dq", "dk", "dv", "dtable"), even, masked):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("grid,window", [((8, 12), (8, 6)), ((32, 32), (4, 4)), ((6, 6), (2, 3)),
                                         ((64, 64), (8, 8))])
def test_token_table_maps_virtual_tokens_as_the_reference_windows(grid, window):
    """The windowed kernels read row, relative code and window of each virtual token from
    _token_lut: window w's token t is the row of window_partition's order, and code differences
    give Swin's relative index; zero past N (tiles overhang the last window)."""
    from diffit_kernels._attention_index import LUT_PAD, _Geom

    (Gh, Gw), (gh, gw) = grid, window
    N, n = Gh * Gw, gh * gw
    geom = _Geom(N, (Gh, Gw, gh, gw))
    n_win, gw_arg, tok, n_lut = geom.args(torch.device("cpu"))
    assert (n_win, gw_arg) == (n, gw) and n_lut % 16 == 0 and n_lut >= N + LUT_PAD
    row, code, win = tok.long()
    # the window partition of a [Gh, Gw] grid, windows row-major, tokens row-major inside
    ref_rows = torch.arange(N).view(Gh // gh, gh, Gw // gw, gw).permute(0, 2, 1, 3).flatten()
    assert torch.equal(row[:N], ref_rows)
    assert torch.equal(win[:N], torch.arange(N) // n)
    rel = reference.relative_position_index(gh, gw)
    t = torch.arange(n)
    assert torch.equal(code[t][:, None] - code[t][None, :] + geom.rel_off, rel)
    assert not tok[:, N:].any()


@pytest.mark.interpreter
def test_global_attention_never_reads_its_token_table_placeholder():
    """Global attention computes its tokens and takes an uninitialised placeholder for the
    token table (no copy, so a CUDA graph capture can allocate it): poisoned, the forward and
    every gradient still match the reference."""
    from diffit_kernels import _attention_index as index

    index._cached_placeholder.cache_clear()
    index._cached_placeholder("cpu").fill_(-(2 ** 30))
    try:
        _check(torch.float32, 2, 2, 48, 24, grid=(6, 8), table=True)
        _check(torch.float32, 1, 2, 17, 16)
    finally:
        index._cached_placeholder.cache_clear()


def test_slab_promises_hold_for_every_config():
    """The slab load is unmasked and hinted (multiple_of / max_contiguous 16 along the keys):
    true only if every tile starts at a multiple of 16 (every block of a kernel that reads it
    a power of two >= 16) and the grid width is a power of two >= 16 (_slab_ok), so
    runs of 16 keys share a grid row. The interpreter ignores hints, so a config or grid
    breaking this would fail on a GPU only."""
    for (kind, has_bias, elt), (default, per_shape) in AL._CONFIG_TABLE.items():
        if has_bias or kind not in ("fwd", "dkdv", "dkdv-acc", "dq"):
            continue
        for cfg in [*default, *(c for cs in per_shape.values() for c in cs)]:
            for block in cfg[:2]:
                assert block >= 16 and block & (block - 1) == 0, (kind, elt, cfg)
    assert all(c[:2] == (32, 32) for k, c in AL._INTERP.items() if k in ("fwd", "dkdv", "dq"))
    table = torch.empty(63 * 63, 2)
    for gw in (4, 8, 24, 48):
        assert not A._slab_ok(table, A._Geom(32 * gw, (32, gw, 32, gw)), 32 * gw, 2), gw


def test_slab_size_limit():
    """Slabs of (2gh - 1) gw x gw fp32 per head: 63 x 32 x 32 x 4 B = 252 KiB per head at
    512 px (a dense [N, N] copy: 4 MiB), within the cap for 16 heads and up to 260."""
    geom = A._Geom(1024, (32, 32, 32, 32))
    table = torch.empty(63 * 63, 16)
    assert A._slab_ok(table, geom, 1024, 2)
    assert A._slab_ok(torch.empty(63 * 63, 260), geom, 1024, 2)
    assert not A._slab_ok(torch.empty(63 * 63, 261), geom, 1024, 2)
    assert not A._slab_ok(None, geom, 1024, 2)
    assert not A._slab_ok(table, geom, 1024, 4)      # float32 inputs gather
    assert not A._slab_ok(torch.empty(49, 16), A._Geom(64, (8, 8, 4, 4)), 64, 2)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,N,H,D,kw", [
    _p(2, 64, 2, 72, "table-8x8", grid=(8, 8), table=True),
    _p(1, 64, 2, 40, "table-8x8-w4x4", grid=(8, 8), window=(4, 4), table=True),
])
def test_packed_qkv_views_are_not_copied(B, N, H, D, kw, dtype):
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    for t in (q, k, v):
        assert not t.is_contiguous() and A._rows_aligned(t) is t
    _check(dtype, B, H, N, D, packed=True, **kw)


@pytest.mark.interpreter
@pytest.mark.parametrize("kw", [dict(grid=(8, 8)), dict(grid=(8, 8), window=(4, 4))],
                         ids=["global", "win4x4"])
def test_output_is_laid_out_so_the_head_merge_is_a_view(kw):
    """o [B, H, N, D] over [B, N, H, D] memory: the model's merge into [B, N, H * D] tokens is a
    view (no copy kernel), and the gradient coming back through it (dO over the same memory,
    as the projection's input gradient gives it) is read in place; both against the
    reference."""
    B, H, N, D = 2, 2, 64, 40
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    table = torch.randn(15 * 15 if "window" not in kw else 49, H, requires_grad=True)
    o = diffit_kernels.tmsa_attention(q, k, v, table=table, backend="triton", **kw)
    assert o.shape == (B, H, N, D) and o.stride() == (N * H * D, D, H * D, 1)
    merged = o.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == o.data_ptr() and merged.is_contiguous()
    dy = torch.randn(B, N, H * D)
    grads = torch.autograd.grad(merged, (q, k, v, table), dy)
    ref = reference.tmsa_attention(q, k, v, table=table, **kw)
    torch.testing.assert_close(o, ref, rtol=2e-4, atol=2e-5)
    want = torch.autograd.grad(ref.transpose(1, 2).reshape(B, N, H * D), (q, k, v, table), dy)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=5e-5)


@pytest.mark.interpreter
def test_non_unit_last_stride_is_copied_and_correct():
    B, H, N, D = 1, 2, 16, 16
    q, k, v = (torch.randn(B, H, D, N).transpose(-1, -2) for _ in range(3))
    assert A._rows_aligned(q) is not q
    o = diffit_kernels.tmsa_attention(q, k, v, backend="triton")
    torch.testing.assert_close(o, reference.tmsa_attention(q, k, v), rtol=2e-4, atol=2e-5)


def test_rows_past_32_bit_offsets_are_copied_or_refused():
    """The kernels address the rows of a (sample, head) with 32-bit offsets (row * row stride):
    a view whose rows span 2^31 elements is copied (a contiguous head spans N * D), and what no
    copy brings under it is a NotImplementedError naming the sizes, never an offset that wraps
    on a card. Meta tensors: shapes and strides only."""
    def meta(shape, stride=None):
        if stride is None:
            return torch.empty(shape, device="meta")
        return torch.empty_strided(shape, stride, device="meta")

    near = meta((1, 1, 3, 8), (0, 0, 2 ** 30 - 8, 1))         # rows end 16 short of 2^31
    assert A._rows_aligned(near) is near
    assert A._rows_aligned(meta((1, 1, 3, 8), (0, 0, 2 ** 30, 1))).stride() == (24, 24, 8, 1)
    # the [B, N, 3, H, D] gradient buffer: (N - 1) * 3 * 64 * 128 against 2^31
    assert A._within_i32(meta((1, 64, 87382, 128)), None) is None
    with pytest.raises(NotImplementedError, match="N=87383 .*H=64 x D=128"):
        A._within_i32(meta((1, 64, 87383, 128)), None)
    # a dense bias: one head's [N, N] spans N^2 - 1 elements once contiguous
    q = meta((2, 1, 46341, 8))
    with pytest.raises(NotImplementedError, match=r"N=46341 .*\(1, 46341, 46341\)"):
        A._within_i32(q, meta((1, 46341, 46341)))
    bias = meta((1, 46340, 46340))
    assert A._within_i32(q[:, :, :46340], bias) is bias
    # a view whose rows are 2^28 apart is copied; a broadcast bias is read at offset 0, but a
    # per-sample bias's gradient [B, H, N, N] is stored whole
    assert A._within_i32(meta((2, 2, 16, 8)), meta((2, 16, 16), (2 ** 29, 2 ** 28, 1))
                         ).stride() == (256, 16, 1)
    broadcast = meta((1, 1, 1, 1)).expand(1, 1, 46341, 46341)
    assert A._within_i32(q, broadcast) is broadcast
    with pytest.raises(NotImplementedError, match="per-sample"):
        A._within_i32(q, meta((1, 1, 1, 1)).expand(2, 1, 46341, 46341))


@pytest.mark.interpreter
@pytest.mark.parametrize("kw,N,plan", [
    pytest.param(dict(grid=(8, 8), table=True), 64, "shares", id="table-8x8-shares"),
    pytest.param(dict(grid=(8, 8), table=True), 64, "separate", id="table-8x8-separate"),
    pytest.param(dict(grid=(4, 8), window=(4, 4), table=True), 32, "separate",
                 id="table-4x8-w4x4-separate"),
    pytest.param(dict(bias="B"), 48, None, id="bias-BHNN"),
])
def test_batches_past_the_grid_limit_launch_in_runs(kw, N, plan, monkeypatch):
    """A card runs at most 65535 programs along a grid's y and z axes, the interpreter any
    number: with a program per (sample, head) on y, DiffiT-XL's 16 heads reach it at 4096
    samples (guided sampling at batch 2048). The launches then take the batch in runs that
    fit. Here the limit is lowered to 3 (the interpreter guard fails a launch past it) for 5
    samples of 2 heads: the forward and every gradient are bitwise the one-launch results, and
    a share per sample is not offered."""
    from diffit_kernels import _common

    B, H, D = 5, 2, 16

    def run():
        torch.manual_seed(0)
        leaves, build, names = _case(B, H, N, D, **kw)
        ts = {n: t.requires_grad_() for n, t in leaves.items()}
        o = diffit_kernels.tmsa_attention(**build(ts), backend="triton")
        o.backward(torch.randn(o.shape))
        return [o.detach()] + [ts[n].grad for n in names]

    if plan is not None:
        monkeypatch.setattr(AP, "BWD_PLAN", plan)
    whole = run()
    monkeypatch.setattr(_common, "GRID_YZ_MAX", 3)
    assert "samples" not in AP._plans_of(B, H, N, D, torch.float32, [8, 8], "cpu")
    assert _common.batch_slices(B, H) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    for a, b in zip(whole, run()):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="at most 3 programs along y and z"):  # the guard
        monkeypatch.setattr(A, "batch_slices", lambda B, per: [(0, B)])
        run()


def test_batch_slices_fit_the_grid_limit():
    from diffit_kernels._common import GRID_YZ_MAX, batch_slices

    assert batch_slices(4095, 16) == [(0, 4095)]              # DiffiT-XL's heads: one run
    assert batch_slices(4097, 16) == [(0, 4095), (4095, 4097)]
    assert batch_slices(70000, 1) == [(0, GRID_YZ_MAX), (GRID_YZ_MAX, 70000)]
    assert batch_slices(3, 70000) == [(0, 1), (1, 2), (2, 3)]  # one sample per run at least
    assert batch_slices(0, 16) == [(0, 0)]


@pytest.mark.interpreter
def test_sizes_past_32_bit_offsets_are_not_implemented():
    """The public function refuses before any launch (an expanded q: no memory behind it)."""
    q = torch.randn(1, 1, 1, 128).expand(1, 64, 87383, 128)
    with pytest.raises(NotImplementedError, match="N=87383"):
        diffit_kernels.tmsa_attention(q, q, q, backend="triton")


def _grads(kw, backend="triton", seed=0, dtype=torch.float32, device="cpu", **shape):
    torch.manual_seed(seed)
    B, H, N, D = shape["B"], shape["H"], shape["N"], shape["D"]
    leaves, build, names = _case(B, H, N, D, **kw)
    ts = {n: t.to(device, dtype).requires_grad_() for n, t in leaves.items()}
    o = diffit_kernels.tmsa_attention(**build(ts), backend=backend)
    o.backward(torch.randn(o.shape, dtype=dtype).to(device))
    return [ts[n].grad for n in names]


@pytest.mark.interpreter
@pytest.mark.parametrize("kw,N", [
    pytest.param(dict(grid=(8, 8), table=True), 64, id="table-8x8-flash"),
    pytest.param(dict(grid=(8, 8), window=(4, 4), table=True), 64, id="table-8x8-w4x4-fused"),
    pytest.param(dict(bias="H"), 20, id="bias-HNN-fused"),
])
def test_backward_is_bitwise_deterministic(kw, N):
    first = _grads(kw, B=2, H=2, N=N, D=16, dtype=torch.bfloat16)
    second = _grads(kw, B=2, H=2, N=N, D=16, dtype=torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS)
def test_extreme_logits_stay_finite(dtype):
    B, H, N, D = 1, 2, 64, 16
    q = (torch.randn(B, H, N, D) * 30).to(dtype).requires_grad_()
    k = (torch.randn(B, H, N, D) * 30).to(dtype).requires_grad_()
    v = torch.randn(B, H, N, D).to(dtype).requires_grad_()
    table = (torch.randn(225, H) * 1e4).to(dtype).requires_grad_()
    o = diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(8, 8), backend="triton")
    o.float().sum().backward()
    for t in (o, q.grad, k.grad, v.grad, table.grad):
        assert torch.isfinite(t).all()
    ref = reference.tmsa_attention(q.float(), k.float(), v.float(), table=table.float(),
                                   grid=(8, 8))
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float(), ref, rtol=0, atol=atol)


@pytest.mark.interpreter
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("window", [None, (5, 4)], ids=["global", "w5x4"])
def test_nan_input_propagates_without_hang(where, window):
    """Every output the reference makes NaN is NaN here too (global attention: exactly those).
    With windows packed in one tile, a NaN key/value may also reach a neighbouring window's
    rows through 0 * NaN in the tile's dot: finite inputs are unaffected."""
    B, H, N, D = 1, 1, 40, 16
    t = {n: torch.randn(B, H, N, D, requires_grad=True) for n in "qkv"}
    with torch.no_grad():
        t[where][0, 0, 5, 3] = float("nan")
    gh, gw = window or (5, 8)
    table = torch.randn((2 * gh - 1) * (2 * gw - 1), H, requires_grad=True)
    o = diffit_kernels.tmsa_attention(t["q"], t["k"], t["v"], table=table, grid=(5, 8),
                                      window=window, backend="triton")
    ref = reference.tmsa_attention(t["q"], t["k"], t["v"], table=table, grid=(5, 8),
                                   window=window)
    assert torch.isnan(ref).any() and not (torch.isnan(ref) & ~torch.isnan(o)).any()
    if window is None:
        assert torch.equal(torch.isnan(o), torch.isnan(ref))
    torch.testing.assert_close(o[~torch.isnan(o)], ref[~torch.isnan(o)], rtol=2e-4, atol=2e-5)
    o.sum().backward()
    assert torch.isnan(table.grad).any()


@pytest.mark.interpreter
def test_unsupported_head_dim_is_not_implemented():
    q = torch.randn(1, 1, 8, 20)
    with pytest.raises(NotImplementedError, match="D=20"):
        diffit_kernels.tmsa_attention(q, q, q, backend="triton")
    with pytest.raises(NotImplementedError, match="D=136"):
        q = torch.randn(1, 1, 8, 136)
        diffit_kernels.tmsa_attention(q, q, q, backend="triton")


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:Input #")
def test_opcheck():
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(49, 2, requires_grad=True)
    torch.library.opcheck(A._tmsa_attention_fwd_op, (q, k, v, table, None, [4, 4, 4, 4], 0.25,
                                                     True))
    bias = torch.randn(2, 16, 16, requires_grad=True)
    torch.library.opcheck(A._tmsa_attention_fwd_op, (q, k, v, None, bias, [], 0.25, True))
    # the backward op: one [B, N, 3, H, D] gradient buffer (shape and strides as its fake's)
    o, lse = A._tmsa_attention_fwd_op(q, k, v, table, None, [4, 4, 4, 4], 0.25, True)
    do = torch.randn_like(o)
    args = (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, table.detach(), None,
            [4, 4, 4, 4], 0.25, True, True)
    torch.library.opcheck(A._tmsa_attention_bwd_op, args)
    grads, dtable = A._tmsa_attention_bwd_op(*args)
    assert grads.shape == (3, 1, 2, 16, 16) and grads.is_contiguous()  # float32: unpacked
    assert dtable.shape == table.shape
    # 16-bit over a span past the fused kernel's (64 tokens): packed [B, N, 3, H, D]
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.bfloat16) for _ in range(3))
    table = torch.randn(225, 2)
    o, lse = A._tmsa_attention_fwd_op(q, k, v, table, None, [8, 8, 8, 8], 0.25, True)
    args = (torch.randn_like(o), q, k, v, o, lse, table, None, [8, 8, 8, 8], 0.25, True, True)
    torch.library.opcheck(A._tmsa_attention_bwd_op, args)
    grads, _ = A._tmsa_attention_bwd_op(*args)
    assert grads.shape == (1, 64, 3, 2, 16) and grads.is_contiguous()


@pytest.mark.interpreter
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compile_backend):
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(49, 2, requires_grad=True)

    def loss(q, k, v, table):
        o = diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(4, 4), backend="triton")
        return o.square().sum()

    out = torch.compile(loss, fullgraph=True, backend=compile_backend)(q, k, v, table)
    got = torch.autograd.grad(out, (q, k, v, table))
    ref_out = reference.tmsa_attention(q, k, v, table=table, grid=(4, 4)).square().sum()
    want = torch.autograd.grad(ref_out, (q, k, v, table))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5)


@pytest.mark.interpreter
def test_table_in_float32_with_half_inputs_gets_a_float32_gradient():
    q, k, v = (torch.randn(1, 2, 16, 16).half().requires_grad_() for _ in range(3))
    table = torch.randn(49, 2, requires_grad=True)
    o = diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(4, 4), backend="triton")
    o.float().sum().backward()
    ref = reference.tmsa_attention(q.float(), k.float(), v.float(), table=table, grid=(4, 4))
    assert table.grad.dtype == torch.float32 and o.dtype == torch.float16
    torch.testing.assert_close(o.float(), ref, rtol=0, atol=5e-3)


# ---- plain CPU tests: the torch backend and input validation ---------------------------------
def test_torch_backend_is_the_reference():
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    table = torch.randn(49, 2)
    got = diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(4, 4), backend="torch")
    assert torch.equal(got, reference.tmsa_attention(q, k, v, table=table, grid=(4, 4)))


def test_head_dim_split_pads_at_most_a_quarter():
    for D in A.HEAD_DIMS:
        D0, D1, has_d1 = AL._head_split(D)
        width = D0 + (D1 if has_d1 else 0)
        assert width >= D and ((width - D) <= 0.25 * width or width == 16), D
        assert D0 & (D0 - 1) == 0 and D1 & (D1 - 1) == 0 and D1 >= 16
    assert AL._head_split(72) == (64, 16, True)


def _qkv(B=1, H=2, N=16, D=16, **kw):
    return tuple(torch.randn(B, H, N, D, **kw) for _ in range(3))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(table=torch.randn(48, 2), grid=(4, 4)), ValueError, r"table must have shape \[49, 2\]"),
    (dict(table=torch.randn(49, 3), grid=(4, 4)), ValueError, r"table must have shape \[49, 2\]"),
    (dict(table=torch.randn(49, 2), grid=(4, 4), window=(2, 2)), ValueError,
     r"table must have shape \[9, 2\]"),
    (dict(table=torch.randn(49, 2), grid=(4, 5)), ValueError, "has 20 tokens but q has N=16"),
    (dict(table=torch.randn(49, 2), grid=(4, 4), window=(3, 2)), ValueError, "must divide grid"),
    (dict(table=torch.randn(49, 2)), ValueError, "need grid"),
    (dict(bias=torch.randn(2, 16, 15)), ValueError, "bias must have shape broadcastable"),
    (dict(bias=torch.randn(3, 2, 16, 16)), ValueError, r"broadcastable to \[B=1, H=2, N=16"),
    (dict(bias=torch.randn(1, 1, 2, 16, 16)), ValueError, "with 2 to 4 dims"),
    (dict(bias=torch.randn(2, 16, 16), table=torch.randn(49, 2), grid=(4, 4)), ValueError,
     "exclusive"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        diffit_kernels.tmsa_attention(*_qkv(), **kwargs)


def test_qkv_mismatch_errors_name_the_tensor():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k must have shape \[1, 2, 16, 16\]"):
        diffit_kernels.tmsa_attention(q, k[:, :, :8], v)
    with pytest.raises(TypeError, match="v must have dtype torch.float32"):
        diffit_kernels.tmsa_attention(q, k, v.half())
    with pytest.raises(ValueError, match="q must have 4 dims"):
        diffit_kernels.tmsa_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="device"):
        diffit_kernels.tmsa_attention(q, k.to("meta"), v)


def test_triton_backend_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the triton backend can run")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        diffit_kernels.tmsa_attention(*_qkv(), backend="triton")


def test_check_cases_and_aot_specs_are_listed():
    cases = A.check_cases(torch.device("cpu"))
    assert len(cases) >= 3 and all(c.op == "tmsa_attention" for c in cases)
    specs = A.aot_specs()
    kernels = {s.kernel for s in specs}
    # every kernel the module defines is built by the compile gate (the table's expansion
    # kernel was once left out)
    from triton.runtime import JITFunction

    defined = {n for n, f in vars(A._kernels).items()
               if n.startswith("_tmsa_attention") and isinstance(f, JITFunction)}
    assert len(defined) == 8 and kernels == defined
    labels = " ".join(s.config for s in specs)
    for dt in ("bf16", "fp16", "fp32"):
        assert dt in labels
    assert all(math.isfinite(s.num_warps) for s in specs)


# ---- on a CUDA GPU: DiffiT-sized shapes through the compiled kernels (autotuned) ------------
GPU_CASES = [
    _p(2, 256, 4, 72, "table-16x16", grid=(16, 16), table=True),
    _p(1, 1024, 2, 72, "table-32x32", grid=(32, 32), table=True),
    _p(1, 4096, 2, 72, "table-64x64-w8x8", grid=(64, 64), window=(8, 8), table=True),
    _p(2, 1024, 2, 72, "table-32x32-w4x4", grid=(32, 32), window=(4, 4), table=True),
    _p(2, 250, 2, 128, "table-10x25-w5x5", grid=(10, 25), window=(5, 5), table=True),
    _p(2, 300, 2, 40, "bias-HNN", bias="H"),
    _p(2, 200, 2, 88, "bias-BHNN", bias="B"),
    _p(2, 333, 2, 24, "plain"),
    # B 8 x H 16 at N 1024: 3 uneven batch shares of the dK/dV table partials on 132 SMs
    _p(8, 1024, 16, 72, "table-32x32-shares", grid=(32, 32), table=True),
    _p(3, 200, 2, 72, "bias-1HNN", bias="1H"),
    _p(2, 130, 2, 40, "bias-B1NN", bias="B1"),
    _p(4, 256, 4, 8, "table-16x16-w4x4", grid=(16, 16), window=(4, 4), table=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,N,H,D,kw", GPU_CASES)
def test_gpu_forward_and_gradients(B, N, H, D, kw, dtype):
    _check(dtype, B, H, N, D, device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("kw,N", [
    pytest.param(dict(grid=(32, 32), table=True), 1024, id="table-32x32"),
    pytest.param(dict(grid=(64, 64), window=(8, 8), table=True), 4096, id="table-64x64-w8x8"),
    pytest.param(dict(grid=(32, 32), window=(4, 4), table=True), 1024, id="table-32x32-w4x4"),
    pytest.param(dict(bias="H"), 256, id="bias-HNN"),
])
def test_gpu_backward_is_bitwise_deterministic(kw, N):
    first = _grads(kw, B=4, H=2, N=N, D=72, dtype=torch.bfloat16, device="cuda")
    second = _grads(kw, B=4, H=2, N=N, D=72, dtype=torch.bfloat16, device="cuda")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 72])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_wide_spans_fused_backward(dtype, D, monkeypatch):
    """The "wide" backward plan on the card (the tmsa-wide benchmark row): 8x8 and 6x6
    windows through the fused backward's 64-wide tile, every output and gradient against the
    reference, and bitwise repeatable."""
    monkeypatch.setattr(AP, "BWD_PLAN", "wide")
    _check(dtype, 2, 2, 256, D, device="cuda", grid=(16, 16), window=(8, 8), table=True)
    _check(dtype, 2, 2, 72, D, device="cuda", grid=(6, 12), window=(6, 6), table=True)
    kw = dict(grid=(16, 16), window=(8, 8), table=True)
    first = _grads(kw, B=4, H=2, N=256, D=D, dtype=dtype, device="cuda")
    second = _grads(kw, B=4, H=2, N=256, D=D, dtype=dtype, device="cuda")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_backward_plan_is_timed_once_and_kept(monkeypatch):
    """On the card the first backward of a shape times its plans (DiffiT-XL/2's 16 heads on its
    16x16 grid at B 32: shares, samples, separate on an H100 / H200), keeps one and records
    every plan's time; the next backward reuses it (bitwise the same gradients); every plan
    meets the reference."""
    from diffit_kernels import _common

    monkeypatch.setattr(AP, "PLAN_TUNING", True)
    monkeypatch.setattr(AP, "_PLAN_CHOICE", {})
    monkeypatch.setattr(_common, "_TUNED", [])
    kw, shape = dict(grid=(16, 16), table=True), dict(B=32, H=16, N=256, D=72)
    plans = AP._plans_of(32, 16, 256, 72, torch.bfloat16, [16, 16, 16, 16], "cuda")
    assert len(plans) > 1 and "separate" in plans, plans
    first = _grads(kw, dtype=torch.bfloat16, device="cuda", **shape)
    rec, = [r for r in _common.autotune_timings() if r["kind"] == "plan"]
    assert [p for p, _ in rec["candidates"]] == plans, rec
    assert all(0 < t < math.inf for _, t in rec["candidates"]), rec
    assert rec["best"] in AP._PLAN_CHOICE.values()
    second = _grads(kw, dtype=torch.bfloat16, device="cuda", **shape)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert len([r for r in _common.autotune_timings() if r["kind"] == "plan"]) == 1
    for plan in plans:
        monkeypatch.setattr(AP, "BWD_PLAN", plan)
        _check(torch.bfloat16, 32, 16, 256, 72, device="cuda", **kw)


@pytest.mark.gpu
def test_gpu_backward_plans_are_timed_inside_cuda_graph_regions(monkeypatch):
    """Training first calls the backward inside a compiled region replayed as CUDA graphs
    (torch.compile mode reduce-overhead, the trainer's default): the plans are timed in
    cudagraph trees' warm-up run, never during a capture, and the replays run the kept plan,
    bitwise the gradients of an eager call."""
    from diffit_kernels import _common

    monkeypatch.setattr(AP, "PLAN_TUNING", True)
    monkeypatch.setattr(AP, "_PLAN_CHOICE", {})
    monkeypatch.setattr(_common, "_TUNED", [])
    B, H, N, D = 4, 2, 256, 72
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    table = torch.randn(31 * 31, H, device="cuda", requires_grad=True)
    do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)

    def f(q, k, v, table):
        return diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(16, 16),
                                             backend="triton")

    torch._dynamo.reset()
    try:
        g = torch.compile(f, mode="reduce-overhead", fullgraph=True)
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            graphed = [t.clone() for t in torch.autograd.grad(g(q, k, v, table),
                                                               (q, k, v, table), do)]
    finally:
        torch._dynamo.reset()
    rec = [r for r in _common.autotune_timings() if r["kind"] == "plan"]
    assert len(rec) == 1 and all(0 < t < math.inf for _, t in rec[0]["candidates"]), rec
    eager = torch.autograd.grad(f(q, k, v, table), (q, k, v, table), do)
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_batch_past_the_grid_limit():
    """4097 samples of 16 heads: 65552 (sample, head) programs, past the 65535 a card allows
    along a grid's y axis (a launch past it fails inside Triton). The forward, delta and dQ
    launches take the batch in runs; every output and gradient against the reference."""
    _check(torch.bfloat16, 4097, 16, 16, 16, device="cuda", grid=(4, 4), table=True)


@pytest.mark.gpu
def test_gpu_calls_inside_a_cuda_graph_capture(monkeypatch):
    """torch.cuda.graph around forward + backward (8x8 windows, the U-Nets'): a geometry's
    first call inside the capture is refused before any launch (its index tables cannot be
    copied to the card there) and keeps nothing; after a warm-up that tunes nothing (it loads
    the kernels onto the card and builds the tables, which a capture cannot), a capture whose
    autotune keys no tuner has seen runs each list's first config the card can load and builds
    no autotuner, so its replay is bitwise an eager call under DIFFIT_KERNELS_AUTOTUNE=0."""
    from diffit_kernels import _attention_index as index
    from diffit_kernels import _common

    monkeypatch.setattr(_common, "_TUNERS", {})
    for cached in (index._token_lut, index._fused_bins, index._ds_table_plan, index._dbias_plan):
        cached.cache_clear()
    B, H, N, D = 2, 2, 256, 72
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    table = torch.randn(15 * 15, H, device="cuda", requires_grad=True)
    args = (q, k, v, table, torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16))

    def step(q, k, v, table, do):
        o = diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(16, 16), window=(8, 8),
                                          backend="triton")
        return (o,) + torch.autograd.grad(o, (q, k, v, table), do)

    with pytest.raises(RuntimeError, match="outside the capture with the same shapes first"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step(*args)
    assert index._token_lut.cache_info().currsize == 0
    captured, eager = untuned_capture(step, args, args)
    assert not _common._TUNERS
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_global_forward_of_a_new_grid_captures_at_its_first_call(monkeypatch):
    """Global attention's forward copies no index table to the card (its token-table argument
    is a placeholder it never reads): a grid first seen inside torch.cuda.graph is captured,
    given kernels already loaded by another grid of the same specialization (144 tokens as
    12x12, then as 16x9), and the replay is bitwise an eager call run the same untuned way."""
    from diffit_kernels import _common

    monkeypatch.setattr(_common, "_TUNERS", {})
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 144, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tables = {g: torch.randn((2 * g[0] - 1) * (2 * g[1] - 1), 3, device="cuda")
              for g in ((12, 12), (16, 9))}

    def step(grid):
        return (diffit_kernels.tmsa_attention(q, k, v, table=tables[grid], grid=grid,
                                              backend="triton"),)

    (o,), (eager,) = untuned_capture(step, ((16, 9),), ((12, 12),))
    assert torch.equal(o, eager)


# ---- GPU readiness: a few shipped configs compiled for sm_80 / sm_90a ----------------------
@pytest.mark.aot
def test_main_configs_compile_without_spills():
    from diffit_kernels._aot import compile_spec

    specs = [s for s in A.aot_specs() if s.config.startswith("bf16 D=72 table ")][:3]
    assert specs
    for spec in specs:
        for arch in (80, 90):
            row = compile_spec(spec, arch)
            assert not row.problems, (spec.kernel, spec.config, row.arch, row.problems)


def test_reference_index_is_built_on_the_device_under_torch_compile():
    # Dynamo traces through the per-device lru_cache: the compiled reference (the torch.compile
    # baseline) must build the index where the table lives, not on the CPU plus a copy per call.
    # Meta tensors stand in for a GPU: any CPU arange or device move shows in the graph.
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda q, t: reference.tmsa_attention(q, q, q, table=t, grid=(4, 6),
                                                            window=(2, 3)),
                      backend=capture, fullgraph=True)
    out = f(torch.randn(1, 2, 24, 8, device="meta"), torch.randn(15, 2, device="meta"))
    assert out.device.type == "meta"
    nodes = [n for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    aranges = [n for n in nodes if "arange" in str(n.target)]
    assert aranges and all(n.kwargs.get("device") == torch.device("meta") for n in aranges)
    moves = [n for n in nodes if str(n.target) == "to" and any(
        isinstance(a, (torch.device, str)) for a in list(n.args[1:]) + list(n.kwargs.values()))]
    assert not moves, [str(n.args) for n in moves]


# ---- the configs and launch plans of real cards, under the interpreter ---------------------
@pytest.mark.interpreter
@pytest.mark.parametrize("ds_pass", ["dbias-pass", "in-dkdv"])
def test_fp32_table_gradient_with_the_cuda_configs(ds_pass, monkeypatch):
    """Issue 12.1, found on an H200: the fp32 dbias tile at d 72-80 is 32x16, the only
    non-square one, and grouping the pairs of a tile diagonal into one slot assumed square
    tiles, so dS landed in the wrong table rows (the interpreter's own config hid it). The
    separate dbias pass now serves only spans too long for the dK/dV kernel's partials."""
    if ds_pass == "dbias-pass":
        monkeypatch.setattr(AP, "_DS_MAX_ELEMENTS", 0)
    log = []
    with A._emulate_card(132, elt=4, log=log):
        _check(torch.float32, 1, 1, 64, 72, grid=(8, 8), table=True)
    assert (("dbias", (32, 16, 4, 1)) in log) == (ds_pass == "dbias-pass")


# Every CUDA config-table entry (sm_80 and sm_90a share one table) runs under the interpreter
# with the tiles a GPU launches, in float32 (the interpreter's bf16 dot is wrong; the 16-bit
# entries keep their tile shapes), on the launch plans of real cards. The runs are derived from
# the table itself, so a config added to it is run here.
CARDS = (108, 132, 58, 128, 2)   # A100, H100/H200, L4, RTX 4090, a tiny count
_GEOMS = {  # name: (B, H, N, case kwargs, has_bias, kinds it launches)
    "table": (2, 1, 72, dict(grid=(8, 9), table=True), False, ("fwd", "dkdv-acc", "dq")),
    "plain": (2, 1, 72, dict(), False, ("fwd", "dkdv", "dq")),
    "table-dbias-pass": (2, 1, 72, dict(grid=(6, 12), table=True), False,
                         ("fwd", "dkdv", "dq", "dbias")),
    "table-win": (1, 2, 72, dict(grid=(6, 12), window=(6, 6), table=True), False,
                  ("fwd-win", "dkdv-win-acc", "dq-win")),
    "win": (1, 2, 72, dict(grid=(6, 12), window=(6, 6)), False, ("fwd-win", "dkdv-win", "dq-win")),
    "table-fused": (2, 1, 64, dict(grid=(8, 8), window=(4, 4), table=True), False,
                    ("fwd-win", "window")),
    "table-dbias-64": (2, 1, 72, dict(grid=(6, 12), table=True), False,
                       ("fwd", "dkdv", "dq", "dbias")),
    "bias": (2, 1, 72, dict(bias="H"), True, ("fwd", "dkdv", "dq", "dbias")),
    "bias-fused": (2, 2, 16, dict(bias="H"), True, ("fwd", "window")),
    # the "wide" plan: 6x6 windows (36 tokens, a masked 64 tile)
    "table-wide": (2, 1, 72, dict(grid=(6, 12), window=(6, 6), table=True), False,
                   ("fwd-win", "window-wide")),
}
# the library settings a geometry runs under ((attribute, value), ...): the table's pass of its
# own at its first tile (plan "separate"), at its second where the list has one ("separate-64")
_GEOM_SETTINGS = {"table-dbias-pass": (("_DS_MAX_ELEMENTS", 0),),
                  "table-dbias-64": (("_DS_MAX_ELEMENTS", 0), ("BWD_PLAN", "separate-64")),
                  "table-wide": (("BWD_PLAN", "wide"),)}


def _table_items():
    """(kind, dense bias, element size, chunk shape or "default", config) of every entry."""
    items = set()
    for (kind, has_bias, elt), (default, per_shape) in AL._CONFIG_TABLE.items():
        items |= {(kind, has_bias, elt, "default", c) for c in default}
        items |= {(kind, has_bias, elt, sh, c) for sh, cs in per_shape.items() for c in cs}
    return items


def _run_items(geom, elt, shape, pick):
    """The entries a run launches: each kind of the geometry takes its list's pick-th config,
    but the table's own pass the tile its plan names (the first; "separate-64": the second
    where the list has one)."""
    has_bias, kinds = _GEOMS[geom][4], _GEOMS[geom][5]
    out = set()
    for kind in kinds:
        if (kind, has_bias, elt) not in AL._CONFIG_TABLE:  # "window-wide": 16-bit only
            continue
        default, per_shape = AL._CONFIG_TABLE[(kind, has_bias, elt)]
        cfgs = per_shape.get(shape, default)
        if cfgs:
            i = pick % len(cfgs) if kind != "window" else 0   # the fused kernel: untuned
            if kind == "dbias":
                i = 1 if geom == "table-dbias-64" and len(cfgs) > 1 else 0
            out.add((kind, has_bias, elt, shape if shape in per_shape else "default", cfgs[i]))
    return out


_LONGEST = max(len(c) for d, p in AL._CONFIG_TABLE.values() for c in [d, *p.values()])


def _table_runs():
    """A short list of runs (greedy, d = 72 first) that launches every entry of the table."""
    todo, runs = _table_items(), []
    shapes = sorted(AA._SHAPE_D, key=lambda sh: (AA._SHAPE_D[sh] != 72, AA._SHAPE_D[sh]))
    for geom in _GEOMS:
        for elt in (2, 4):
            for shape in shapes:
                for pick in range(_LONGEST):
                    items = _run_items(geom, elt, shape, pick)
                    if items & todo:
                        todo -= items
                        runs.append((geom, elt, AA._SHAPE_D[shape], pick, items))
    return runs, todo


TABLE_RUNS, _UNRUN = _table_runs()


def test_every_cuda_config_is_run_under_the_interpreter():
    assert not _UNRUN, f"config-table entries no interpreter run launches: {sorted(_UNRUN)}"


@pytest.mark.interpreter
@pytest.mark.parametrize("geom,elt,D,pick,items", [
    pytest.param(*r, id=f"{r[0]}-{'16bit' if r[1] == 2 else 'fp32'}cfg-D{r[2]}-pick{r[3]}")
    for r in TABLE_RUNS])
def test_cuda_config_table_entry(geom, elt, D, pick, items, monkeypatch):
    B, H, N, kw, _, _ = _GEOMS[geom]
    for setting in _GEOM_SETTINGS.get(geom, ()):
        monkeypatch.setattr(AP, *setting)
    sms = CARDS[(D + pick + elt) % len(CARDS)]
    log = []
    with A._emulate_card(sms, elt=elt, pick=pick, log=log):
        _check(torch.float32, B, H, N, D, **kw)
    launched = {(entry[0], cfg) for entry in log for cfg in entry[1:]}
    for kind, _, _, _, cfg in items:
        assert (kind, cfg) in launched, (kind, cfg, sorted(launched))


@pytest.mark.interpreter
@pytest.mark.parametrize("sms", CARDS + (1,))
@pytest.mark.parametrize("kw,N", [
    pytest.param(dict(grid=(10, 10), table=True), 100, id="table-10x10"),
    pytest.param(dict(grid=(6, 12), window=(6, 6), table=True), 72, id="table-6x12-w6x6"),
    pytest.param(dict(bias="H"), 70, id="bias-HNN"),
])
def test_launch_plans_of_real_cards(sms, kw, N, monkeypatch):
    """The work splits sized from the SM count (dK/dV batch shares, dbias programs per head)
    with the 16-bit CUDA configs, B = 3 so shares can be uneven."""
    log = []
    with A._emulate_card(sms, elt=2, log=log):
        _check(torch.float32, 3, 2, N, 72, **kw)
    shares = [entry[1] for entry in log if entry[0] == "ds-shares"]
    if kw.get("table"):
        # (shares, samples per share), sized as on the card for its whole dK/dV list: ~4
        # programs per SM wanted. Global: the list's 128-key tile spans N = 100, so 2 heads x 1
        # key tile = 2 programs per sample: 2 shares (of 2 and 1 samples: uneven) on 1 SM, one
        # per sample on 2+. Windows of 36: 64-key tiles, 2 heads x 2 tiles = 4 programs per
        # sample: 1 share on 1 SM, 2 on 2, one per sample on more
        want = {1: (2, 2)} if "window" not in kw else {1: (1, 3), 2: (2, 2)}
        assert shares == [want.get(sms, (3, 1))], shares


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,N,D,kw", [
    pytest.param(2, 256, 64, dict(grid=(16, 16), window=(8, 8), table=True), id="w8x8-D64"),
    pytest.param(1, 72, 72, dict(grid=(6, 12), window=(6, 6), table=True), id="w6x6-D72"),
    pytest.param(1, 128, 64, dict(grid=(8, 16), window=(8, 8)), id="w8x8-nobias-D64"),
])
def test_wide_spans_take_the_fused_backward_when_asked(dtype, B, N, D, kw, monkeypatch):
    """The "wide" plan: 16-bit windows of 33-64 tokens take the fused backward, one window per
    64-wide tile with the "window-wide" config, on an H100's launch plan; every output and
    gradient meets the flash-attention rule. Untimed (no card to measure), the same spans run
    dK/dV and dQ."""
    monkeypatch.setattr(AP, "BWD_PLAN", "wide")
    log = []
    with A._emulate_card(132, elt=2, log=log):
        _check(dtype, B, 2, N, D, **kw)
        # dq, dk, dv in time_qkv's [B, N, 3, H, D] layout, as the dK/dV and dQ kernels write
        leaves, build, _ = _case(B, 2, N, D, **kw)
        t = {n: v.to(dtype).requires_grad_() for n, v in leaves.items()}
        o = diffit_kernels.tmsa_attention(**build(t), backend="triton")
        dq, dk, dv = torch.autograd.grad(o, (t["q"], t["k"], t["v"]), torch.ones_like(o))
    assert dq.stride() == (N * 3 * 2 * D, D, 3 * 2 * D, 1), dq.stride()
    assert dk.data_ptr() - dq.data_ptr() == 2 * D * dq.element_size()
    assert ("window-wide", (64, 64, 4, 1)) in log, log
    assert not any(e[0].startswith("dq") for e in log), log
    monkeypatch.setattr(AP, "BWD_PLAN", None)
    log = []
    with A._emulate_card(132, elt=2, log=log):
        _check(dtype, B, 2, N, D, **kw)
    assert not any(e[0].startswith("window") for e in log), log


@pytest.mark.interpreter
def test_wide_fused_backward_leaves_global_spans_alone(monkeypatch):
    """A global 8x8 grid (64 tokens, the U-Net's coarsest level) has no "wide" plan, so
    asking for it leaves dK/dV and dQ: the wide tile's global token arithmetic spills."""
    monkeypatch.setattr(AP, "BWD_PLAN", "wide")
    log = []
    with A._emulate_card(132, elt=2, log=log):
        _check(torch.bfloat16, 2, 2, 64, 64, grid=(8, 8), table=True)
    assert any(e[0].startswith("dq") for e in log), log
    assert not any(e[0].startswith("window") for e in log), log


@pytest.mark.interpreter
def test_one_share_per_sample_while_the_partials_fit(monkeypatch):
    """The "samples" plan: one batch share per sample (a single dK/dV launch of stores), offered
    while the fp32 partials of all of them fit SAMPLES_MAX_BYTES; past it only "shares" (the few
    shares of _batch_groups) remains. The gradients are the reference's either way."""
    B, H, N, D = 3, 2, 64, 16
    cfg = AL._INTERP["dkdv"]
    span_pad, tiles = AL._ds_layout(N, N, (cfg[:2],))
    size = H * B * tiles * span_pad * 4
    monkeypatch.setattr(AP, "BWD_PLAN", "samples")
    for limit, want in ((size - 1, (2, 2)), (size, (3, 1))):
        monkeypatch.setattr(AP, "SAMPLES_MAX_BYTES", limit)
        log = []
        with A._emulate_card(2, log=log):
            _check(torch.float32, B, H, N, D, grid=(8, 8), table=True)
        assert [e[1] for e in log if e[0] == "ds-shares"] == [want], (limit, log)


def test_autotune_off_takes_each_lists_first_config_that_fits(monkeypatch):
    """DIFFIT_KERNELS_AUTOTUNE=0: a kernel with several candidates launches its list's first
    config without building an autotuner, or, where the card cannot load it (Triton's
    OutOfResources at load, before it runs: e.g. d 64's 112 KB forward tile on a card with
    99 KB per block), the next; the index is remembered, so later calls go straight there."""
    from triton.runtime.errors import OutOfResources

    from diffit_kernels import _common

    tried = []

    class Kernel:
        arg_names = ["n_win", "EVEN"]
        fn = type("_stand_in_kernel", (), {})

        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **kw):
                tried.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
                if BLOCK_M == 128:
                    raise OutOfResources(114688, 101376, "shared memory")
            return launch

    monkeypatch.setattr(_common, "AUTOTUNE", False)
    monkeypatch.setattr(AL, "_FIRST_FIT", {})
    monkeypatch.setattr(AL, "launch_tuned", lambda *a: pytest.fail("an autotuner was built"))
    cfgs = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
    for _ in range(2):
        assert AL._launch(Kernel(), "fwd", cfgs, lambda bm, bn: (1,), (64,), {}) == (64, 64)
    assert tried == [cfgs[0], cfgs[1], cfgs[1]]
    tried.clear()
    assert AL._launch(Kernel(), "fwd", cfgs[1:], lambda bm, bn: (1,), (64,), {}) == (64, 64)
    assert tried == [cfgs[1]]                         # a list of its own: its own first fit
    with pytest.raises(OutOfResources):
        AL._launch(Kernel(), "fwd", [cfgs[0], cfgs[0]], lambda bm, bn: (1,), (64,), {})


@pytest.mark.parametrize("tuned", [False, True], ids=["untuned", "tuned-before"])
def test_capture_launches_the_first_fit_of_keys_not_yet_tuned(monkeypatch, tuned):
    """Inside a CUDA graph capture, which cannot time (Triton's benchmark synchronizes the
    device), a key the list's autotuner has not tuned launches the list's first config the
    card can load and builds no autotuner; a key tuned before the capture goes through its
    autotuner (Triton's key: the key arguments' values, then the tensors' dtypes)."""
    from diffit_kernels import _common

    tried = []

    class Kernel:
        arg_names = ["n_win", "N_BUCKET", "EVEN"]
        fn = type("_stand_in_kernel", (), {})

        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **kw):
                tried.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
            return launch

    class Tuner:
        cache = {(256,): None}
        best_config = type("Config", (), {"kwargs": {"BLOCK_M": 64, "BLOCK_N": 64}})

    cfgs = [(128, 64, 8, 3), (64, 64, 4, 3)]
    monkeypatch.setattr(AL, "_FIRST_FIT", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # no CUDA: never capturing
    assert not _common.untuned_while_capturing("k", Kernel(), ["N_BUCKET"], (256, 256), {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(_common, "_TUNERS", {})
    if tuned:
        flags = ("HAS_TABLE", "HAS_BIAS", "SLAB_TAB")
        _common._TUNERS[("_stand_in_kernel", "fwd", tuple(cfgs), flags)] = Tuner()
        monkeypatch.setattr(AL, "launch_tuned", lambda *a: tried.append("tuner") or Tuner())
    else:
        monkeypatch.setattr(AL, "launch_tuned", lambda *a: pytest.fail("an autotuner was built"))
    got = AL._launch(Kernel(), "fwd", cfgs, lambda bm, bn: (1,), (256, 256), {})
    assert tried == (["tuner"] if tuned else [cfgs[0]])
    assert got == ((64, 64) if tuned else (128, 64))


def test_index_tables_are_not_built_inside_a_capture(monkeypatch):
    """The per-geometry index tables copied to the card (the window token table, the
    table-gradient bins, the dbias pass's plan) cannot be made inside a CUDA graph capture:
    the copy would run only at replays, leaving the cached table unwritten outside the graph.
    A clear error, and nothing cached, so the same call outside the capture builds them."""
    from diffit_kernels import _attention_index as index

    index._token_lut.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="outside the capture with the same shapes first"):
        index._token_lut(64, 4, 4, 8, "cuda:0")
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        index._dbias_plan(16, 4, 2, 16, 16, True, 4, (4, 4), "cuda")
    assert index._token_lut.cache_info().currsize == 0
    assert index._token_lut(64, 4, 4, 8, "cpu").shape[0] == 3   # not a CUDA device


def _plans(B, N, D, geometry, elt=2, table=True, bias=False, sms=132, H=16):
    """The backward plans of a shape on a card of `sms` SMs, from the CUDA config lists (this
    is the plain process: no interpreter) for inputs of element size elt."""
    assert not AP.interpreting()
    with A._emulate_card(sms):
        return AP._bwd_plans(A._Geom(N, geometry), (*AL._head_split(D), elt, bias), B, H, N,
                             torch.device("cpu"), table)


def test_backward_plans_by_shape():
    """What each shape can take, the untimed default first: DiffiT-XL/2's global attention
    every dK/dV plan and, at d 72, the table pass on 64x64 tiles; 8x8 windows the wide fused
    tile too (16-bit only); 4x4 windows and dense biases one plan each; "samples" only where
    the shares hold several samples and the partials fit."""
    xl = [16, 16, 16, 16]
    assert _plans(32, 256, 72, xl) == ["shares", "samples", "separate", "separate-64"]
    assert _plans(32, 256, 72, xl, table=False) == ["separate"]   # no table gradient asked
    assert _plans(1, 256, 72, xl) == ["shares", "separate", "separate-64"]  # one share
    # 512 px: 16 heads x B 8 x 1024^2 fp32 partials are 512 MiB, the cap; B 9 is past it
    assert _plans(8, 1024, 72, [32, 32, 32, 32]) == ["shares", "samples", "separate",
                                                     "separate-64"]
    assert _plans(9, 1024, 72, [32, 32, 32, 32]) == ["shares", "separate", "separate-64"]
    win8 = [64, 64, 8, 8]
    assert _plans(16, 4096, 64, win8) == ["shares", "samples", "separate", "wide"]
    assert _plans(16, 4096, 72, win8) == ["shares", "samples", "separate", "separate-64",
                                          "wide"]
    assert _plans(16, 4096, 64, win8, table=False) == ["separate", "wide"]
    assert "wide" not in _plans(16, 4096, 64, win8, elt=4)
    assert "wide" not in _plans(2, 64, 64, [8, 8, 8, 8])              # global 8x8: spills
    assert _plans(64, 1024, 72, [32, 32, 4, 4]) == ["fused"]
    assert _plans(2, 256, 72, [], table=False, bias=True) == ["separate"]


def _stand_in_timer(monkeypatch, times: dict, misfit=None) -> list:
    """Plans timed as on a card, by a stand-in: each plan really runs (the interpreter) and
    takes times[plan] ms, or raises _misfit(misfit) for a plan not in times; fresh choices and
    record. Returns the list of the plans timed, in order."""
    from diffit_kernels import _common

    monkeypatch.setattr(AP, "_PLAN_CHOICE", {})
    monkeypatch.setattr(_common, "_TUNED", [])
    monkeypatch.setattr(AP, "_plan_tunable", lambda device: True)
    timed = []

    def fake_time(plan, run):
        timed.append(plan)
        run()
        if plan not in times:
            raise _misfit(misfit)
        return times[plan]

    monkeypatch.setattr(AP, "_time_plan", fake_time)
    return timed


def _misfit(kind):
    from triton.runtime.errors import OutOfResources

    return (torch.cuda.OutOfMemoryError("a stand-in") if kind == "oom"
            else OutOfResources(106496, 101376, "shared memory"))


@pytest.mark.interpreter
@pytest.mark.parametrize("misfit", ["oom", "out-of-resources"])
def test_backward_plan_is_chosen_by_its_time(misfit, monkeypatch):
    """Where plans are timed (CUDA), the first backward of a shape times each plan, runs and
    keeps the fastest (one out of memory, or with a kernel past the card's shared memory,
    counts as not fitting), records every plan's time for autotune.csv, and later backwards
    of the shape time nothing; BWD_PLAN still forces a plan. Here the timer is a stand-in
    around the plans' real runs (the interpreter)."""
    from diffit_kernels import _common

    timed = _stand_in_timer(monkeypatch, {"shares": 3.0, "separate": 1.0}, misfit)
    shape = (torch.float32, 3, 2, 64, 16)
    log = []
    with A._emulate_card(2, log=log):
        _check(*shape, grid=(8, 8), table=True)
    assert timed == ["shares", "samples", "separate"]
    assert [e[1] for e in log if e[0] == "plan"][-1] == "separate", log
    rec, = _common.autotune_timings()
    assert (rec["kernel"], rec["kind"], rec["best"]) == ("tmsa_attention backward", "plan",
                                                         "separate")
    assert rec["candidates"] == [("shares", 3.0), ("samples", math.inf), ("separate", 1.0)]
    assert rec["key"] == "B=3 H=2 N=64 D=16 float32 table window=global"
    timed.clear()
    log = []
    with A._emulate_card(2, log=log):
        _check(*shape, grid=(8, 8), table=True)
    assert timed == [] and [e[1] for e in log if e[0] == "plan"] == ["separate"], log
    monkeypatch.setattr(AP, "BWD_PLAN", "shares")
    log = []
    with A._emulate_card(2, log=log):
        _check(*shape, grid=(8, 8), table=True)
    assert timed == [] and [e[1] for e in log if e[0] == "plan"] == ["shares"], log
    assert len(_common.autotune_timings()) == 1


@pytest.mark.interpreter
def test_table_read_is_chosen_by_the_forwards_time(monkeypatch):
    """Global attention whose table the slabs can serve: the first forward of a shape times
    the slabs against the gather (bitwise the same numbers), keeps the faster for the forward
    and the backward, and records both times; TABLE_READ forces one. A stand-in timer around
    the interpreter's real runs, on an H100's 16-bit plan (a 16-wide grid)."""
    from diffit_kernels import _common

    timed = _stand_in_timer(monkeypatch, {"slabs": 2.0, "gather": 1.0})
    monkeypatch.setattr(AP, "BWD_PLAN", "shares")          # one backward plan: nothing else timed
    runs = {}
    for name in ("chosen", "again", "forced"):
        if name == "forced":
            monkeypatch.setattr(A, "TABLE_READ", "slabs")
        runs[name] = _table_run(2, 1, 64, 72, (4, 16), torch.bfloat16, (2, 0), A.SLAB_MAX_BYTES,
                                monkeypatch)
    assert timed == ["slabs", "gather"]
    # the timing's own slab run expands them once; the forward and backward after it gather
    assert sum(e[0] == "table-slab" for e in runs["chosen"][1]) == 1
    assert not any(e[0] == "table-slab" for e in runs["again"][1])
    assert sum(e[0] == "table-slab" for e in runs["forced"][1]) == 2   # forward and backward
    rec, = _common.autotune_timings()
    assert (rec["kernel"], rec["kind"], rec["best"]) == ("tmsa_attention table read", "table",
                                                         "gather")
    assert rec["candidates"] == [("slabs", 2.0), ("gather", 1.0)]
    for a, b in zip(runs["chosen"][0], runs["forced"][0]):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_plans_are_chosen_at_run_time_under_torch_compile(monkeypatch):
    """Inside a torch.compile region (training's regional compile; aot_eager here) the ops run
    on fake tensors while tracing and on real ones after: the plans are chosen at the first
    real backward, once, and the compiled gradients are bitwise an eager call's."""
    timed = _stand_in_timer(monkeypatch, {"shares": 2.0, "samples": 3.0, "separate": 1.0})
    B, H, N, D = 2, 2, 64, 16
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    table = torch.randn(15 * 15, H, requires_grad=True)
    do = torch.randn(B, H, N, D)

    def f(q, k, v, t):
        return diffit_kernels.tmsa_attention(q, k, v, table=t, grid=(8, 8), backend="triton")

    torch._dynamo.reset()
    try:
        g = torch.compile(f, backend="aot_eager", fullgraph=True)
        for _ in range(3):
            compiled = torch.autograd.grad(g(q, k, v, table), (q, k, v, table), do)
    finally:
        torch._dynamo.reset()
    assert timed == ["shares", "separate"] and list(AP._PLAN_CHOICE.values()) == ["separate"]
    eager = torch.autograd.grad(f(q, k, v, table), (q, k, v, table), do)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_a_plan_that_does_not_compile_is_left_out_with_a_warning(monkeypatch):
    """A Triton release that cannot build an offered plan's kernel: the plan is left out with a
    RuntimeWarning naming it; the first plan (what runs untimed) raises as it always would."""
    from triton.compiler.errors import CompilationError

    monkeypatch.setattr(AP, "_PLAN_CHOICE", {})
    monkeypatch.setattr(AP, "_plan_tunable", lambda device: True)
    class Broken(CompilationError):
        def __init__(self):
            Exception.__init__(self, "a stand-in")

        def __str__(self):
            return "a stand-in"

    broken = set()

    def fake_time(plan, run):
        if plan in broken:
            raise Broken()
        return {"shares": 2.0, "separate": 1.0, "wide": 0.5}[plan]

    monkeypatch.setattr(AP, "_time_plan", fake_time)
    monkeypatch.setattr(AP, "record_choice", lambda *a: None)
    key = (torch.device("cpu"), "k1")   # (a CUDA device key picks the device to time on)
    broken.add("wide")
    with pytest.warns(RuntimeWarning, match="plan 'wide' did not compile"):
        assert AP._choose_plan(["shares", "separate", "wide"], key, None, lambda: "") == \
            "separate"
    broken.add("shares")
    with pytest.raises(CompilationError):
        AP._choose_plan(["shares", "separate"], (torch.device("cpu"), "k2"), None, lambda: "")


def test_backward_plans_are_not_timed_off_cuda_or_while_capturing(monkeypatch):
    """No timing under the interpreter, on the CPU, with PLAN_TUNING off or
    DIFFIT_KERNELS_AUTOTUNE=0, or while a CUDA graph is being captured (its first plan runs,
    and nothing is kept)."""
    from diffit_kernels import _common

    assert not AP._plan_tunable(torch.device("cpu"))
    monkeypatch.setattr(AP, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not AP._plan_tunable(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert AP._plan_tunable(torch.device("cuda"))
    monkeypatch.setattr(AP, "PLAN_TUNING", False)
    assert not AP._plan_tunable(torch.device("cuda"))
    monkeypatch.setattr(AP, "PLAN_TUNING", True)
    monkeypatch.setattr(_common, "AUTOTUNE", False)      # DIFFIT_KERNELS_AUTOTUNE=0
    assert not AP._plan_tunable(torch.device("cuda"))
    monkeypatch.setattr(AP, "_PLAN_CHOICE", {})
    key = (torch.device("cuda"),)
    assert AP._choose_plan(["shares", "separate"], key, None, None) == "shares"
    assert AP._PLAN_CHOICE == {}
