"""`python -m diffit demo`: train a tiny image-space DiffiT on handwritten digits, then sample it.

    python -m diffit demo                 # ~2-4 minutes on 2 CPU cores; writes demo_out/
        demo_out/samples.png              10 x 10 samples from the EMA model, one digit per column
        demo_out/loss.png                 the training loss curve
        demo_out/metrics.jsonl, checkpoints/, config.json   as any `diffit train` run
        demo_out/demo.json                the run's settings and its sample-quality numbers

Sample quality (diffit.quality, no download): 360 class-conditional samples (36 per digit) from
the EMA weights, drawn with the same sampler, scored by a classifier fitted on the digits:
its accuracy per class and overall, and the Frechet distance of its features between samples
and data, each next to what real held-out digits score. Printed and written to demo.json.

The data is scikit-learn's 1797 8x8 digits (shipped with scikit-learn, no download), at their
native 8x8, which the "tiny" U-Net preset is built for: 8x8 tokens in 4x4 windows, then a 4x4
level with global attention. The model is class-conditional (label dropout 0.1), trained with
EDM's loss and sampled with EDM's 18-step Heun sampler. On CUDA our fused kernels or the
plain-PyTorch path run, whichever trains faster (backend "auto" times both at start-up); on CPU
the plain-PyTorch path.

It is `diffit train` with a fixed configuration (DEMO_CONFIG); --steps, --batch-size, --seed and
--out change it. Intra-op threads default to 1: the model's matrices are too small for a second
thread to pay off, and on a busy machine OpenMP threads spin-waiting for a core cost 5-10x.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# tuned on a 2-core CPU: recognisable digits after ~1000 steps, clean ones by 2000
DEMO_CONFIG = dict(
    model="tiny",            # image-space DiffiT U-Net preset (diffit.unet.PRESETS["tiny"])
    data="digits",
    image_size=8,            # the digits' own resolution, the tiny preset's size
    class_cond=True,         # one digit class per grid column
    class_dropout=0.1,
    batch_size=64,
    steps=2000,
    optimizer="adam",        # EDM's choice for the image-space models
    lr=2e-3,
    warmup_steps=100,
    grad_clip=1.0,
    ema_decay=0.999,         # with warmup; 0.9999 would need far longer than a demo
    log_every=20,
    ckpt_every=0,            # one checkpoint, at the end
    num_samples=100,
    sample_every=0,
    out="demo_out",
)
MARKER = "demo.json"
# samples per digit for the quality numbers: 360 in all, as many as the classifier's held-out
# real digits, so the Frechet distance (biased upward for small samples) compares like with like
QUALITY_PER_CLASS = 36


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="train a tiny DiffiT on the digits (CPU, minutes) "
                              "and write samples.png and loss.png",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(DEMO_CONFIG["out"]),
                   help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEMO_CONFIG["steps"],
                   help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEMO_CONFIG["batch_size"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _check_requirements() -> None:
    missing = []
    for mod, pkg in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"),
                     ("PIL", "pillow")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise ImportError(f"the demo needs {', '.join(missing)}: pip install {' '.join(missing)}"
                          " (or pip install 'diffit-kernels[train]')")


def demo_config(out, steps: int, batch_size: int, seed: int, device=None, progress=True):
    from .config import TrainConfig

    return TrainConfig(**{**DEMO_CONFIG, "out": str(out), "steps": steps,
                          "batch_size": batch_size, "seed": seed, "device": device,
                          "progress": progress}).validate()


def _clear_previous(out: Path) -> None:
    """A previous demo in `out` is replaced; anything else there is left alone (error)."""
    import shutil

    ckpts = out / "checkpoints"
    if ckpts.exists() and not (out / MARKER).is_file():
        raise ValueError(f"{out} holds checkpoints that are not from `diffit demo`; choose "
                         "another --out")
    if (out / MARKER).is_file():
        for sub in (ckpts, out / "samples"):
            shutil.rmtree(sub, ignore_errors=True)


def _write_marker(out: Path, record: dict) -> None:
    from ..checkpoint import atomic_path

    with atomic_path(out / MARKER) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def sample_quality(run_dir, per_class: int = QUALITY_PER_CLASS, seed: int = 0,
                   device=None) -> dict:
    """diffit.quality's numbers for `per_class` samples of each digit from the EMA weights of
    the newest checkpoint in `run_dir`, drawn as `python -m diffit sample` draws them (EDM
    Heun, the preset's steps, no guidance)."""
    import torch

    from ..sample_checkpoint import read_sampling_checkpoint
    from ..quality import digits_quality
    from ..sample import edm_sample, load_model

    ck = read_sampling_checkpoint(run_dir)
    data = (ck.train_config or {}).get("data")
    if ck.family != "image" or data != "digits":
        raise ValueError(f"{ck.path}: the digits quality numbers need an image-space model "
                         f"trained on the digits, not a {ck.family} model on {data!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(ck).to(device).eval()
    K = model.config.num_classes
    labels = torch.arange(K).repeat_interleave(per_class) if K else None
    n = per_class * max(K, 10)
    c, s = model.config.in_channels, model.config.image_size
    noise = torch.randn((n, c, s, s), generator=torch.Generator().manual_seed(seed))
    steps = model.config.heun_steps
    x = edm_sample(model, noise.to(device), None if labels is None else labels.to(device),
                   num_steps=steps)
    q = digits_quality(x.cpu(), labels)
    q["sampler"] = f"EDM Heun, {steps} steps, deterministic, no guidance"
    q["checkpoint"] = str(ck.path)
    q["weights"] = ck.weights
    return q


def run_demo(out, steps: int = DEMO_CONFIG["steps"], batch_size: int = DEMO_CONFIG["batch_size"],
             seed: int = 0, device=None, progress: bool = True) -> dict:
    """Train, sample and score; returns the trainer's summary plus `quality` (sample_quality's
    numbers, also in demo.json) and `wall_s` for the whole demo."""
    from .train import train

    t0 = time.perf_counter()
    _check_requirements()
    out = Path(out)
    cfg = demo_config(out, steps, batch_size, seed, device, progress)
    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"steps": steps, "batch_size": batch_size, "seed": seed}
    _write_marker(out, record)
    summary = train(cfg)
    summary["quality"] = sample_quality(out, device=device)
    _write_marker(out, {**record, "quality": summary["quality"]})
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def run(args) -> int:
    import torch

    from ..quality import format_quality

    if args.threads < 1:
        print(f"diffit demo: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        s = run_demo(args.out, args.steps, args.batch_size, args.seed, args.device,
                     not args.no_progress)
    except (ValueError, ImportError) as e:
        print(f"diffit demo: error: {e}", file=sys.stderr)
        return 2
    q = s["quality"]
    print(f"diffit demo: {s['step']} steps in {s['wall_s']:.0f} s; wrote {s['samples']} and "
          f"{s['loss_png']}")
    print(f"sample quality of {q['num_samples']} samples ({QUALITY_PER_CLASS} per digit) from "
          f"the EMA weights, {q['sampler']}:")
    print(format_quality(q))
    print(f"(in {Path(args.out) / MARKER}; more samples: python -m diffit sample --checkpoint "
          f"{args.out} --out samples/ --num-samples 100)")
    return 0
