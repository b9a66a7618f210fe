"""A model's own calls of the ops, recorded and checked against the reference
(diffit_kernels.testing.record_calls / check_call): what the training and sampling commands'
kernel check (diffit.accel.check_kernels) runs on the card at the run's shapes."""
import pytest
import torch

import diffit_kernels
from diffit_kernels import _common, attention, testing


def _attention_inputs(dtype=torch.float32, grad=True):
    """q, k, v as head-split views of one packed [B, N, 3, H, D] buffer, as a model passes
    them, and a float32 table."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 16, 3, 2, 8, generator=g).to(dtype).requires_grad_(grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    table = torch.randn(7 * 7, 2, generator=g).requires_grad_(grad)
    return q, k, v, table


def test_record_calls_keeps_each_distinct_call_once_with_its_layout():
    """The first call of each (op, tensor shapes, strides, dtypes, requires_grad, other
    arguments) is kept, with copies of its inputs in their own strides (views of a packed
    buffer stay strided); repeats are dropped; outside the with-block nothing is recorded."""
    q, k, v, table = _attention_inputs()
    x = torch.randn(2, 16, 8)
    with testing.record_calls() as calls:
        for _ in range(3):  # a repeated block: one record
            diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(4, 4), backend="torch")
        diffit_kernels.tmsa_attention(q, k, v, table=table[:9], grid=(4, 4), window=(2, 2),
                                      backend="torch")
        diffit_kernels.adaln_norm(x, activation="silu", backend="torch")
        diffit_kernels.adaln_norm(x.detach(), backend="torch")
    diffit_kernels.adaln_norm(x, backend="torch")
    assert [c.op for c in calls] == ["tmsa_attention", "tmsa_attention", "adaln_norm",
                                     "adaln_norm"]
    glob = calls[0]
    assert glob.tensors["q"].stride() == q.stride() != q.contiguous().stride()
    assert torch.equal(glob.tensors["q"], q.detach()) and not glob.tensors["q"].requires_grad
    assert glob.tensors["q"].data_ptr() != q.data_ptr()  # a copy: later writes cannot reach it
    assert glob.grads == ("q", "k", "v", "table") and glob.outputs == 1
    assert glob.others["grid"] == (4, 4) and glob.others["window"] is None
    assert glob.others["backend"] == "torch" and glob.others["bias"] is None
    assert calls[1].others["window"] == (2, 2)
    assert calls[2].grads == () and calls[2].others["activation"] == "silu"
    assert calls[3].others["activation"] is None
    label = glob.label()
    assert label.startswith("q [2, 2, 16, 8] float32 strides (768, 8, 48, 1), k [2, 2, 16, 8] ")
    assert "table [49, 2] float32, grid=(4, 4)" in label and "backend" not in label
    assert _common._CALL_RECORDER is None


def test_record_calls_skips_what_torch_compile_traces():
    """Under torch.compile the ops' Python runs on fake tensors while tracing: not recorded."""
    x = torch.randn(2, 5, 8)

    def f(t):
        return diffit_kernels.adaln_norm(t, activation="silu", backend="torch") * 2

    with testing.record_calls() as calls:
        torch.compile(f, backend="eager", fullgraph=True)(x)
    assert calls == []


def test_check_call_rows_name_each_output_and_gradient():
    """check_call on a recorded call (the reference against itself under backend torch: every
    error is eager float32's own, against the float64 truth) gives a row per output and per
    gradient the call needed."""
    q, k, v, table = _attention_inputs()
    with testing.record_calls() as calls:
        diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(4, 4), backend="torch")
        diffit_kernels.time_qkv(torch.randn(2, 4, 8), None, torch.randn(24, 8), None, None,
                                None, 2, backend="torch")
    rows = testing.check_call(calls[0])
    assert [r.name for r in rows] == ["o", "dq", "dk", "dv", "dtable"]
    assert all(r.ok and r.err == r.pt_err for r in rows)
    assert [r.name for r in testing.check_call(calls[1])] == ["q", "k", "v"]


def test_recorded_broadcast_views_keep_their_zero_strides():
    """A dense bias shared by the batch handed over as a broadcast view (stride 0 along the
    batch) is recorded and re-created as one: the same strides, and the check runs."""
    q, k, v, _ = _attention_inputs()
    bias = torch.randn(1, 2, 16, 16, requires_grad=True).expand(2, 2, 16, 16)
    with testing.record_calls() as calls:
        diffit_kernels.tmsa_attention(q, k, v, bias=bias, backend="torch")
    got = calls[0].tensors["bias"]
    assert got.stride() == bias.stride() == (0, 256, 16, 1) and torch.equal(got, bias)
    rows = testing.check_call(calls[0])
    assert [r.name for r in rows] == ["o", "dq", "dk", "dv", "dbias"] and all(r.ok for r in rows)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_call_runs_the_kernels_on_the_recorded_layout(dtype):
    """Under the interpreter: a recorded call of the Triton path passes the rule in float32
    and bfloat16 with its float32 table kept float32 (as the model passes it), and the
    kernels see the recorded strides (a forward that copied strided q into a contiguous
    buffer would still pass; here the kernel is handed q's own strides)."""
    q, k, v, table = _attention_inputs(dtype)
    with testing.record_calls() as calls:
        diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(4, 4), backend="triton")
    seen = []
    real = attention._tmsa_attention_fwd

    def spy(q_, *args):
        seen.append(q_.stride())
        return real(q_, *args)

    attention._tmsa_attention_fwd = spy
    try:
        rows = testing.check_call(calls[0])
    finally:
        attention._tmsa_attention_fwd = real
    testing.assert_parity(rows)
    assert [r.dtype for r in rows] == [str(dtype).split(".")[-1]] * 5
    assert seen == [q.stride()]


def test_check_command_needs_somewhere_our_kernels_run(capsys):
    """`python -m diffit check` on a CPU without the interpreter: a usage error naming why."""
    from diffit import cli

    assert cli.main(["check", "--model", "DiffiT-tiny", "--image-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffit check: error: the forward with our kernels failed: "
                          "backend='triton' cannot run on tensors on ['cpu']"), err
    assert cli.main(["check", "--model", "DiffiT-tiny", "--batch-size", "0"]) == 2


@pytest.mark.interpreter
@pytest.mark.parametrize("model", ["DiffiT-tiny", "tiny"])
def test_check_command_tables_every_call(model, capsys):
    """`python -m diffit check` on the latent and the image-space model: every distinct call
    of our ops gets its rows (outputs and gradients), all within the rule, exit status 0."""
    from diffit import cli

    args = ["check", "--model", model, "--batch-size", "2"]
    assert cli.main(args + (["--image-size", "64"] if model == "DiffiT-tiny" else [])) == 0
    out = capsys.readouterr().out
    calls = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert {ln.split(":")[0].split()[1] for ln in calls} >= {"tmsa_attention", "time_qkv"}
    assert out.splitlines()[0].startswith(f"diffit check: randomly initialised {model}, 2 "
                                          "samples of ")
    assert f"{len(calls)} distinct calls of our ops" in out.splitlines()[0]
    assert "  dq " in out and "  dtable " in out and "FAIL" not in out
    assert out.rstrip().endswith("every output and gradient within the numerics rule")


@pytest.mark.interpreter
def test_check_command_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A Triton attention whose output is doubled: its rows fail, exit status 1."""
    from diffit import cli

    real = attention._tmsa_attention_fwd
    monkeypatch.setattr(attention, "_tmsa_attention_fwd",
                        lambda *a: (lambda o, lse: (o * 2, lse))(*real(*a)))
    assert cli.main(["check", "--model", "DiffiT-tiny", "--image-size", "64",
                     "--batch-size", "1", "--forward-only"]) == 1
    out = capsys.readouterr().out
    bad = [ln.split()[0] for ln in out.splitlines() if ln.endswith("FAIL")]
    assert bad == ["o"] and "  dq " not in out, out
    assert "our kernels compute the wrong thing here; please report it" in out


@pytest.mark.interpreter
def test_check_command_takes_a_checkpoint(tmp_path, capsys):
    """`--checkpoint` as `sample` takes it: a DiffiT state dict, its weights and sizes used
    (the header names the checkpoint; the calls carry its latent grid)."""
    from diffit import cli
    from diffit.checkpoint import save_state_dict
    from diffit.latent import DiffiT

    sd = DiffiT.from_preset("DiffiT-tiny", input_size=16).state_dict()
    save_state_dict(sd, tmp_path / "tiny.safetensors")
    assert cli.main(["check", "--checkpoint", str(tmp_path / "tiny.safetensors"),
                     "--batch-size", "1", "--forward-only", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert "tiny.safetensors" in head and "1 samples of 16x16, fp32, forward on cpu" in head, out
    assert "grid=(8, 8)" in out and "  dq " not in out


def _several_variants(heads: int):
    """(the recorded calls, the (read, plan) pairs) of a 16-bit Triton attention call on a
    3 x 16 grid with a table: past the fused kernel's span, so its backward has several plans,
    and 16 wide, so the table is read from slabs or gathered."""
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(1, heads, 48, 16, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    table = (torch.randn(5 * 31, heads, generator=g) * 0.5).requires_grad_()
    with testing.record_calls() as calls:
        diffit_kernels.tmsa_attention(q, k, v, table=table, grid=(3, 16), backend="triton")
    return calls, attention.call_variants(q, k, v, table=table, grid=(3, 16))


@pytest.mark.interpreter
def test_check_call_runs_every_table_read_and_backward_plan(monkeypatch):
    """every_variant: an attention call on a 16-wide grid (16-bit: the table's slabs or its
    gather) past the fused kernel's span, whose backward has several plans, is checked once
    per (read, plan), each forced as named in its rows; the op's own choice afterwards is
    untouched."""
    calls, pairs = _several_variants(heads=2)
    assert len(pairs) >= 4 and {r for r, _ in pairs} == {"slabs", "gather"}
    ran = []
    real_fwd, real_bwd = attention._fwd_run, attention._bwd_run
    monkeypatch.setattr(attention, "_fwd_run", lambda *a: ran.append(("fwd", a[-1]))
                        or real_fwd(*a))
    monkeypatch.setattr(attention, "_bwd_run", lambda plan, *a: ran.append(("bwd", plan))
                        or real_bwd(plan, *a))
    rows = testing.check_call(calls[0], every_variant=True)
    testing.assert_parity(rows)
    names = [r.name for r in rows]
    assert names[:5] == [f"{n} [read {pairs[0][0]}, plan {pairs[0][1]}]"
                         for n in ("o", "dq", "dk", "dv", "dtable")]
    assert len(rows) == 5 * len(pairs)
    assert ran == [x for r, p in pairs for x in (("fwd", r == "slabs"), ("bwd", p))]
    assert attention.TABLE_READ is None and attention._plans.BWD_PLAN is None


@pytest.mark.interpreter
def test_check_call_skips_a_variant_the_card_cannot_fit(monkeypatch):
    """A backward plan other than the first whose kernel does not fit the card (Triton's
    OutOfResources at its load) is skipped, as the card's timed choice skips it; the same
    error in the first plan, which runs untimed, is the check's."""
    from triton.runtime.errors import OutOfResources

    calls, pairs = _several_variants(heads=1)
    first, other = pairs[0][1], pairs[1][1]
    real = attention._bwd_run

    def unfit(plan, *a):
        if plan == bad:
            raise OutOfResources(104000, 101376, "shared memory")
        return real(plan, *a)

    monkeypatch.setattr(attention, "_bwd_run", unfit)
    bad = other
    rows = testing.check_call(calls[0], every_variant=True)
    assert rows and not any(f"plan {other}]" in r.name for r in rows)
    assert any(f"plan {first}]" in r.name for r in rows)
    bad = first
    with pytest.raises(OutOfResources):
        testing.check_call(calls[0], every_variant=True)
