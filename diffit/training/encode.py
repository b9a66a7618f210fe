"""`python -m diffit encode`: images -> SD VAE latents for training latent DiffiT.

    python -m diffit encode --data-path imagenet/train --image-size 256 --out latents.pt

Reads an image folder (labels from first-level subfolders, as the `folder` training data),
centre-crops and resizes to --image-size, encodes with the Stable Diffusion VAE
(`stabilityai/sd-vae-ft-ema` through `diffusers`, as the official DiffiT release), multiplies by
0.18215 and writes, atomically, a torch file
    {"latents": float16 [N, 4, S/8, S/8], "labels": int64 [N], "classes": [names],
     "scale": 0.18215, "vae": name, "image_size": S}
which `python -m diffit train --data latents --data-path latents.pt` reads. --flip also encodes
the mirrored images (2N latents), the usual way to get flip augmentation on fixed latents.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..progress import progress_bar

LATENT_SCALE = 0.18215
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


class VAEUnavailable(RuntimeError):
    """The VAE cannot be loaded: diffusers missing, or the weights not downloadable / present."""


def load_vae(name: str, device):
    """diffusers' AutoencoderKL `name` (hub id or local directory) in eval mode on device, or
    VAEUnavailable saying what is missing and what to do."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise VAEUnavailable(
            "the SD VAE needs the optional `diffusers` package, which is not installed: "
            "pip install 'diffit-kernels[vae]' (or pip install diffusers safetensors)"
            f" [{type(e).__name__}: {e}]") from e
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as e:
        raise VAEUnavailable(
            f"could not load the VAE {name!r}: {type(e).__name__}: {e}. Without internet "
            "access, download it elsewhere (e.g. `huggingface-cli download "
            f"{DEFAULT_VAE} --local-dir sd-vae-ft-ema`), copy the folder here and pass "
            "--vae sd-vae-ft-ema") from e
    return vae.to(device).eval().requires_grad_(False)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("encode", help="encode an image folder to SD VAE latents",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, type=Path, help="image folder")
    p.add_argument("--out", required=True, type=Path, help="output .pt file")
    p.add_argument("--image-size", type=int, default=256,
                   help="image side in pixels (a multiple of 8; 256 and 512 as released)")
    p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL id or directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--flip", action="store_true", help="also encode mirrored images")
    p.add_argument("--mode", choices=("sample", "mean"), default="sample",
                   help="draw from the VAE posterior (as DiT's training does) or take its mean")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="VAE compute dtype on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"diffit encode: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from ..accel import amp_dtype, autocast
    from ..checkpoint import save_object
    from .data import ImageFolderDataset

    if args.image_size < 8 or args.image_size % 8:
        return _fail(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out.suffix not in (".pt", ".pth"):
        return _fail(f"--out must end in .pt, got {args.out}")
    try:
        ds = ImageFolderDataset(args.data_path, args.image_size, channels=3, flip=False)
    except (ValueError, ImportError) as e:
        return _fail(str(e))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        vae = load_vae(args.vae, device)
    except VAEUnavailable as e:
        return _fail(str(e))
    amp = amp_dtype(args.precision)
    gen = torch.Generator(device).manual_seed(args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    views = [False, True] if args.flip else [False]
    lat, lab = [], []
    it = loader
    if not args.no_progress:
        it = progress_bar(loader, total=len(loader), desc="encode", unit="batch")
    with torch.no_grad(), autocast(device, amp if device.type == "cuda" else None):
        for x, y in it:
            x = x.to(device)
            for flipped in views:
                dist = vae.encode(x.flip(-1) if flipped else x).latent_dist
                z = dist.sample(generator=gen) if args.mode == "sample" else dist.mean
                lat.append((z.float() * LATENT_SCALE).half().cpu())     # [b, 4, S/8, S/8]
                lab.append(torch.as_tensor(y, dtype=torch.long))
    latents, labels = torch.cat(lat), torch.cat(lab)
    save_object({"latents": latents, "labels": labels, "classes": list(ds.classes),
                 "scale": LATENT_SCALE, "vae": args.vae, "image_size": args.image_size},
                args.out)
    print(f"wrote {args.out}: {latents.shape[0]} latents of {tuple(latents.shape[1:])}, "
          f"{len(ds.classes) or 'no'} classes")
    return 0
