"""`python -m diffit sample`: class-conditional samples from latent DiffiT.

Writes, under --out (a directory):
    samples_<N>x<H>x<W>x3.npz   ADM evaluator layout: arr_0 uint8 [N, H, W, 3], arr_1 labels [N]
    grid.png                    the first --grid samples in a square grid
or with --latents-only (no VAE needed):
    latents_<N>x<C>x<h>x<w>.npz arr_0 float32 [N, C, h, w] (VAE latents times 0.18215),
                                arr_1 labels [N]
Under torchrun the samples are split across ranks (rank r draws samples r, r + W, ...) and
gathered on rank 0, which writes the files. Every file is written atomically.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

LATENT_SCALE = 0.18215
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="sample images (or latents) from latent DiffiT",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", type=Path,
                     help="official-layout checkpoint (.safetensors or .pt)")
    src.add_argument("--random-init", action="store_true",
                     help="no checkpoint: a randomly initialised --model (smoke tests)")
    src.add_argument("--model", default=None,
                     help="preset (DiffiT-XL/2, -L/2, -B/2, -S/2, DiffiT-tiny): the model for "
                          "--random-init, or what the checkpoint must match (default: inferred "
                          "from the checkpoint)")
    src.add_argument("--num-classes", type=int, default=None,
                     help="number of classes (default: the checkpoint's or the preset's)")
    src.add_argument("--image-size", type=int, default=256,
                     help="image side in pixels; the latent side is image-size / 8 (released: "
                          "256, 512)")
    src.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    src.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                     help="autocast dtype for the model")
    src.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    smp = p.add_argument_group("sampling")
    smp.add_argument("--num-samples", type=int, default=16)
    smp.add_argument("--batch-size", type=int, default=8, help="samples per forward (per rank)")
    smp.add_argument("--cfg-scale", type=float, default=None,
                     help="guidance scale (default: 4.4 at latent size <= 32, else 1.49, as "
                          "released); 1 disables guidance")
    smp.add_argument("--cfg-schedule", default="auto", choices=("auto", "power-cosine",
                                                                 "constant"),
                     help="auto: power-cosine ramp at latent size <= 32, constant above")
    smp.add_argument("--guide-all-channels", action="store_true",
                     help="guide every eps channel (released: channels 0-2 only)")
    smp.add_argument("--steps", default="250",
                     help='respaced steps: "250" (ancestral DDPM) or "ddim50" (DDIM)')
    smp.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    smp.add_argument("--labels", default=None,
                     help="comma-separated class labels, cycled (default: uniform random)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--no-progress", action="store_true")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output directory")
    out.add_argument("--latents-only", action="store_true",
                     help="skip the VAE and write the latents")
    out.add_argument("--vae", default=DEFAULT_VAE,
                     help="diffusers AutoencoderKL id or local directory")
    out.add_argument("--grid", type=int, default=64, help="samples in grid.png")
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"diffit sample: error: {msg}", file=sys.stderr)
    return 2


def _dist_setup(device_arg):
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _gather(t, n_total: int, rank: int, world: int):
    """Rank r holds samples r, r + W, ...; every rank returns all n_total in order."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return t
    per = math.ceil(n_total / world)
    padded = torch.zeros((per, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded)
    out = torch.empty((n_total, *t.shape[1:]), dtype=t.dtype, device=t.device)
    for r in range(world):
        out[r::world] = bufs[r][: len(range(r, n_total, world))]
    return out


def _load_vae(name: str, device):
    """diffusers' AutoencoderKL, or a RuntimeError that says what is missing and what to do."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise RuntimeError(
            "decoding latents needs the optional `diffusers` package, which is not installed "
            "(pip install 'diffit-kernels[vae]'); run with --latents-only to write the latents "
            f"instead ({e})") from e
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise RuntimeError(
            f"could not load the VAE {name!r} (not downloadable here or not a diffusers "
            f"AutoencoderKL: {type(e).__name__}: {e}); pass --vae with a local copy, or run "
            "with --latents-only to write the latents instead") from e


def _grid_png(images, path: Path, n: int) -> None:
    """Square grid (2 px black padding) of uint8 [N, H, W, 3] images, written atomically."""
    import numpy as np
    from PIL import Image

    from .checkpoint import atomic_path

    imgs = images[:n]
    k, (H, W) = len(imgs), imgs.shape[1:3]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    pad = 2
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H,
             pad + c * (W + pad): pad + c * (W + pad) + W] = im
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def _save_npz(path: Path, **arrays) -> None:
    import numpy as np

    from .checkpoint import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)


def _build_model(args, latent: int):
    from .latent import DiffiT, preset_config

    over = dict(backend=args.backend)
    if args.num_classes is not None:
        over["num_classes"] = args.num_classes
    if args.checkpoint is not None:
        config = None if args.model is None else preset_config(args.model, input_size=latent)
        model = DiffiT.from_pretrained(args.checkpoint, config, **over)
        if model.input_size != latent:
            raise ValueError(
                f"--image-size {args.image_size} needs latent size {latent}, but "
                f"{args.checkpoint} was trained at latent size {model.input_size} "
                f"(image size {model.input_size * 8})")
        return model
    if not args.random_init:
        raise ValueError("pass --checkpoint PATH (an official-layout DiffiT checkpoint), or "
                         "--random-init with a small --model preset for a smoke test")
    if args.model is None:
        raise ValueError("--random-init needs --model (a preset such as DiffiT-tiny)")
    return DiffiT(config=preset_config(args.model, input_size=latent, **over))


def run(args) -> int:
    import numpy as np
    import torch

    from .diffusion import create_diffusion

    if args.num_samples < 1 or args.batch_size < 1:
        return _fail(f"--num-samples ({args.num_samples}) and --batch-size ({args.batch_size}) "
                     "must be >= 1")
    if args.image_size % 16:
        return _fail(f"--image-size must be a multiple of 16 (VAE factor 8 x patch 2), "
                     f"got {args.image_size}")
    latent = args.image_size // 8
    rank, world, device = _dist_setup(args.device)
    try:
        model = _build_model(args, latent)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        return _fail(str(e))
    model = model.to(device).eval()
    vae = None
    if not args.latents_only:
        try:
            vae = _load_vae(args.vae, device)
        except RuntimeError as e:
            return _fail(str(e))

    steps = str(args.steps)
    try:
        diffusion = create_diffusion(steps, learn_sigma=model.learn_sigma)
    except ValueError as e:
        return _fail(f"--steps {steps!r}: {e}")
    sample_loop = diffusion.ddim_sample_loop if steps.startswith("ddim") \
        else diffusion.p_sample_loop
    loop_kw = {"eta": args.eta} if steps.startswith("ddim") else {}

    # labels for all samples are drawn identically on every rank, so sharding does not change
    # which sample gets which class
    N, K = args.num_samples, model.num_classes
    if K > 0:
        if args.labels:
            given = [int(s) for s in args.labels.split(",") if s.strip()]
            if any(not 0 <= g < K for g in given):
                return _fail(f"--labels must lie in [0, {K}), got {given}")
            labels = torch.tensor([given[i % len(given)] for i in range(N)])
        else:
            labels = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(args.seed))
    else:
        labels = torch.full((N,), -1)
    cfg = args.cfg_scale if args.cfg_scale is not None else (4.4 if latent <= 32 else 1.49)
    guided = K > 0 and cfg != 1.0

    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    mine = list(range(rank, N, world))
    outs = []
    start = time.perf_counter()
    for b0 in range(0, len(mine), args.batch_size):
        idx = mine[b0: b0 + args.batch_size]
        y = labels[idx].to(device)
        # x_T of sample i depends only on (seed, i): DDIM (eta 0) output does not change with
        # the number of ranks or the batch size
        z = torch.stack([torch.randn((model.in_channels, latent, latent),
                                     generator=torch.Generator().manual_seed(
                                         args.seed * 1_000_003 + i)) for i in idx]).to(device)
        if guided:
            z = torch.cat([z, z])
            y = torch.cat([y, torch.full_like(y, K)])                  # null class row
            fn = model.forward_with_cfg
            kw = dict(y=y, cfg_scale=cfg, schedule=args.cfg_schedule,
                      guidance_channels="all" if args.guide_all_channels else 3)
        else:
            fn, kw = model.forward, (dict(y=y) if K > 0 else {})
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32,
                                             enabled=amp is not None):
            x = sample_loop(fn, z.shape, noise=z, model_kwargs=kw, device=device,
                            progress=not args.no_progress and rank == 0, generator=gen, **loop_kw)
            x = x[: len(idx)].float()
            if vae is not None:
                img = vae.decode(x / LATENT_SCALE).sample                 # [b, 3, H, W] in [-1, 1]
                x = ((img.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                x = x.permute(0, 2, 3, 1).contiguous()                   # [b, H, W, 3]
        outs.append(x)
    local = torch.cat(outs) if outs else None
    if local is None:  # more ranks than samples
        shape = (0, args.image_size, args.image_size, 3) if vae is not None else \
            (0, model.in_channels, latent, latent)
        local = torch.empty(shape, dtype=torch.uint8 if vae is not None else torch.float32,
                            device=device)
    allx = _gather(local, N, rank, world)
    elapsed = time.perf_counter() - start

    if rank == 0:
        print(f"{N} samples in {elapsed:.1f} s ({N / elapsed:.3g} samples/s, {world} rank(s), "
              f"{diffusion.num_timesteps} steps{', guided' if guided else ''})")
        arr = allx.cpu().numpy()
        lab = labels.numpy().astype(np.int64)
        args.out.mkdir(parents=True, exist_ok=True)
        if vae is None:
            path = args.out / ("latents_" + "x".join(map(str, arr.shape)) + ".npz")
            _save_npz(path, arr_0=arr.astype(np.float32), arr_1=lab)
            print(f"wrote {path} ({N} latents, {model.in_channels}x{latent}x{latent})")
        else:
            path = args.out / ("samples_" + "x".join(map(str, arr.shape)) + ".npz")
            _save_npz(path, arr_0=arr, arr_1=lab)
            print(f"wrote {path}")
            try:
                _grid_png(arr, args.out / "grid.png", args.grid)
                print(f"wrote {args.out / 'grid.png'}")
            except ImportError:
                print("grid.png skipped: writing PNG needs pillow (pip install pillow)",
                      file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0
