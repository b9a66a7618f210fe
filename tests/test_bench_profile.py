"""The training-step profile (`python -m benchmarks --profile`), the ours+compile provider, the
speed-of-light rows and the goal ratios, on CPU. Real timings need CUDA and are never asserted:
the grouping is checked on kernel names an H200 recorded (gpu/2026-12-04-h200/profile.log)."""
import csv
import dataclasses
import json
import math

import pytest
import torch

from test_bench_suite import cpu_compile  # noqa: F401 - the fixture (aot_eager on CPU)

# (name, total ms over 3 steps) as torch.profiler listed them for the XL/2 256 px step on an
# NVIDIA H200 (ours, ours+compile and compile runs; some names cut where the table cut them)
H200_EVENTS = [
    ("_time_qkv_bwd_kernel_dw", 56.577),
    ("_tmsa_attention_bwd_kernel_dbias", 34.815),
    ("_tmsa_attention_bwd_kernel_dkdv", 27.700),
    ("_time_qkv_fwd_kernel", 24.662),
    ("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", 22.487),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::Te",
     19.192),
    ("_time_qkv_bwd_kernel_dx", 16.639),
    ("_tmsa_attention_fwd_kernel", 15.229),
    ("_tmsa_attention_bwd_kernel_dq", 13.562),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymou",
     13.228),
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", 11.972),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda",
     9.944),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, at::native::",
     6.097),
    ("_adaln_norm_bwd_kernel", 5.749),
    ("void cutlass::Kernel2<cutlass_80_simt_sgemm_128x32_8x5_nn_align1>(cutlass_80_simt_sgemm",
     2.001),
    ("_time_qkv_bwd_kernel_ln", 1.736),
    ("_tmsa_attention_bwd_kernel_delta", 1.668),
    ("triton_red_fused_gelu_gelu_backward_sum_view_4", 7.030),
    ("triton_poi_fused__to_copy_1", 3.077),
    ("triton_per_fused__softmax__softmax_backward_data__to_copy_add_index_mul_permute_view_10",
     11.818),
    ("Memcpy DtoD (Device -> Device)", 5.191),
    ("void (anonymous namespace)::softmax_warp_forward<float, float, float, 8, false, false>(",
     5.473),
]
EXPECTED = {
    "ours": {"_time_qkv_bwd_kernel_dw", "_tmsa_attention_bwd_kernel_dbias",
             "_tmsa_attention_bwd_kernel_dkdv", "_time_qkv_fwd_kernel", "_time_qkv_bwd_kernel_dx",
             "_tmsa_attention_fwd_kernel", "_tmsa_attention_bwd_kernel_dq",
             "_adaln_norm_bwd_kernel", "_time_qkv_bwd_kernel_ln",
             "_tmsa_attention_bwd_kernel_delta"},
    "cuBLAS": {"nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN",
               "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN",
               "void cutlass::Kernel2<cutlass_80_simt_sgemm_128x32_8x5_nn_align1>(cutlass_80_simt"
               "_sgemm"},
    "inductor": {"triton_red_fused_gelu_gelu_backward_sum_view_4", "triton_poi_fused__to_copy_1",
                 "triton_per_fused__softmax__softmax_backward_data__to_copy_add_index_mul_permute"
                 "_view_10"},
    "copies and casts": {
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::Te",
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda",
        "Memcpy DtoD (Device -> Device)"},
}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_our_kernel_names_are_found_in_the_modules(tmp_path, monkeypatch):
    """Discovery walks a package's modules for @triton.jit functions, autotuned or not: a kernel
    renamed or added by the kernel work is counted as ours without editing a list."""
    import importlib

    from benchmarks.profile_step import our_kernel_names

    pkg = tmp_path / "fake_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops.py").write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef _fake_fwd_kernel(X, N: tl.constexpr):\n    pass\n\n"
        "@triton.autotune(configs=[triton.Config({}, num_warps=4)], key=['N'])\n"
        "@triton.jit\ndef _fake_bwd_kernel_dx(X, N: tl.constexpr):\n    pass\n\n"
        "def _launcher():\n    pass\n")
    (pkg / "__main__.py").write_text("raise SystemExit('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert our_kernel_names("fake_kernels") == {"_fake_fwd_kernel", "_fake_bwd_kernel_dx"}

    names = our_kernel_names()  # this library, as it is now
    assert any("attention" in n for n in names) and any("adaln_norm" in n for n in names)
    assert not any(n.startswith("triton_") for n in names)  # never confused with inductor's


def test_profile_groups_h200_kernel_names_and_the_idle_time():
    from benchmarks.profile_step import GROUPS, IDLE, aggregate, classify

    ours = EXPECTED["ours"]  # what discovery found at the measured commit (the kernels change)
    for group, names in EXPECTED.items():
        for n in names:
            assert classify(n, ours) == group, n
    other = {n for n, _ in H200_EVENTS} - set().union(*EXPECTED.values())
    assert other and all(classify(n, ours) == "other" for n in other)

    # the events of 3 steps; one kernel launched twice per step
    events = H200_EVENTS + [("_time_qkv_bwd_kernel_dw", 3.0)]
    agg = aggregate(events, steps=3, step_ms=151.5, ours=ours)
    g = agg["groups"]
    assert list(g) == list(GROUPS) + [IDLE]
    want = {grp: sum(ms for n, ms in events if n in names) / 3 for grp, names in EXPECTED.items()}
    for grp, ms in want.items():
        assert g[grp] == pytest.approx(ms), grp
    total = sum(ms for _, ms in events) / 3
    assert agg["kernel_ms"] == pytest.approx(total)
    assert g[IDLE] == pytest.approx(151.5 - total)
    assert sum(g.values()) == pytest.approx(151.5)
    top = agg["kernels"][0]
    assert top[:2] == ("_time_qkv_bwd_kernel_dw", "ours")
    assert top[2] == pytest.approx((56.577 + 3.0) / 3) and top[3] == pytest.approx(2 / 3)
    assert [k[2] for k in agg["kernels"]] == sorted((k[2] for k in agg["kernels"]), reverse=True)
    # overlapping streams can sum to more than the step: idle is then 0, never negative
    assert aggregate(events, 3, 1.0, ours)["groups"][IDLE] == 0.0
    # host time inside our custom ops: per step, calls per step, slowest first, summed
    host = [("tmsa_attention_bwd", 0.9), ("time_qkv_fwd", 0.2), ("tmsa_attention_bwd", 1.2)]
    agg = aggregate(events, 3, 151.5, ours, host)
    assert agg["host"] == [("tmsa_attention_bwd", pytest.approx(0.7), pytest.approx(2 / 3)),
                           ("time_qkv_fwd", pytest.approx(0.2 / 3), pytest.approx(1 / 3))]
    assert agg["host_ms"] == pytest.approx(2.3 / 3)
    assert agg["groups"] == g  # the host time is no GPU group


@pytest.mark.interpreter
def test_host_time_of_our_custom_ops_is_found_once_per_call():
    """The profiler nests one custom-op call's dispatches under the same name: the host rows
    count the outermost only, for every op of ours a training step calls."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile_step import _host_events
    from diffit_kernels import adaln_norm, tmsa_attention

    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(49, 2, requires_grad=True)
    x = torch.randn(1, 16, 32, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            o = tmsa_attention(q, k, v, table=table, grid=(4, 4), backend="triton")
            y = adaln_norm(x, backend="triton")
            (o.sum() + y.sum()).backward()
    calls = sorted(name for name, ms in _host_events(prof) if ms > 0)
    assert calls == sorted(["tmsa_attention_fwd_v3", "tmsa_attention_bwd_v3",
                            "adaln_norm_fwd", "adaln_norm_bwd"] * 2), calls


def test_profile_run_on_cpu_writes_csv_plot_and_summary_section(tmp_path, cpu_compile,
                                                                 monkeypatch):
    """The driver's --profile stage with the tiny model: eager and ours+compile (aot_eager)."""
    from benchmarks import profile_step
    from benchmarks.__main__ import main

    real_run = profile_step.run

    def two_providers(quick=False, dtype="bf16", out_dir=None, tiny_cpu=False):
        return real_run(quick=quick, dtype=dtype, out_dir=out_dir, tiny_cpu=tiny_cpu,
                        providers=["eager", "ours+compile"])

    monkeypatch.setattr(profile_step, "run", two_providers)
    rc = main(["--tiny-cpu", "--ops", "adaln_norm", "--profile", "--out", str(tmp_path)])
    monkeypatch.setattr(profile_step, "run", real_run)
    assert rc == 0
    meta = json.loads((tmp_path / "run.json").read_text())
    assert [e["name"] for e in meta["benchmarks"]] == ["peak", "adaln_norm", "profile"]
    prof = meta["benchmarks"][2]
    assert prof["status"] == "ok", prof
    assert sorted(prof["csv"]) == ["profile_eager.csv", "profile_ours_compile.csv",
                                   "profile_unet_eager.csv", "profile_unet_ours_compile.csv"]
    assert prof["png"] == ["profile.png", "profile_unet.png"]
    for name in prof["csv"]:
        rows = _rows(tmp_path / name)
        groups = [r for r in rows if r["kind"] == "group"]
        assert [r["group"] for r in groups] == list(profile_step.GROUPS) + [profile_step.IDLE]
        step = float(rows[0]["step_ms"])
        assert step > 0 and sum(float(r["ms"]) for r in groups) >= step * 0.999
        assert any(r["kind"] == "kernel" and float(r["ms"]) > 0 for r in rows)
        ops = [r for r in rows if r["kind"] == "op"]
        assert ops and all(r["kernel"].startswith("aten::") and "[" in r["kernel"]
                           and float(r["ms"]) > 0 for r in ops), ops[:3]
        assert [float(r["ms"]) for r in ops] == sorted((float(r["ms"]) for r in ops),
                                                       reverse=True)
    text = (tmp_path / "summary.md").read_text()
    assert "eager torch ops with the most kernel time of their own" in text
    assert "## profile" in text and text.count("| group | eager | ours+compile |") == 2
    assert "| GPU idle |" in text and "](profile.png)" in text and "](profile_unet.png)" in text
    latent, unet = (f"{c.name} {c.pass_}, ms per step" for c, _, _ in
                    profile_step.profiled_cases(quick=False, tiny_cpu=True))
    assert "U-Net" in unet and text.index(latent) < text.index(unet)

    # --append: the profile alone, added to the same folder, the earlier benchmarks kept
    rc = main(["--tiny-cpu", "--ops", "profile", "--append", "--out", str(tmp_path)])
    assert rc == 0
    meta2 = json.loads((tmp_path / "run.json").read_text())
    assert [e["name"] for e in meta2["benchmarks"]] == ["peak", "adaln_norm", "profile"]
    assert meta2["command"].endswith("--ops profile --append --out " + str(tmp_path))
    assert (tmp_path / "adaln_norm.csv").exists()


def test_model_ours_compile_provider_is_one_fullgraph_for_every_block(cpu_compile):
    from benchmarks import bench_model as bm

    assert "ours+compile" in bm.PROVIDERS
    for case in bm.cases(quick=True):  # the commands' defaults and the goal's yardstick first
        default = "ours+graphs" if case.pass_ == "fwd+bwd+adamw" else "ours+compile"
        assert case.providers[:2] == (default, "compile"), case
    for case in bm.cases(quick=True):  # the quick forward row keeps to the defaults
        assert ("ours+graphs" in case.providers) == (case.pass_ != "fwd"), case
    for case in bm.cases():
        assert case.providers == bm.PROVIDERS, case
    case = bm.ModelCase("DiffiT-tiny", "latent", 32, 2, "fwd+bwd+adamw", ("ours+compile",),
                        rep_ms=1)
    row = bm.measure(case, "ours+compile", "bf16", torch.device("cpu"), quick=True)
    assert (row["graphs"], row["graph_breaks"], row["recompile_limit_hits"]) == (1, 0, 0)
    assert row["ms"] > 0


@pytest.mark.parametrize("provider,backend", [("ours+graphs", "auto"),
                                              ("compile+graphs", "torch")])
def test_model_graphs_providers_compile_like_the_trainer(
        cpu_compile, monkeypatch, provider, backend):
    """ours+graphs and compile+graphs (ours, or the reference ops, as the trainer runs each):
    diffit.accel.compile_blocks with mode reduce-overhead (on CPU with the aot_eager backend
    the mode has nothing to replay: one clean graph, as the trainer gets), and a new
    cudagraph-trees step before every training step, or before every model call of a sampling
    loop (as `python -m diffit sample --compile-mode reduce-overhead`). On CPU ours builds
    with backend "auto" (the reference here, the kernels under the interpreter)."""
    import diffit.accel
    from benchmarks import bench_model as bm

    modes, marks, built = [], [], []
    real = diffit.accel.compile_blocks
    monkeypatch.setattr(diffit.accel, "compile_blocks",
                        lambda model, **kw: modes.append(kw.get("mode")) or real(model, **kw))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    real_build = bm.build_model

    def build(case, b, device):  # the timed model's backend (FLOP counts build on meta)
        if str(device) != "meta":
            built.append(b)
        return real_build(case, b, device)
    monkeypatch.setattr(bm, "build_model", build)
    case = bm.ModelCase("DiffiT-tiny", "latent", 32, 2, "fwd+bwd+adamw", (provider,),
                        rep_ms=1)
    row = bm.measure(case, provider, "bf16", torch.device("cpu"), quick=True)
    assert modes == ["reduce-overhead"] and len(marks) >= 2 and built == [backend]
    assert (row["graphs"], row["graph_breaks"], row["recompile_limit_hits"]) == (1, 0, 0)
    marks.clear()
    sampling = dataclasses.replace(case, pass_="guided sampling", steps=3)
    row = bm.measure(sampling, provider, "bf16", torch.device("cpu"), quick=True)
    assert row["ms"] > 0 and row["graph_breaks"] == 0
    assert len(marks) >= 2 * 3 and len(marks) % 3 == 0  # one per model call of each loop


def test_speed_of_light_rows_come_first_and_keep_a_reserve(tmp_path):
    from benchmarks import bench_attention as ba
    from benchmarks import bench_time_qkv as bt
    from benchmarks import common

    common.set_budget(-1.0)  # the deadline passed a second ago
    try:
        assert common.out_of_time() and not common.out_of_time(speed_of_light=True)
        rows = bt.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path),
                      providers=["eager", "cublas"])
        arows = ba.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path),
                       providers=["eager", "memory limit", "sdpa-flash"])
    finally:
        common.set_budget(None)
    cub = [r for r in rows if r["provider"] == "cublas"]
    assert [r["pass"] for r in cub[:5]] == ["fwd", "dX", "dW", "bwd", "fwd+bwd"]
    assert all(r["error"] == "" and r["ms"] > 0 for r in cub)
    assert all(r["error"].startswith(common.SKIPPED) for r in rows if r["provider"] == "eager")
    assert rows.index(cub[0]) == 0  # run first
    assert [r["provider"] for r in _rows(tmp_path / "time_qkv.csv")][:5] == ["cublas"] * 5
    for r in arows:
        assert (r["error"] == "") == (r["provider"] != "eager"), r
    assert [r["provider"] for r in arows[:6]] == ["sdpa-flash"] * 3 + ["memory limit"] * 3


def test_memory_limit_row_is_the_bytes_at_the_measured_copy_rate(tmp_path, monkeypatch):
    from benchmarks import bench_attention as ba

    monkeypatch.setattr(ba, "copy_gbps", lambda device, tiny_cpu=False: 1000.0)
    # fwd: q, k, v, o; bwd: q, k, v, o, dO, dq, dk, dv; fwd+bwd: both
    one = 64 * 16 * 1024 * 72 * 2
    assert [ba.traffic_bytes(64, 16, (32, 32), 72, 2, m) for m in ba.MODES] == \
        [4 * one, 8 * one, 12 * one]
    rows = ba.run(tiny_cpu=True, dtype="fp32", out_dir=str(tmp_path), providers=["memory limit"])
    for r in rows:
        B, H, N, d = r["B"], r["H"], r["N"], r["d"]
        nbytes = {"fwd": 4, "bwd": 8, "fwd+bwd": 12}[r["mode"]] * B * H * N * d * 4
        assert r["gbytes"] == pytest.approx(nbytes / 1e9, rel=1e-3)
        assert r["ms"] == pytest.approx(nbytes / 1000e9 * 1e3, rel=1e-3)


def test_goal_ratios_from_the_csvs(tmp_path):
    from benchmarks import summary
    from benchmarks.common import write_csv

    write_csv(tmp_path / "peak.csv", [dict(op="peak", case="copy", kind="copy", provider="c",
                                           **{"pass": "fwd"}, ms=1.0, gbps=4000.0)])
    write_csv(tmp_path / "attention_bfloat16.csv", [
        dict(shape="latent256-B64", mode="fwd+bwd", provider=p, ms=ms)
        for p, ms in (("sdpa-flash", 0.6), ("tmsa", 0.7), ("flex", 1.9), ("sdpa-membias", 1.2))]
        + [dict(shape="img32-win4-B64", mode="fwd+bwd", provider=p, ms=ms)
           for p, ms in (("memory limit", 0.43), ("tmsa", 2.62), ("sdpa-membias", 11.5))]
        + [dict(shape="latent256-B64", mode="fwd", provider="tmsa", ms=0.3)])  # no flash fwd
    write_csv(tmp_path / "adaln_norm.csv", [
        dict(op="adaln_norm", case="M65536", provider="ours", **{"pass": "fwd"}, ms=0.2,
             gbps=3600.0)])
    write_csv(tmp_path / "model.csv", [
        dict(op="model", case="DiffiT-XL/2 256px B32", provider=p, **{"pass": "fwd+bwd+adamw"},
             ms=ms) for p, ms in (("ours+graphs", 50.0), ("compile", 75.0),
                                  ("compile+graphs", 70.0))])
    got = {label: (ratio, status) for label, ratio, _, status in summary.goal_rows(tmp_path)}
    assert got["model DiffiT-XL/2 256px B32: compile / ours+graphs"] == \
        (pytest.approx(1.5), "met")
    # the trainer's two contenders, both with CUDA graphs
    assert got["model DiffiT-XL/2 256px B32: compile+graphs / ours+graphs"] == \
        (pytest.approx(1.4), "NOT met")
    r, st = got["attention fwd+bwd latent256-B64: tmsa / flash without bias"]
    assert r == pytest.approx(0.7 / 0.6) and st == "met"
    r, st = got["attention fwd+bwd latent256-B64: SDPA dense bias / tmsa"]
    assert r == pytest.approx(1.2 / 0.7) and st == "met"
    r, st = got["attention fwd+bwd latent256-B64: Flex / tmsa"]
    assert r == pytest.approx(1.9 / 0.7) and st == "met"
    r, st = got["attention fwd+bwd img32-win4-B64: tmsa / memory-traffic limit"]
    assert r == pytest.approx(2.62 / 0.43) and st == "NOT met"
    assert got["adaln_norm fwd M65536: ours / copy bandwidth"] == (pytest.approx(0.9), "met")
    assert got["attention fwd latent256-B64: tmsa / flash without bias"] == (None,
                                                                             "not measured")
    assert "| attention fwd+bwd img32-win4-B64: tmsa / memory-traffic limit | 6.09 | <= 2 | " \
        "NOT met |" in summary.goals_table(tmp_path)
    assert not any(math.isnan(r) for r, _ in got.values() if r is not None)


def test_annotation_spans_on_the_gpu_timeline_are_no_kernels():
    """The H200 profile counted "Optimizer.step#AdamW.step" (4.8 ms of a record_function span
    over kernels already counted) as a kernel; our ops' profiler ranges would be the same."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.profile_step import _events

    def ev(name, us, annotation=False):
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, is_user_annotation=annotation,
                               cpu_children=[], time_range=SimpleNamespace(elapsed_us=lambda: us))

    prof = SimpleNamespace(events=lambda: [
        ev("nvjet_sm90_tst_192x192", 2000), ev("Optimizer.step#AdamW.step", 4800),
        ev("diffit_kernels::tmsa_attention_fwd_v3", 900), ev("_tmsa_attention_fwd_kernel", 800),
        ev("a span torch marks", 100, annotation=True)])
    assert _events(prof, cuda=True) == [("nvjet_sm90_tst_192x192", 2.0),
                                         ("_tmsa_attention_fwd_kernel", 0.8)]
