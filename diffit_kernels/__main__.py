"""Command line: `python -m diffit_kernels check | report`.

check   every op with a kernel against the reference on random inputs (Triton on CUDA, the
        interpreter on CPU), a table of max errors per output and gradient, then the report.
report  every kernel config compiled for sm_80 and sm_90a (and the tensor-core kernels for
        Blackwell, sm_100a / sm_120a) without a GPU: registers, spills, shared memory,
        tensor-core instructions.
The interpreter and the compiler cannot share a process, so each part runs in its own.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys


def _sub(args, interpret: bool) -> int:
    env = dict(os.environ)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.call([sys.executable, "-m", "diffit_kernels", *args], env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffit_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="kernels vs the reference, then the compile report")
    c.add_argument("--no-report", action="store_true", help="skip the compile report")
    sub.add_parser("report", help="compile every kernel config for sm_80, sm_90a (and "
                   "Blackwell: the tensor-core kernels)")
    sub.add_parser("_numerics", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.cmd == "report":
        from ._aot import run_report

        rows = run_report()
        return 1 if any(r.problems for r in rows) else 0

    if args.cmd == "_numerics":
        import torch

        from ._check import run_check
        from .testing import autotuner_repeats, interpreter_guard, interpreter_problem

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        problem = interpreter_problem() if device.type == "cpu" else None
        if problem:
            print(f"numerics not checked: {problem}")
            return 1
        where = (f"CUDA ({torch.cuda.get_device_name()})" if device.type == "cuda"
                 else "CPU tensors under the Triton interpreter (TRITON_INTERPRET=1), with "
                      "what a card would get wrong made to fail (races, out-of-bounds and "
                      "undefined lanes, false hints, autotuner repeats)")
        print(f"Kernels vs the reference on {where}; torch {torch.__version__}")
        with contextlib.ExitStack() as guards:
            if device.type == "cpu":
                guards.enter_context(interpreter_guard())
                guards.enter_context(autotuner_repeats())
            return 0 if run_check(device) else 1

    # check: numerics in a process of its own (with the interpreter when there is no CUDA)
    import torch

    rc = _sub(["_numerics"], interpret=not torch.cuda.is_available())
    if not args.no_report:
        print()
        rc |= _sub(["report"], interpret=False)
    print("\ncheck:", "all within bounds" if rc == 0 else "FAILURES above")
    return rc


if __name__ == "__main__":
    sys.exit(main())
