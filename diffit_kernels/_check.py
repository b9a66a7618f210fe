"""`python -m diffit_kernels check`: every op with a kernel against the reference.

Each op module exposes `check_cases(device)`: a few shapes with fresh random inputs. Every case
runs in fp32, fp16 and bf16 through the Triton backend (compiled on CUDA, the interpreter on
CPU) and the reference, and one row per output and gradient gives the max error and the bound
of the numerics rule (diffit_kernels.testing).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Sequence

import torch

from .testing import parity

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class CheckCase:
    op: str                                   # public op name
    label: str                                # shape / options, e.g. "B2 N63 C1152 res+gate+silu"
    fn: Callable                              # the public op
    ref: Callable                             # its reference
    leaves: Callable[[], Dict[str, torch.Tensor]]   # fresh float32 inputs
    build: Callable[[Dict[str, torch.Tensor]], dict]
    out_names: Sequence[str]
    grad_leaves: Sequence[str]
    op_kwargs: dict = dataclasses.field(default_factory=dict)


def run_check(device: torch.device, printer=print) -> bool:
    from . import OP_MODULES

    ok = True
    head = f"{'op':16} {'case':40} {'dtype':9} {'tensor':10} {'max err':>10} {'bound':>10}  status"
    printer(head)
    printer("-" * len(head))
    for mod in OP_MODULES:
        for case in mod.check_cases(device):
            for dtype in DTYPES:
                t0 = time.perf_counter()
                rows = parity(case.fn, case.ref, case.leaves(), case.build, dtype=dtype,
                              out_names=case.out_names, grad_leaves=case.grad_leaves,
                              op_kwargs={"backend": "triton", **case.op_kwargs})
                dt = time.perf_counter() - t0
                for r in rows:
                    ok &= r.ok
                    printer(f"{case.op:16} {case.label[:40]:40} {r.dtype:9} {r.name:10} "
                            f"{r.err:10.3e} {r.bound:10.3e}  {'ok' if r.ok else 'FAIL'}")
                printer(f"{'':16} {'':40} {'':9} {'(time)':10} {dt:9.2f}s")
    return ok
