"""`python -m diffit check`: our kernels against the reference on a model's own op calls.

One forward of the model with our kernels on a batch (random inputs at the model's shapes;
gradients on unless --forward-only), every distinct call of our ops in it recorded, then each
call checked against the reference on its own inputs, strides and arguments by the
numerics rule (FlashAttention's, as the tests apply it; an attention call once per table read
and backward plan it can take, as a card may pick any): the op in the call's precision against
the reference in float32, within twice (outputs) or three times (gradients) the reference's
own error in that precision and its rounding near the data (float32: 2e-5 of the largest
value, summation order only). This is the check the training and sampling commands run on
the card before they time our kernels (diffit.accel.check_kernels), with its table printed.

    python -m diffit check --model DiffiT-XL/2 --image-size 512      # a random-init model
    python -m diffit check --checkpoint runs/ffhq64 --precision bf16  # trained weights

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (slow: small presets). Exit status 1 when a
call fails the rule, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="our kernels against the reference on a model's own "
                              "op calls (shapes, layouts, precision)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="run directory, trainer checkpoint or state dict (as `sample` takes); "
                        "default: a randomly initialised --model")
    p.add_argument("--weights", choices=("ema", "model"), default=None,
                   help="trainer checkpoints: the EMA weights (default) or the training weights")
    p.add_argument("--model", default=None,
                   help="preset (DiffiT-XL/2, ..., DiffiT-tiny; cifar10, ffhq64, tiny)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (latent models: 8 x the latent side; default: "
                        "the model's, 256 for a random latent model)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="samples in the forward (a run's per-GPU batch checks the very work "
                        "splits and backward plans the run takes)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype of the forward, as training runs it")
    p.add_argument("--forward-only", action="store_true",
                   help="no gradients (what sampling runs)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"diffit check: error: {msg}", file=sys.stderr)
    return 2


def _inputs(model, family: str, side: int, batch: int, device, gen):
    """Random (x, noise label or timestep, labels) at the model's shapes."""
    import torch

    x = torch.randn(batch, model.config.in_channels, side, side, generator=gen).to(device)
    if family == "latent":
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    else:
        t = torch.randn(batch, generator=gen).to(device)
    k = model.config.num_classes
    y = torch.randint(0, k, (batch,), generator=gen).to(device) if k > 0 else None
    return x, t, y


def run(args) -> int:
    import torch

    from . import accel
    from .sample import _check_sizes, _prepare
    from diffit_kernels import testing

    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = argparse.Namespace(checkpoint=args.checkpoint, weights=args.weights,
                             random_init=args.checkpoint is None, model=args.model,
                             num_classes=args.num_classes, image_size=args.image_size,
                             backend="triton", latents_only=False)
    try:
        model, ck, family, latent_space = _prepare(src)
        source = ck.path if ck is not None else f"the random {args.model}"
        side = _check_sizes(src, model, family, latent_space, source)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        return _fail(str(e))
    model = model.to(device).eval()  # dropout off: the calls' shapes are training's
    if family == "image":  # as trained and sampled: channels-last activations
        model = model.to(memory_format=torch.channels_last)
    amp = accel.amp_dtype(args.precision)
    x, t, y = _inputs(model, family, side, args.batch_size, device,
                      torch.Generator().manual_seed(args.seed))
    accel.set_backend([model], "triton")
    try:
        with testing.record_calls() as calls, torch.set_grad_enabled(not args.forward_only), \
                accel.autocast(device, amp):
            model(x, t, y)
    except RuntimeError as e:  # e.g. our kernels cannot run on this device
        return _fail(f"the forward with our kernels failed: {e}")
    what = ck.describe() if ck is not None else f"randomly initialised {args.model}"
    print(f"diffit check: {what}, {args.batch_size} samples of {side}x{side}, "
          f"{args.precision}, {'forward' if args.forward_only else 'forward + backward'} on "
          f"{accel.device_name(device)}: {len(calls)} distinct calls of our ops", flush=True)
    head = f"  {'tensor':36} {'dtype':9} {'max err':>10} {'bound':>10} {'eager err':>10}  status"
    failed = 0
    with accel.exact_float32():
        for i, call in enumerate(calls, 1):
            print(f"[{i}] {call.op}: {call.label()}")
            print(head)
            for r in testing.check_call(call, seed=args.seed, every_variant=True):
                failed += not r.ok
                print(f"  {r.name:36} {r.dtype:9} {r.err:10.3e} {r.bound:10.3e} "
                      f"{r.pt_err:10.3e}  {'ok' if r.ok else 'FAIL'}", flush=True)
    if failed:
        print(f"diffit check: {failed} tensors beyond the numerics rule: our kernels compute "
              f"the wrong thing here; please report it (with this output)")
        return 1
    print("diffit check: every output and gradient within the numerics rule")
    return 0
