"""The launches a card makes, built without a card (testing.compile_only_card: the ops' CUDA
launch path on CPU tensors with an H100 / H200's candidate lists and work splits, every launch
compiled for sm_90a and nothing run), in the compile tests' process: the gpu tests' shapes of
every op, the attention benchmark's shapes under each backward plan and a training step of each
benchmarked model compile and fit the card; an autotuned launch's candidates compile in threads
before the autotuner times them (_common.precompile)."""
import contextvars
import inspect
import os
import types
import warnings

import pytest
import torch

from diffit_kernels import _common, adaln_norm, testing, tmsa_attention

pytestmark = pytest.mark.aot

THREADED = _common._async_compile_mode() is not None  # Triton 3.6+


def _first_step(seed: int = 0):
    """DiffiT-XL/2's attention (d 72, 16 x 16 grid, table) and adaLN norm (C 1152) forward and
    backward in bf16, at two samples and two heads."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 256, 72, generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    table = torch.randn(31 * 31, 2, generator=g, requires_grad=True)
    o = tmsa_attention(q, k, v, table=table, grid=(16, 16))
    o.backward(torch.randn(o.shape, generator=g, dtype=o.dtype))
    x = torch.randn(2, 16, 1152, generator=g, dtype=torch.bfloat16, requires_grad=True)
    shift, scale = (torch.randn(2, 1152, generator=g, dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
    y = adaln_norm(x, shift, scale, activation="silu")
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype))


@pytest.fixture
def one_parse_at_a_time(monkeypatch):
    """ast.parse in one thread at a time. CPython counts the AST constructor's recursion depth
    per interpreter, not per thread, so concurrent parses (Triton parses each @jit function at
    each compile) now and then fail with "SystemError: AST constructor recursion depth
    mismatch" (python/cpython#106905; here ~1 first step in 10 under Python 3.11); precompile
    then leaves that candidate to the autotuner, which compiles it itself. The tests that count
    what the threads built take that race out."""
    import ast
    import threading

    lock, parse = threading.Lock(), ast.parse

    def locked(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", locked)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_autotuner_finds_every_candidate_compiled(threads, monkeypatch, tmp_path,
                                                      one_parse_at_a_time):
    monkeypatch.setattr(_common, "COMPILE_THREADS", threads)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with testing.compile_only_card(90) as record:
        _first_step()
    tuned = {name: (n, late) for name, n, late in record["tuned"]}
    for name in ("_tmsa_attention_fwd_kernel", "_tmsa_attention_bwd_kernel_dkdv",
                 "_tmsa_attention_bwd_kernel_dq", "_adaln_norm_fwd_kernel",
                 "_adaln_norm_bwd_kernel"):
        assert name in tuned and tuned[name][0] > 1, (name, record["tuned"])
    for name, n, late in record["tuned"]:
        # late: compiled when the autotuner looked its candidates up, one after another
        assert late == (0 if threads > 1 and THREADED else n), (name, n, late)
    assert _async_mode() is None


def _async_mode():
    """The AsyncCompileMode active in this thread (None: none, or this Triton has none)."""
    module = _common._async_compile_mode()
    return module and module.active_mode.get()


@pytest.mark.skipif(not THREADED, reason="this Triton has no AsyncCompileMode that skips a "
                                         "failed compile (3.6+): candidates compile one by one")
def test_threaded_builds_are_the_builds_of_one_thread(monkeypatch, tmp_path, one_parse_at_a_time):
    builds = []
    for threads in (2, 1):
        monkeypatch.setattr(_common, "COMPILE_THREADS", threads)
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / str(threads)))  # no cache hits
        with testing.compile_only_card(90) as record:
            _first_step()
        builds.append(record["kernels"])
    assert len(builds[0]) >= 20 and builds[0] == builds[1]


@pytest.mark.skipif(not THREADED, reason="this Triton has no AsyncCompileMode that skips a "
                                         "failed compile (3.6+): candidates compile one by one")
def test_a_compile_failing_once_in_a_thread_is_compiled_again_at_the_launch(monkeypatch,
                                                                            tmp_path):
    """CPython's ast.parse now and then fails in threads (python/cpython#106905; Triton parses
    every @jit function it compiles): a candidate whose threaded compile failed is compiled
    again by the autotuner's look-up, not raised from the kernel's cache (where Triton 3.7 and
    3.8 keep a failed threaded compile)."""
    import threading

    import triton
    import triton.compiler
    import triton.language as tl

    @triton.jit
    def triple(X, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < N) * 3, mask=offs < N)

    real, failed = triton.compiler.compile, []

    def flaky(*args, **kwargs):
        if not failed and threading.current_thread().name.startswith("diffit-compile"):
            failed.append(1)
            raise SystemError("AST constructor recursion depth mismatch (a stand-in)")
        return real(*args, **kwargs)

    monkeypatch.setattr(triton.compiler, "compile", flaky)  # what a jit function compiles with
    monkeypatch.setattr(_common, "COMPILE_THREADS", 2)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tuner = _common.autotuner([triton.Config({"BLOCK": b}) for b in (16, 32)], ["N"], triple)
    with testing.compile_only_card(90) as record:
        tuner[(1,)](torch.empty(16), 10)
    assert failed and record["tuned"] == [("triple", 2, 1)]  # the failed one, compiled again


def test_failed_threaded_compiles_leave_the_kernel_cache():
    """drop_failed_compiles removes exactly the failed threaded compiles from a kernel's
    caches: finished compiles and ones still running stay."""
    from concurrent.futures import Future

    module = pytest.importorskip("triton.runtime._async_compile")
    if not hasattr(module, "FutureKernel"):
        pytest.skip("this Triton has no threaded compile")
    futures = {name: Future() for name in ("failed", "done", "running")}
    futures["failed"].set_exception(SystemError("stand-in"))
    futures["done"].set_result("a kernel")
    hooks = [p for p in inspect.signature(module.FutureKernel).parameters if p != "future"]
    cache = {name: module.FutureKernel(**{h: lambda kernel: None for h in hooks}, future=f)
             for name, f in futures.items()}  # its compile hooks differ between releases
    cache["compiled"] = "a compiled kernel"
    jit_fn = types.SimpleNamespace(device_caches={0: (cache, None)})
    tuner = types.SimpleNamespace(fn=types.SimpleNamespace(fn=jit_fn))  # under heuristics
    assert _common.drop_failed_compiles(tuner, module) == 1
    assert sorted(cache) == ["compiled", "done", "running"]


@pytest.mark.skipif(not THREADED, reason="this Triton has no AsyncCompileMode that skips a "
                                         "failed compile (3.6+): candidates compile one by one")
def test_a_candidate_that_fails_to_compile_is_left_to_the_autotuner(monkeypatch, tmp_path):
    import triton
    import triton.language as tl

    @triton.jit
    def double(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # 48: not a power of two
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)

    monkeypatch.setattr(_common, "COMPILE_THREADS", 2)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tuner = triton.autotune([triton.Config({"BLOCK": b}) for b in (64, 48, 128)], key=["N"])(double)
    x = torch.randn(100)
    with testing.compile_only_card(90) as record:
        named, kwargs = dict(X=x, Y=torch.empty_like(x), N=100), dict(grid=(2,), warmup=False)
        assert _common.precompile(tuner, named, kwargs) == 3
        assert _async_mode() is None
    assert sorted(key[0] for key in record["kernels"]) == ["double", "double"]


def test_a_failed_precompile_warns_and_the_autotuner_goes_on(monkeypatch, tmp_path):
    """The autotuners' first-launch hook (_common.autotuner's early_config_prune): precompile
    failing warns, names the kernel and the error, and the autotuner keeps every candidate and
    compiles them itself, one by one."""
    import triton
    import triton.language as tl

    @triton.jit
    def zero(X, N, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), 0.0, mask=tl.arange(0, BLOCK) < N)

    def failing(tuner, named, kwargs):
        raise ValueError("stand-in failure")

    monkeypatch.setattr(_common, "precompile", failing)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tuner = _common.autotuner([triton.Config({"BLOCK": b}) for b in (16, 32)], ["N"], zero)
    with testing.compile_only_card(90) as record, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner[(1,)](torch.empty(16), 10)
    assert record["tuned"] == [("zero", 2, 2)]  # both candidates, compiled at the look-up
    assert any(w.category is RuntimeWarning and "zero" in str(w.message)
               and "stand-in failure" in str(w.message) for w in caught)


def test_an_error_inside_precompile_leaves_no_compile_mode_active(monkeypatch):
    import triton

    class Tuner:
        configs = [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})]

        class fn:
            @staticmethod
            def warmup(**kwargs):
                raise ValueError("stand-in failure")

    active = contextvars.ContextVar("active", default=None)

    class Mode:
        """Triton 3.6's AsyncCompileMode as precompile sees it: an error inside its with-block
        leaves it active."""

        def __init__(self, pool, ignore_errors):
            assert ignore_errors

        def __enter__(self):
            active.set(self)

        def __exit__(self, *exc):
            if exc[0] is None:
                active.set(None)

    monkeypatch.setattr(_common, "COMPILE_THREADS", 2)
    monkeypatch.setattr(_common, "_async_compile_mode",
                        lambda: types.SimpleNamespace(AsyncCompileMode=Mode, active_mode=active))
    with pytest.raises(ValueError, match="stand-in failure"):
        _common.precompile(Tuner(), {"N": 4}, {"grid": (1,), "warmup": False})
    assert active.get() is None


def _gpu_cases():
    import test_attention

    return test_attention.GPU_CASES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,N,H,D,kw", _gpu_cases())
def test_every_launch_of_the_gpu_attention_cases_compiles(B, N, H, D, kw, dtype, tmp_path):
    """What the card's attention tests launch (their shapes, the card's candidate lists and
    work splits for 132 SMs, the first backward plan as they run it) compiles for sm_90a: a
    kernel that fails to build at a launch's own specialization (its ints' divisibility, its
    views' alignment) fails here, not in the card's few minutes. Each launch fits the card
    (_assert_launches_fit)."""
    import test_attention

    leaves, build, _ = test_attention._case(B, H, N, D, **kw)
    leaves = {n: (t if n == "table" else t.to(dtype)).requires_grad_() for n, t in leaves.items()}
    with testing.compile_only_card(90) as record:
        o = tmsa_attention(**build(leaves), backend="triton")
        o.backward(torch.randn_like(o))
    assert record["kernels"]
    _assert_launches_fit(record)


def _gpu_row_cases():
    """The gpu tests' time_qkv shapes and adaln_norm's (DiffiT-XL/2's width, every input)."""
    import test_time_qkv

    tq = [pytest.param("time_qkv", p.values[:-1], p.values[-1], id="time_qkv-" + p.id)
          for p in test_time_qkv.GPU_CASES]
    return tq + [pytest.param("adaln_norm", (4, 256, 1152, True, True, True, True, True), {},
                              id="adaln_norm-C1152")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,shape,opts", _gpu_row_cases())
def test_every_launch_of_the_gpu_row_op_cases_compiles(op, shape, opts, dtype):
    """What the card's time_qkv and adaln_norm tests launch compiles for sm_90a (the
    attention's: above), each launch within the card's limits."""
    import diffit_kernels
    import test_adaln_norm
    import test_time_qkv

    case = (test_time_qkv if op == "time_qkv" else test_adaln_norm)._case(*shape, **opts)
    leaves, build = case[0], case[1]
    leaves = {n: t.to(dtype).requires_grad_() for n, t in leaves.items()}
    with testing.compile_only_card(90) as record:
        out = getattr(diffit_kernels, op)(**build(leaves), backend="triton")
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.requires_grad]
        torch.autograd.backward(outs, [torch.randn_like(t) for t in outs])
    assert record["kernels"]
    _assert_launches_fit(record)


def _assert_launches_fit(record):
    """Every launch fits an H100 / H200 (and a B200): its grid within CUDA's limits (2^31 - 1
    programs along x, 65535 along y and z) and its shared memory within the 227 KB a block may
    take (a launch past it fails on the card, OutOfResources)."""
    for name, grid, shared in record["launches"]:
        x, y, z = tuple(grid) + (1,) * (3 - len(grid))
        assert 0 < x < 2 ** 31 and 0 < y <= 65535 and 0 < z <= 65535, (name, grid)
        assert shared <= 227 * 1024, (name, grid, shared)


def _bench_cases():
    from benchmarks.bench_attention import QUICK, SHAPES

    return [pytest.param(*s, id=s[0]) for s in SHAPES if s[0] in QUICK]


@pytest.mark.slow
@pytest.mark.parametrize("label,B,H,grid,window,D", _bench_cases())
def test_every_launch_of_the_attention_benchmark_compiles(label, B, H, grid, window, D,
                                                          monkeypatch, tmp_path):
    """The attention benchmark's quick shapes (the card's first runs) in bf16 under each
    backward plan the shape has (its plan rows) and, for global attention, the gathered table
    (tmsa-gather): every launch compiles for sm_90a and fits the card. q, k, v
    are views of one packed projection, as the benchmark makes them; their values are not
    read (nothing runs), so they are left uninitialised."""
    from diffit_kernels import _attention_plans as AP
    from diffit_kernels import attention as A

    N = grid[0] * grid[1]
    gh, gw = window or grid
    qkv = torch.empty(B, N, 3, H, D, dtype=torch.bfloat16)
    table = torch.zeros((2 * gh - 1) * (2 * gw - 1), H, dtype=torch.bfloat16)
    geometry = [*grid, *(window or grid)]
    with testing.compile_only_card(90) as record:
        plans = AP._plans_of(B, H, N, D, torch.bfloat16, geometry, "cpu")
        variants = [("_attention_plans", "BWD_PLAN", p) for p in plans]
        if window is None:
            variants.append(("attention", "SLAB_MAX_BYTES", 0))
        for module, name, value in variants:
            with monkeypatch.context() as m:
                m.setattr(AP if module == "_attention_plans" else A, name, value)
                q, k, v = (t.detach().requires_grad_()
                           for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
                t = table.detach().requires_grad_()
                o = tmsa_attention(q, k, v, table=t, grid=grid, window=window)
                o.backward(torch.empty_like(o))
    assert len(plans) > 1 or window is not None, plans
    _assert_launches_fit(record)


@pytest.mark.slow
@pytest.mark.parametrize("model,arch,sms", [
    pytest.param("DiffiT-XL/2-256", 90, 132, id="DiffiT-XL/2-256-H100"),
    pytest.param("DiffiT-XL/2-512", 90, 132, id="DiffiT-XL/2-512-H100"),
    pytest.param("ffhq64", 90, 132, id="ffhq64-H100"),
    pytest.param("DiffiT-XL/2-256", 100, 148, id="DiffiT-XL/2-256-B200"),
    pytest.param("ffhq64", 100, 148, id="ffhq64-B200")])
def test_every_launch_of_a_model_training_step_compiles(model, arch, sms):
    """A training step of the models the model benchmark trains (bf16 autocast, fp32
    weights; DiffiT-XL/2 at its width and heads with 2 of its 28 identical blocks, 2 samples;
    the ffhq64 U-Net whole, 1 sample) builds every launch through the card's launch path,
    each launch within the card's limits: for sm_90a with an H100 / H200's 132 SMs, and for
    sm_100a with a B200's 148 (its own work splits; every kernel, row kernels too)."""
    from diffit.latent import DiffiT
    from diffit.unet import DiffiTUNet

    torch.manual_seed(0)
    if model == "ffhq64":
        net = DiffiTUNet.from_preset("ffhq64", backend="triton").to(
            memory_format=torch.channels_last)  # as the trainer builds it
        inputs = (torch.randn(1, net.config.in_channels, 64, 64), torch.rand(1))
    else:
        size = int(model.rsplit("-", 1)[1]) // 8  # the latent's side
        net = DiffiT.from_preset("DiffiT-XL/2", input_size=size, depth=2, backend="triton")
        inputs = (torch.randn(2, net.in_channels, size, size), torch.randint(0, 1000, (2,)),
                  torch.randint(0, net.num_classes, (2,)))
    with testing.compile_only_card(arch, sms) as record:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(*inputs)
        out.float().sum().backward()
    names = {name for name, _ in record["kernels"]}
    assert "_tmsa_attention_fwd_kernel" in names and "_tmsa_attention_bwd_kernel_dq" in names
    _assert_launches_fit(record)


def test_compile_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("DIFFIT_KERNELS_COMPILE_THREADS", "")
    assert _common._compile_threads() == 8                  # the usable cores, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert _common._compile_threads() == 4                  # shared among a node's ranks
    monkeypatch.setenv("DIFFIT_KERNELS_COMPILE_THREADS", "3")
    assert _common._compile_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DIFFIT_KERNELS_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="DIFFIT_KERNELS_COMPILE_THREADS.*positive integer"):
            _common._compile_threads()


def test_a_batch_past_the_grid_limit_launches_in_runs_that_fit():
    """4097 samples x 16 heads (65552 (sample, head) programs, past the 65535 a grid takes along
    y; DiffiT-XL's heads at guided sampling's batch 2048 x 2) on a 4x4 token grid: every launch
    of the card's plans fits, the programs along y split over runs of samples."""
    B, H, N = 4097, 16, 16
    q, k, v = (torch.empty(B, H, N, 72, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    table = torch.zeros(49, H, requires_grad=True)
    with testing.compile_only_card(90) as record:
        o = tmsa_attention(q, k, v, table=table, grid=(4, 4))
        o.backward(torch.empty_like(o))
    _assert_launches_fit(record)
    forward = [grid for name, grid, _ in record["launches"]
               if name == "_tmsa_attention_fwd_kernel"]
    assert len(forward) > 1 and sum(g[1] for g in forward) == B * H, forward
