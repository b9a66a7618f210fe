"""`python -m diffit sample`: samples from any DiffiT checkpoint, in the files FID evaluators read.

--checkpoint takes what `python -m diffit train` leaves (the run directory, its checkpoints/
folder, the `latest` pointer, a ckpt_<step>.pt) or a bare state dict (the official
diffit_256.safetensors, a .pt holding one). A trainer checkpoint records its model family,
preset and configuration and holds the EMA weights (used by default; --weights model takes the
training weights); a bare state dict is latent DiffiT (configuration read off the tensors) or an
image-space U-Net (give its --model preset). The command prints which weights it uses.

    image space (U-Net)  EDM's Heun sampler: deterministic (Algorithm 1) by default, stochastic
                         with --S_churn > 0 (Algorithm 2; --S_min, --S_max, --S_noise), --steps
                         default the preset's (18 CIFAR-10, 40 FFHQ-64), --sigma_min / --sigma_max
                         / --rho as EDM; class-conditional models take labels, and guidance
                         (--cfg-scale) where trained with label dropout
    latent               ancestral DDPM ("250") or DDIM ("ddim50") with the released guidance;
                         samples decoded by the SD VAE unless --latents-only (a latent-family run
                         trained on pixels samples images directly)

Writes, under --out (a directory):
    samples_<N>x<H>x<W>x3.npz   ADM evaluator layout: arr_0 uint8 [N, H, W, 3], arr_1 labels [N]
                                (-1: unconditional); grey images as three equal channels
    images/000000.png ...       one PNG per sample, the folder EDM's fid.py and torch-fidelity read
    grid.png                    the first --grid samples in a square grid (small images upscaled)
or with --latents-only:
    latents_<N>x<C>x<h>x<w>.npz arr_0 float32 [N, C, h, w] (VAE latents times 0.18215),
                                arr_1 labels [N]
The start noise of sample i depends only on (--seed, i), so deterministic samplers give the
same samples at any batch size and number of ranks. Under torchrun the samples are split across
ranks (rank r draws samples r, r + W, ...) and gathered on rank 0, which writes the files. Every
file is written atomically; images/ is written beside and renamed into place. The README gives
the commands that compute FID from these files.
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
IMAGES_DIR = "images"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="sample images (or latents) from a DiffiT "
                              "checkpoint: npz for the ADM evaluator, PNGs for EDM / "
                              "torch-fidelity",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", type=Path,
                     help="run directory, checkpoints folder, `latest` pointer, trainer "
                          "checkpoint, or state dict (.safetensors / .pt)")
    src.add_argument("--weights", choices=("ema", "model"), default=None,
                     help="trainer checkpoints: the EMA weights (default) or the training "
                          "weights")
    src.add_argument("--random-init", action="store_true",
                     help="no checkpoint: a randomly initialised --model (smoke tests)")
    src.add_argument("--model", default=None,
                     help="preset (latent: DiffiT-XL/2, -L/2, -B/2, -S/2, DiffiT-tiny; image "
                          "space: cifar10, ffhq64, tiny): the model for --random-init, what the "
                          "checkpoint must match, or an image-space state dict's preset "
                          "(default: from the checkpoint)")
    src.add_argument("--num-classes", type=int, default=None,
                     help="number of classes (default: the checkpoint's or the preset's)")
    src.add_argument("--image-size", type=int, default=None,
                     help="image side in pixels (default: the model's; latent models: 8 x the "
                          "latent side, 256 for --random-init)")
    src.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                     help="triton (our fused kernels), torch (the plain reference), auto (on "
                          "CUDA the faster of the two, timed on a short run of this sampler at "
                          "start-up; elsewhere the reference)")
    src.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="regional torch.compile of the blocks, the fused kernels inside "
                          "(default: on for CUDA, off elsewhere; see diffit/accel.py)")
    src.add_argument("--compile-mode", default="auto", choices=("auto", "default",
                                                                "reduce-overhead"),
                     help="with compile: reduce-overhead also replays each block as a CUDA "
                          "graph (CUDA only; no host cost per kernel launch); auto = default "
                          "for sampling for now")
    src.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                     help="autocast dtype for the model")
    src.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    src.add_argument("--threads", type=int, default=None,
                     help="torch intra-op threads on CPU (default: torch's); small models on a "
                          "busy machine run fastest with 1")

    smp = p.add_argument_group("sampling")
    smp.add_argument("--num-samples", type=int, default=16)
    smp.add_argument("--batch-size", type=int, default=8, help="samples per forward (per rank)")
    smp.add_argument("--steps", default=None,
                     help='latent: respaced steps, "250" (ancestral DDPM, default) or "ddim50" '
                          "(DDIM); image space: EDM Heun steps (default: the preset's)")
    smp.add_argument("--cfg-scale", type=float, default=None,
                     help="classifier-free guidance scale, 1 = none (default: official latent "
                          "checkpoints 4.4 at latent size <= 32, else 1.49, as released; "
                          "trained models 1)")
    smp.add_argument("--cfg-schedule", default="auto", choices=("auto", "power-cosine",
                                                                 "constant"),
                     help="latent: auto = power-cosine ramp at latent size <= 32, constant above")
    smp.add_argument("--guide-all-channels", action="store_true",
                     help="latent: guide every eps channel (released: channels 0-2 only)")
    smp.add_argument("--eta", type=float, default=0.0, help="latent: DDIM eta")
    for name, default, what in (
            ("sigma_min", 0.002, "lowest noise level"),
            ("sigma_max", 80.0, "highest noise level"),
            ("rho", 7.0, "step-spacing exponent"),
            ("S_churn", 0.0, "stochasticity; 0 = deterministic (EDM's ImageNet-64: 40)"),
            ("S_min", 0.0, "churn only at sigma >= S_min (EDM's ImageNet-64: 0.05)"),
            ("S_max", float("inf"), "churn only at sigma <= S_max (EDM's ImageNet-64: 50)"),
            ("S_noise", 1.0, "churn noise scale (EDM's ImageNet-64: 1.003)")):
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])  # EDM's, dashed
        smp.add_argument(*flags, dest=name, type=float, default=default,
                         help=f"image space, EDM's {what} (default: %(default)s)")
    smp.add_argument("--labels", default=None,
                     help="comma-separated class labels, cycled (default: uniform random)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--no-progress", action="store_true")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output directory")
    out.add_argument("--latents-only", action="store_true",
                     help="latent models: skip the VAE and write the latents")
    out.add_argument("--vae", default=DEFAULT_VAE,
                     help="diffusers AutoencoderKL id or local directory")
    out.add_argument("--grid", type=int, default=64, help="samples in grid.png")
    out.add_argument("--no-png-folder", action="store_true",
                     help=f"skip the {IMAGES_DIR}/ folder of PNGs")
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"diffit sample: error: {msg}", file=sys.stderr)
    return 2


# ---- processes ------------------------------------------------------------------------------
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


# ---- outputs --------------------------------------------------------------------------------
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


def to_uint8_rgb(x):
    """Images [B, C, H, W] in [-1, 1] (C = 1 or 3) -> uint8 [B, H, W, 3] (grey repeated)."""
    import torch

    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [B, C, H, W]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous()                              # [B, H, W, 3]


def _grid_png(images, path: Path, n: int, min_tile: int = 64) -> None:
    """Square grid (2 px black padding) of uint8 [N, H, W, 3] images, tiles smaller than
    min_tile upscaled (nearest) so they stay visible, written atomically."""
    import numpy as np
    from PIL import Image

    from .checkpoint import atomic_path

    imgs = images[:n]
    f = max(1, math.ceil(min_tile / max(imgs.shape[1:3])))
    if f > 1:
        imgs = imgs.repeat(f, axis=1).repeat(f, axis=2)
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


def _png_folder(images, folder: Path) -> None:
    """images [N, H, W, 3] uint8 as folder/000000.png ...: written into a temporary folder
    beside it, which then replaces `folder` (a previous run's PNGs never mix with these)."""
    import shutil
    import tempfile

    from PIL import Image

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old = None
    try:
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp / f"{i:06d}.png", format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)            # mkdtemp's 0700 would make the folder private
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _save_npz(path: Path, **arrays) -> None:
    import numpy as np

    from .checkpoint import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)


# ---- models ---------------------------------------------------------------------------------
def load_model(ck, *, backend: str = "auto", preset=None, num_classes=None):
    """The model a diffit.sample_checkpoint.SamplingCheckpoint holds, its weights loaded strictly
    (CheckpointMismatchError lists every missing, unexpected and mis-shaped key).

    Trainer checkpoints are rebuilt by their family's builder (diffit.training.families) from the
    recorded preset and model config; latent state dicts from the configuration their tensors
    describe (or `preset` at their latent size); image-space state dicts need `preset` (a U-Net
    state dict does not record its windows, head width or levels)."""
    import dataclasses

    import torch

    from .sample_checkpoint import SamplingCheckpointError
    from .latent import DiffiT, check_state_dict_against, infer_config, preset_config

    sd = ck.state_dict
    if ck.kind == "trainer":
        from .training.families import FAMILIES

        if preset is not None and preset != ck.preset:
            raise SamplingCheckpointError(f"--model {preset}: {ck.path} was trained as "
                                          f"{ck.preset!r}")
        trained = ck.model_config.get("num_classes")
        if num_classes is not None and num_classes != trained:
            raise SamplingCheckpointError(f"--num-classes {num_classes}: {ck.path} was trained "
                                          f"with {trained} classes")
        over = {k: v for k, v in ck.model_config.items() if k != "grad_checkpointing"}
        try:
            model = FAMILIES[ck.family]().build(ck.preset, {**over, "backend": backend}, False)
        except (TypeError, ValueError) as e:
            raise SamplingCheckpointError(
                f"trainer checkpoint {ck.path}: its model config {ck.model_config} does not "
                f"build a {ck.family} {ck.preset!r} model here ({e})") from None
    elif ck.family == "latent":
        config = infer_config(sd, str(ck.path))
        if preset is not None:
            config = preset_config(preset, input_size=config.input_size)
        if num_classes is not None:
            config = dataclasses.replace(config, num_classes=num_classes)
        with torch.device("meta"):
            model = DiffiT(config=dataclasses.replace(config, backend=backend))
        check_state_dict_against(model.state_dict(), sd, str(ck.path))
        model = model.to_empty(device="cpu")
    else:
        from .unet import PRESETS, DiffiTUNet

        if preset not in PRESETS:
            raise SamplingCheckpointError(
                f"{ck.path} is an image-space U-Net state dict, which does not record its "
                f"windows, head width or levels: pass --model with its preset "
                f"({', '.join(PRESETS)}){f'; got {preset!r}' if preset else ''}")
        model = DiffiTUNet.from_preset(
            preset, in_channels=sd["tokenizer.weight"].shape[1], backend=backend,
            num_classes=sd["y_embedder.weight"].shape[0] - 1 if "y_embedder.weight" in sd else 0,
            augment_dim=sd["aug_embedder.weight"].shape[1] if "aug_embedder.weight" in sd else 0)
    check_state_dict_against(model.state_dict(), sd, f"{ck.path} ({ck.weights} weights)")
    model.load_state_dict(sd, strict=True)
    return model


def _random_model(args):
    """(model, family) for --random-init --model PRESET."""
    from .training.families import family_of

    if args.model is None:
        raise ValueError("--random-init needs --model (a preset such as DiffiT-tiny or tiny)")
    family = family_of(args.model).name
    over = dict(backend=args.backend)
    if args.num_classes is not None:
        over["num_classes"] = args.num_classes
    if family == "latent":
        from .latent import DiffiT, preset_config

        size = args.image_size or 256
        if size % 16:
            raise ValueError(f"--image-size must be a multiple of 16 (VAE factor 8 x patch 2), "
                             f"got {size}")
        return DiffiT(config=preset_config(args.model, input_size=size // 8, **over)), family
    from .unet import DiffiTUNet

    if args.image_size is not None:
        over["image_size"] = args.image_size
    return DiffiTUNet.from_preset(args.model, **over), family


def can_guide(model, ck) -> bool:
    """Whether the model has a null class trained by label dropout (guidance needs it)."""
    cfg = model.config
    if not getattr(cfg, "num_classes", 0):
        return False
    if ck is not None and ck.kind == "state dict" and ck.family == "image":
        return True                     # the U-Net always has the null row; dropout unknown
    return cfg.class_dropout_prob > 0


# ---- samplers -------------------------------------------------------------------------------
def edm_sample(model, noise, labels, *, num_steps: int, cfg_scale: float = 1.0, generator=None,
               progress=False, **heun):
    """EDM's Heun sampler on an image-space model: samples [B, C, H, W] in data space.
    `heun`: sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise (EDM's names)."""
    from .diffusion.edm import EDMPrecond, guided_denoiser, heun_sampler

    net = EDMPrecond(model)
    if labels is not None and cfg_scale != 1.0:
        net = guided_denoiser(net, cfg_scale, model.config.num_classes)
    return heun_sampler(net, noise, labels, num_steps=num_steps, generator=generator,
                        progress=progress, **heun)


def _image_sampler(args, model, ck):
    """(draw(noise, y, gen, progress) -> [b, C, H, W] in [-1, 1], description)."""
    try:
        steps = int(args.steps) if args.steps is not None else model.config.heun_steps
    except ValueError:
        raise ValueError(f"--steps {args.steps!r}: image-space models take a number of Heun "
                         "steps") from None
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    cfg = 1.0 if args.cfg_scale is None else args.cfg_scale
    if cfg != 1.0 and not can_guide(model, ck):
        raise ValueError(f"--cfg-scale {cfg}: guidance needs a class-conditional model trained "
                         "with label dropout (class_dropout > 0); this one was not")
    heun = {k: getattr(args, k) for k in ("sigma_min", "sigma_max", "rho", "S_churn", "S_min",
                                          "S_max", "S_noise")}

    def draw(noise, y, gen, progress):
        return edm_sample(model, noise, y, num_steps=steps, cfg_scale=cfg, generator=gen,
                          progress="heun" if progress else False, **heun)

    kind = "stochastic" if args.S_churn > 0 else "deterministic"
    return draw, (f"EDM Heun, {steps} steps, {kind}{f', guidance {cfg:g}' if cfg != 1 else ''}")


def _latent_sampler(args, model, ck):
    """(draw(noise, y, gen, progress) -> [b, C, h, w], description) for latent DiffiT."""
    from .diffusion import create_diffusion

    steps = str(args.steps or "250")
    try:
        diffusion = create_diffusion(steps, learn_sigma=model.learn_sigma)
    except ValueError as e:
        raise ValueError(f"--steps {steps!r}: {e}") from None
    ddim = steps.startswith("ddim")
    loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
    loop_kw = {"eta": args.eta} if ddim else {}
    released = ck is None or ck.kind == "state dict"
    cfg = args.cfg_scale if args.cfg_scale is not None else (
        (4.4 if model.input_size <= 32 else 1.49) if released and can_guide(model, ck) else 1.0)
    if cfg != 1.0 and not can_guide(model, ck):
        raise ValueError(f"--cfg-scale {cfg}: guidance needs a class-conditional model with a "
                         "null class (trained with label dropout); this one has none")
    K = model.num_classes
    channels = "all" if args.guide_all_channels or model.in_channels < 3 else 3

    def draw(noise, y, gen, progress):
        import torch

        if K > 0 and cfg != 1.0:
            z = torch.cat([noise, noise])
            fn = model.forward_with_cfg
            kw = dict(y=torch.cat([y, torch.full_like(y, K)]), cfg_scale=cfg,   # null class row
                      schedule=args.cfg_schedule, guidance_channels=channels)
        else:
            z, fn, kw = noise, model.forward, (dict(y=y) if K > 0 else {})
        x = loop(fn, z.shape, noise=z, model_kwargs=kw, device=noise.device, progress=progress,
                 generator=gen, **loop_kw)
        return x[: noise.shape[0]]

    return draw, (f"{'DDIM' if ddim else 'ancestral DDPM'}, {diffusion.num_timesteps} steps"
                  f"{f', guidance {cfg:g}' if cfg != 1 else ''}")


# sampler steps of one timed run in the backend trial: every model call of a sampler costs the
# same, so a short run of the real sampler (its guidance, batch and precision) times the backends
TRIAL_SAMPLER_STEPS = {"image": "2", "latent": "ddim2"}


def _choose_backend(args, model, ck, make, family, labels, shape, device, amp, world):
    """(backend, log line or ""): --backend auto where both backends run (accel.backends_to_time:
    CUDA) times a short run of this command's sampler (TRIAL_SAMPLER_STEPS, the first batch's
    size, labels and precision) with each and keeps the faster, every rank agreeing (the slowest
    rank's times); otherwise args.backend as it is. Our kernels are left out where a call of
    our ops in that run does not match the reference by the numerics rule
    (accel.check_kernels). The trial draws its own noise and puts the global random state back,
    so the samples are those of the chosen backend fixed. RuntimeError when no backend ran."""
    import torch

    from . import accel

    candidates = accel.backends_to_time(args.backend, device)
    if not candidates:
        return args.backend, ""
    steps = TRIAL_SAMPLER_STEPS[family]
    trial, _ = make(argparse.Namespace(**{**vars(args), "steps": steps}), model, ck)
    b = min(args.batch_size, len(labels))
    z = torch.randn((b, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    y = labels[:b].to(device) if model.config.num_classes > 0 else None

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad(), accel.autocast(device, amp):
            return trial(z, y, gen, False)

    # samples may differ between the backends by more than rounding (a few steps from noise
    # amplify it): only non-finite samples leave a backend out, after the calls of our ops in
    # the same run matched the reference's (the probe of accel.check_kernels: forward only)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        chosen, merged, secs = accel.choose_backend(run, (model,), candidates, device, world,
                                                    rtol=None, probe=run)
    how = accel.timing_note("runs", device, secs)
    return chosen, accel.describe_choice(chosen, merged, how,
                                         per=f"sampler run ({b} samples, --steps {steps})")


# ---- the command ----------------------------------------------------------------------------
def _prepare(args):
    """(model, checkpoint or None, family, latent space?) or ValueError / FileNotFoundError."""
    from .sample_checkpoint import read_sampling_checkpoint

    if args.checkpoint is None:
        if not args.random_init:
            raise ValueError("pass --checkpoint PATH (a run directory, trainer checkpoint or "
                             "official-layout DiffiT state dict), or --random-init with a small "
                             "--model preset for a smoke test")
        model, family = _random_model(args)
        return model, None, family, family == "latent"
    ck = read_sampling_checkpoint(args.checkpoint, args.weights)
    model = load_model(ck, backend=args.backend, preset=args.model,
                       num_classes=args.num_classes)
    return model, ck, ck.family, ck.data_is_latent


def _check_sizes(args, model, family: str, latent_space: bool, source) -> int:
    """The side of the sampled tensors; ValueError when --image-size disagrees with the model."""
    side = model.input_size if family == "latent" else model.config.image_size
    if latent_space:
        if args.image_size is not None and args.image_size != side * 8:
            raise ValueError(
                f"--image-size {args.image_size} needs latent size {args.image_size // 8}, but "
                f"{source} was trained at latent size {side} (image size {side * 8})")
    else:
        if args.latents_only:
            raise ValueError(f"--latents-only: {source} samples images directly (no VAE)")
        if args.image_size is not None and args.image_size != side:
            raise ValueError(f"--image-size {args.image_size}: {source} samples {side}x{side} "
                             "images")
    return side


def run(args) -> int:
    import numpy as np
    import torch

    if args.num_samples < 1 or args.batch_size < 1:
        return _fail(f"--num-samples ({args.num_samples}) and --batch-size ({args.batch_size}) "
                     "must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            return _fail(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rank, world, device = _dist_setup(args.device)
    try:
        model, ck, family, latent_space = _prepare(args)
        source = ck.path if ck is not None else f"the random {args.model}"
        side = _check_sizes(args, model, family, latent_space, source)
        make = _image_sampler if family == "image" else _latent_sampler
        draw, how = make(args, model, ck)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        return _fail(str(e))
    model = model.to(device).eval()
    if family == "image":  # as trained: the token <-> image reshapes are views (diffit/unet.py)
        model = model.to(memory_format=torch.channels_last)
    from .accel import amp_dtype, autocast, compile_for_run, mark_graph_steps
    try:
        # every rank samples on its own (no DDP): CUDA graphs need no single process here
        compiled, mode, describe = compile_for_run(model, args.compile, device,
                                                   mode=args.compile_mode, graphs_by_default=False)
    except ValueError as e:
        return _fail(str(e))
    if mode == "reduce-overhead":
        mark_graph_steps(model)
    vae = None
    if latent_space and not args.latents_only:
        try:
            vae = _load_vae(args.vae, device)
        except RuntimeError as e:
            return _fail(str(e))

    # labels for all samples are drawn identically on every rank, so sharding does not change
    # which sample gets which class
    N, K = args.num_samples, model.config.num_classes
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
    amp = amp_dtype(args.precision)
    channels = model.config.in_channels
    try:
        backend, choice = _choose_backend(args, model, ck, make, family, labels,
                                          (channels, side, side), device, amp, world)
    except RuntimeError as e:  # no backend ran the sampler
        return _fail(str(e))
    if rank == 0:
        print("diffit sample: " + (ck.describe() if ck is not None
                                   else f"randomly initialised {family} model {args.model}"),
              flush=True)
        print(f"diffit sample: runs {describe(backend)}", flush=True)
        if choice:
            print(f"diffit sample: {choice}", flush=True)

    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    mine = list(range(rank, N, world))
    outs = []
    start = time.perf_counter()
    for b0 in range(0, len(mine), args.batch_size):
        idx = mine[b0: b0 + args.batch_size]
        y = labels[idx].to(device) if K > 0 else None
        # x_T of sample i depends only on (seed, i): deterministic samplers give the same
        # samples at any number of ranks and batch size
        z = torch.stack([torch.randn((channels, side, side), generator=torch.Generator()
                                     .manual_seed(args.seed * 1_000_003 + i))
                         for i in idx]).to(device)
        with torch.no_grad(), autocast(device, amp):
            x = draw(z, y, gen, not args.no_progress and rank == 0).float()
            if vae is not None:
                x = vae.decode(x / LATENT_SCALE).sample                 # [b, 3, H, W] in [-1, 1]
        if not latent_space or vae is not None:
            x = to_uint8_rgb(x)                                          # [b, H, W, 3]
        outs.append(x)
        if b0 == 0 and rank == 0:
            # the first batch pays what the samples/s below averages in: compilation
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            what = ("torch.compile of the blocks and kernel autotuning" if compiled
                    else "kernel compilation and autotuning")
            print(f"diffit sample: first batch {time.perf_counter() - start:.1f} s "
                  f"(includes {what})", flush=True)
    if outs:
        local = torch.cat(outs)
    elif latent_space and vae is None:  # more ranks than samples
        local = torch.empty((0, channels, side, side), device=device)
    else:
        H = side * 8 if latent_space else side
        local = torch.empty((0, H, H, 3), dtype=torch.uint8, device=device)
    allx = _gather(local, N, rank, world)
    elapsed = time.perf_counter() - start

    if rank == 0:
        print(f"{N} samples in {elapsed:.1f} s ({N / elapsed:.3g} samples/s, {world} rank(s), "
              f"{how})")
        arr = allx.cpu().numpy()
        lab = labels.numpy().astype(np.int64)
        args.out.mkdir(parents=True, exist_ok=True)
        if arr.dtype != np.uint8:
            path = args.out / ("latents_" + "x".join(map(str, arr.shape)) + ".npz")
            _save_npz(path, arr_0=arr.astype(np.float32), arr_1=lab)
            print(f"wrote {path} ({N} latents, {channels}x{side}x{side})")
        else:
            path = args.out / ("samples_" + "x".join(map(str, arr.shape)) + ".npz")
            _save_npz(path, arr_0=arr, arr_1=lab)
            print(f"wrote {path}")
            try:
                if not args.no_png_folder:
                    _png_folder(arr, args.out / IMAGES_DIR)
                    print(f"wrote {args.out / IMAGES_DIR}/ ({N} PNGs)")
                _grid_png(arr, args.out / "grid.png", args.grid)
                print(f"wrote {args.out / 'grid.png'}")
            except ImportError:
                print("PNGs skipped: writing PNG needs pillow (pip install pillow)",
                      file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0
