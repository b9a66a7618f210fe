"""Randomized parity under the interpreter: tmsa_attention, adaln_norm and time_qkv on random
shapes, layouts, dtypes, backward plans and table reads, with the launch lists and work splits
of emulated cards (SM counts, autotune picks), each against the reference by the tests' rule.
The parametrized tests cover the cases chosen by hand; this draws the combinations nobody
listed (it found the one-channel LayerNorm that the float32 rule then changed for).

    TRITON_INTERPRET=1 python tests/fuzz.py [--op attention|slabs|rows|all] [--seconds 600]
        [--seed 0]

prints each failure with the case that made it and exits 1 if any failed. A test runs a few
cases of each family (test_fuzz.py)."""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from diffit_kernels import _attention_plans as AP  # noqa: E402
from diffit_kernels import attention as A  # noqa: E402
from diffit_kernels import norm  # noqa: E402
from diffit_kernels.testing import module_setting  # noqa: E402

PLANS = (None, "shares", "samples", "separate", "separate-64", "wide")
BIASES = ("H", "B", "1H", "B1", "NN", "B11N")  # (1HN1, constant along keys: see below)


def attention_case(rng: random.Random) -> Tuple[str, Callable[[], None]]:
    """Any geometry (global with a table up to 12x12, windows up to 8x8, no bias, a dense
    bias), any head dim, packed or separate q / k / v, the interpreter's lists or a card's
    16-bit / float32 ones. A bias of shape [1, H, N, 1] is left out: it is constant along the
    keys, so its true gradient is 0, and ours (delta from the 16-bit output, as FlashAttention
    computes it) is ~3x eager bf16's noise, just past the rule's bound."""
    from test_attention import _check

    B, H = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    D = rng.choice([8, 16, 24, 40, 64, 72, 80, 128])
    kind = rng.choice(["global", "win", "plain", "bias"])
    if kind == "global":
        gh, gw = rng.randint(1, 12), rng.randint(1, 12)
        kw, N = dict(grid=(gh, gw), table=True), gh * gw
    elif kind == "win":
        wh, ww, nh, nw = rng.randint(1, 8), rng.randint(1, 8), rng.randint(1, 2), rng.randint(1, 2)
        kw = dict(grid=(wh * nh, ww * nw), window=(wh, ww), table=rng.random() < 0.8)
        N = wh * nh * ww * nw
    else:
        N = rng.randint(1, 150 if kind == "plain" else 100)
        kw = dict(bias=rng.choice(BIASES)) if kind == "bias" else {}
    kw["packed"] = rng.random() < 0.5
    elt, pick, sms = rng.choice([2, 4, None]), rng.randint(0, 5), rng.choice([1, 2, 20, 132])
    dtype = torch.float32
    if elt is None and rng.random() < 0.5:
        dtype = rng.choice([torch.float16, torch.bfloat16])
    plan = rng.choice(PLANS)
    return (f"attention B{B} H{H} N{N} D{D} {kw} card elt={elt} pick={pick} sms={sms} "
            f"plan={plan} {dtype}"), lambda: _attention(_check, dtype, B, H, N, D, kw, elt,
                                                        pick, sms, plan, None)


def slabs_case(rng: random.Random) -> Tuple[str, Callable[[], None]]:
    """16-bit attention where the fast paths live: global grids 16 or 32 wide (the table read
    through its slabs, or gathered), 4x4 / 8x4 / 8x8 windows (whole tiles: EVEN), a card's
    16-bit lists or the interpreter's."""
    from test_attention import _check

    B, H, D = rng.choice([1, 2, 3]), rng.choice([1, 2]), rng.choice([16, 32, 64, 72])
    if rng.random() < 0.6:
        gw = rng.choice([16, 32])
        kw = dict(grid=(rng.randint(1, 128 // gw), gw), table=True)
    else:
        w = rng.choice([(8, 8), (4, 4), (8, 4)])
        kw = dict(grid=(w[0] * rng.randint(1, 2), w[1] * rng.randint(1, 2)), window=w,
                  table=True)
    N = kw["grid"][0] * kw["grid"][1]
    kw["packed"] = rng.random() < 0.5
    dtype = rng.choice([torch.float16, torch.bfloat16])
    elt = 2 if rng.random() < 0.7 else None
    pick, sms = rng.randint(0, 5), rng.choice([2, 20, 132])
    plan, read = rng.choice(PLANS), rng.choice([None, "slabs", "gather"])
    desc = (f"attention B{B} H{H} N{N} D{D} {kw} card elt={elt} pick={pick} sms={sms} "
            f"plan={plan} read={read} {dtype}")
    return desc, lambda: _attention(_check, dtype, B, H, N, D, kw, elt, pick, sms, plan, read)


def _attention(check, dtype, B, H, N, D, kw, elt, pick, sms, plan, read) -> None:
    with module_setting(AP, "BWD_PLAN", plan), module_setting(A, "TABLE_READ", read):
        if elt is None:
            check(dtype, B, H, N, D, **kw)
        else:
            with A._emulate_card(sms, elt=elt, pick=pick):
                check(dtype, B, H, N, D, **kw)


def rows_case(rng: random.Random) -> Tuple[str, Callable[[], None]]:
    """adaln_norm (any feature set, widths from 1 to past the backward's chunking, a card's
    row splits and autotune picks) or time_qkv (LayerNorm, time term and biases on or off)."""
    import test_adaln_norm as TA
    import test_time_qkv as TQ

    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    B, N = rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 7, 33, 100])
    strided = rng.random() < 0.3
    if rng.random() < 0.5:
        C = rng.choice([1, 8, 24, 40, 72, 100, 130, 1152, 2056])
        res, gate, shift, scale, silu = (rng.random() < 0.5 for _ in range(5))
        feats = (res, gate and res, shift, scale, silu)  # a gate needs a residual
        sms, pick = rng.choice([None, 2, 58, 132]), rng.choice([None, 0, 1, 2, 3, 4, 5, 6])

        def run():
            with norm._emulate_card(sms, pick):
                TA._run(dtype, B, N, C, *feats, strided_x=strided)
        return f"adaln_norm B{B} N{N} C{C} {feats} sms={sms} pick={pick} {dtype}", run
    H, d, C = rng.choice([1, 2, 3]), rng.choice([8, 16, 24, 72]), rng.choice([8, 40, 72, 144])
    kw = dict(ln=rng.random() < 0.7, temb=rng.random() < 0.7, bias=rng.random() < 0.7,
              temb_bias=rng.random() < 0.5, strided_x=strided)
    return (f"time_qkv B{B} N{N} C{C} H{H} d{d} {kw} {dtype}",
            lambda: TQ._run(dtype, B, N, C, H, CP=H * d, **kw))


FAMILIES = {"attention": attention_case, "slabs": slabs_case, "rows": rows_case}


def fuzz(families, seconds: float = 0.0, cases: int = 0, seed: int = 0, out=print) -> int:
    """Draw cases of the families in turn until `seconds` or `cases` run out; returns the
    number that failed, each printed with its case."""
    rng = random.Random(seed)
    t0, n, failed = time.time(), 0, 0
    while (cases and n < cases) or (seconds and time.time() - t0 < seconds):
        desc, run = FAMILIES[families[n % len(families)]](rng)
        try:
            run()
        except Exception as e:  # noqa: BLE001 - every failure is reported with its case
            failed += 1
            out(f"FAIL {desc}\n  {type(e).__name__}: {str(e)[:2000]}")
        n += 1
        if n % 20 == 0:
            out(f"{n} cases, {failed} failed, {time.time() - t0:.0f} s")
    out(f"{n} cases, {failed} failed")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default="all", choices=[*FAMILIES, "all"])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        p.error("run it under the interpreter: TRITON_INTERPRET=1 python tests/fuzz.py")
    families = list(FAMILIES) if args.op == "all" else [args.op]
    return 1 if fuzz(families, seconds=args.seconds, seed=args.seed,
                     out=lambda s: print(s, flush=True)) else 0


if __name__ == "__main__":
    sys.exit(main())
