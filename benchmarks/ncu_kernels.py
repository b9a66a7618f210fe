"""One forward+backward of each op at the shapes that cost the most, for Nsight Compute.

Why: the H200 timed every kernel but could not say why one is slow. The attention forward
at latent512-B8 took 557 us (~70 TFLOP/s, ec83eac) where, estimated from its SASS instruction
count and its tensor-core work, each alone would take ~60 us: it stalls on something neither
count shows. The hardware counters say on what: warp stall reasons, occupancy, and per SASS
instruction where the stalls are sampled.

Each case is warmed up first (compilation and the autotuners' choices stay outside), then one
fwd+bwd runs between torch.cuda.profiler.start() and stop(), inside an NVTX range named after
the case, so `ncu --profile-from-start off` profiles exactly those launches, once each.
benchmarks/gpu_session.sh runs it under ncu when the card's image has ncu:

    ncu --profile-from-start off --clock-control none -o ncu python -m benchmarks.ncu_kernels

Cases (bf16): the DiffiT-XL/2 256 px B32 training step's attention, time_qkv and adaln_norm
(one block's shapes), the attention at latent512-B8 and at the U-Nets' windowed first levels.
--tiny-cpu runs the same code at tiny shapes on CPU tensors (the kernels under
TRITON_INTERPRET=1), without the profiler range: the harness check of CI.

    python -m benchmarks.ncu_kernels [--cases NAME,...] [--tiny-cpu]
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Dict, List, Sequence, Tuple

import torch

# (name, op, shape): attention (B, H, grid, window, d); time_qkv (B, N, C, H, Ct);
# adaln_norm (B, N, C)
CASES = [
    ("attention latent256-B32", "attention", (32, 16, (16, 16), None, 72)),
    ("time_qkv xl256-B32", "time_qkv", (32, 256, 1152, 16, 1152)),
    ("adaln_norm xl256-B32", "adaln_norm", (32, 256, 1152)),
    ("attention latent512-B8", "attention", (8, 16, (32, 32), None, 72)),
    # the U-Nets' first levels (128 channels, heads of 64): ffhq64's 8x8 windows on 64x64
    # tokens at the model benchmark's batch, cifar10's 4x4 windows on 32x32
    ("attention ffhq64-level0-B64 shares", "attention", (64, 2, (64, 64), (8, 8), 64)),
    ("attention ffhq64-level0-B64 wide", "attention", (64, 2, (64, 64), (8, 8), 64)),
    ("attention cifar10-level0-B128", "attention", (128, 2, (32, 32), (4, 4), 64)),
]
# the library setting a case runs under (module, attribute, value): 8x8 windows through both of
# their main backward plans, delta + dK/dV + dQ and the fused kernel's 64-wide tile (the
# benchmark's tmsa-shares and tmsa-wide rows); the other cases take the plan the card chose
SETTINGS = {"attention ffhq64-level0-B64 shares": ("_attention_plans", "BWD_PLAN", "shares"),
            "attention ffhq64-level0-B64 wide": ("_attention_plans", "BWD_PLAN", "wide")}
TINY_CPU = {"attention": [(1, 2, (4, 4), None, 16), (1, 2, (8, 8), (4, 4), 16)],
            "time_qkv": [(2, 8, 64, 4, 32)], "adaln_norm": [(2, 8, 64)]}
WARMUP = 3  # fwd+bwd calls before the profiled one: compiles and autotuning


def _attention(shape, dtype, device) -> Tuple[Callable[[], object], List[torch.Tensor]]:
    from diffit_kernels import tmsa_attention

    B, H, grid, window, d = shape
    N = grid[0] * grid[1]
    gh, gw = window or grid
    # q, k, v as views of one [B, N, 3, H, d] tensor: time_qkv's output layout, as in the model
    qkv = torch.randn(B, N, 3, H, d, device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    table = (torch.randn((2 * gh - 1) * (2 * gw - 1), H, device=device) * 0.02).to(
        dtype).requires_grad_()
    leaves = [q, k, v, table]

    def step():
        o = tmsa_attention(q, k, v, table=table, grid=grid, window=window, backend="triton")
        return torch.autograd.grad(o, leaves, torch.ones_like(o))

    return step, leaves


def _time_qkv(shape, dtype, device):
    from diffit_kernels import time_qkv

    B, N, C, H, Ct = shape

    def r(*size, scale=1.0):
        return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_()

    t = {"x": r(B, N, C), "temb": r(B, Ct), "weight": r(3 * C, C, scale=C ** -0.5),
         "bias": r(3 * C, scale=0.02), "temb_weight": r(3 * C, Ct, scale=Ct ** -0.5),
         "temb_bias": r(3 * C, scale=0.02)}
    leaves = list(t.values())

    def step():
        outs = time_qkv(**t, num_heads=H, norm_eps=1e-6, backend="triton")
        return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    return step, leaves


def _adaln_norm(shape, dtype, device):
    from diffit_kernels import adaln_norm

    B, N, C = shape
    x = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
    # the model's residual stream is float32 under autocast, the branch 16-bit
    res = torch.randn(B, N, C, device=device, requires_grad=True)
    proj = (torch.randn(B, 3 * C, device=device) * 0.1).to(dtype).requires_grad_()
    shift, scale, gate = proj.chunk(3, dim=1)
    leaves = [x, res, proj]

    def step():
        y, h = adaln_norm(x, shift, scale, residual=res, gate=gate, activation="silu",
                          backend="triton")
        return torch.autograd.grad((y, h), leaves, (torch.ones_like(y), torch.ones_like(h)))

    return step, leaves


BUILDERS: Dict[str, Callable] = {"attention": _attention, "time_qkv": _time_qkv,
                                 "adaln_norm": _adaln_norm}


def setting(name: str):
    """The case's attention setting (SETTINGS), restored afterwards; none for other cases."""
    from benchmarks.common import attention_setting

    return attention_setting(SETTINGS.get(name))


def cases(names: Sequence[str] = (), tiny_cpu: bool = False) -> List[Tuple[str, str, tuple]]:
    """The (name, op, shape) list to run: CASES, or the names asked (ValueError naming the
    unknown ones), or the tiny CPU shapes."""
    if tiny_cpu:
        return [(f"{op} tiny{i}", op, s) for op, shapes in TINY_CPU.items()
                for i, s in enumerate(shapes)]
    known = {c[0]: c for c in CASES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--cases: unknown {unknown}; known: {list(known)}")
    return [known[n] for n in names] if names else list(CASES)


def run(names: Sequence[str] = (), tiny_cpu: bool = False) -> List[str]:
    """Warm up every case, then profile one fwd+bwd of each; returns the case names in the
    order their launches were profiled (ncu's result IDs follow it)."""
    device = torch.device("cpu" if tiny_cpu else "cuda")
    dtype = torch.bfloat16
    todo = cases(names, tiny_cpu)
    steps = []
    for name, op, shape in todo:
        torch.manual_seed(0)
        step, _ = BUILDERS[op](shape, dtype, device)
        with setting(name):
            for _ in range(1 if tiny_cpu else WARMUP):
                step()
        steps.append((name, step))
    done = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    for name, step in steps:
        rng = torch.cuda.nvtx.range(name) if cuda else contextlib.nullcontext()
        if cuda:
            torch.cuda.profiler.start()
        with rng, setting(name):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        done.append(name)
        print(f"profiled: {name}", flush=True)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ncu_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--tiny-cpu", action="store_true",
                   help="tiny shapes on CPU tensors, no profiler range (the harness check)")
    args = p.parse_args(argv)
    if not args.tiny_cpu and not torch.cuda.is_available():
        print("benchmarks.ncu_kernels: needs a CUDA device (--tiny-cpu checks the harness "
              "on CPU)")
        return 2
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    run(names, args.tiny_cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
