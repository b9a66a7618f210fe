"""Host work of one training step, counted on any machine: the PyTorch ops (each one a kernel
launch and dispatcher work on a GPU) and the Triton launches a DiffiT training step issues,
with our kernels' launches stubbed out, on CPU tensors.

Why: the H200 found the step host-bound (the GPU idle 149 of 233 ms with our ops eager, 108 of
186 inside regional torch.compile; benchmarks/results/nvidia-h200/). What the host does per step
does not need a GPU to count: the same Python runs, only the launches are skipped. The model is
the preset's depth and layout at a tiny width (so CPU arithmetic is negligible and the count is
the code path's, not the shapes'), under bf16 autocast like the training default, with the
launch plans of a 132-SM card (an H100 / H200).

    python -m benchmarks.host_ops [--model DiffiT-XL/2] [--provider ours|eager] [--top 20]

prints the non-view aten ops and the Triton launches per step, each grouped by where in our
code they come from. Views (view, t, permute, ...) are counted apart: they launch nothing.
No timing: host speed differs ~1.5x between machines of one kind; the counts do not.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import traceback
from pathlib import Path
from typing import Dict, Iterator

import torch
import torch.nn.functional as F

# aten ops that only make views or read metadata: no kernel on a GPU
VIEWS = frozenset({
    "aten.view", "aten.t", "aten.detach", "aten.transpose", "aten.permute", "aten.expand",
    "aten._unsafe_view", "aten.unbind", "aten.select", "aten.slice", "aten.alias",
    "aten.as_strided", "aten.unsqueeze", "aten.squeeze", "aten._reshape_alias",
    "aten.promote_types", "aten.split", "aten.chunk", "aten.split_with_sizes",
})
ROOT = str(Path(__file__).resolve().parents[1])


@contextlib.contextmanager
def stubbed_launches() -> Iterator[collections.Counter]:
    """Every @triton.jit launch becomes a no-op counted by kernel name; our ops take their
    Triton path on CPU tensors with a 132-SM card's launch plans (one config per kernel)."""
    from triton.runtime import jit

    from diffit_kernels import attention, norm
    from diffit_kernels.testing import triton_path_anywhere

    launches: collections.Counter = collections.Counter()

    def run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1

    saved = jit.JITFunction.run
    jit.JITFunction.run = run
    try:
        with triton_path_anywhere(), attention._emulate_card(132, elt=2), \
                norm._emulate_card(132, pick=0):
            yield launches
    finally:
        jit.JITFunction.run = saved


def _site() -> str:
    """file:function of the innermost frame of this repository outside this module."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if f.filename.startswith(ROOT) and not f.filename.endswith("host_ops.py"):
            return f"{Path(f.filename).name}:{f.name}"
    return "(autograd engine / optimizer)"


def count_step(model_name: str = "DiffiT-XL/2", provider: str = "ours", width: int = 64,
               heads: int = 8) -> Dict[str, object]:
    """One training step's host work (the second step: the optimizer state exists).
    Returns {"aten": Counter of non-view ops by site, "aten_ops": Counter by op,
    "aten_site_ops": Counter by (site, op), "views": int, "launches": Counter by kernel}."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from diffit.latent import DiffiT
    from diffit.unet import DiffiTUNet

    torch.manual_seed(0)
    backend = "triton" if provider == "ours" else "torch"
    if model_name in ("ffhq64", "cifar10", "tiny"):
        model = DiffiTUNet.from_preset(model_name, backend=backend, head_dim=8).to(
            memory_format=torch.channels_last)  # as the trainer builds it
        size = model.config.image_size
        x = torch.randn(1, model.config.in_channels, size, size)
        inputs = (x, torch.rand(1))
    else:
        # the 256 px latent (32 x 32, a 16 x 16 token grid): the grid picks the table's path
        model = DiffiT.from_preset(model_name, input_size=32, hidden_size=width,
                                   num_heads=heads, backend=backend)
        x = torch.randn(1, model.in_channels, 32, 32)
        inputs = (x, torch.randint(0, 1000, (1,)), torch.randint(0, model.num_classes, (1,)))
    target = torch.randn(1, model.out_channels, *x.shape[2:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as training on CUDA

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*inputs)
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    by_site: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    by_site_op: collections.Counter = collections.Counter()
    views = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in VIEWS:
                views[0] += 1
            else:
                site = _site()
                by_site[site] += 1
                by_op[name] += 1
                by_site_op[site, name] += 1
            return func(*args, **(kwargs or {}))

    ctx = stubbed_launches() if provider == "ours" else contextlib.nullcontext(
        collections.Counter())
    with ctx as launches:
        step()
        launches.clear()
        with Count():
            step()
    return {"aten": by_site, "aten_ops": by_op, "aten_site_ops": by_site_op, "views": views[0],
            "launches": launches}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiffiT-XL/2",
                   help="latent preset (DiffiT-XL/2, ...) or U-Net preset (ffhq64, cifar10)")
    p.add_argument("--provider", default="ours", choices=("ours", "eager"))
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    r = count_step(args.model, args.provider)
    aten, launches = r["aten"], r["launches"]
    print(f"{args.model} training step, {args.provider}: {sum(aten.values())} non-view aten ops, "
          f"{sum(launches.values())} Triton launches, {r['views']} views")
    print("aten ops by site:")
    for site, n in aten.most_common(args.top):
        print(f"  {n:6d}  {site}")
    print("aten ops by op:")
    for op, n in r["aten_ops"].most_common(args.top):
        print(f"  {n:6d}  {op}")
    if launches:
        print("Triton launches by kernel:")
        for k, n in launches.most_common():
            print(f"  {n:6d}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
