"""What `python -m diffit train` shows while it runs: metrics.jsonl, loss.png and sample grids
from the EMA model. Every file is written atomically or appended line by line."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import torch

from ..accel import autocast
from ..progress import isatty


class MetricsLog:
    """metrics.jsonl: appended one line at a time; on resume, lines past the resumed step (from
    a run that died after its last checkpoint) are dropped."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        if resume_step is None:
            if path.exists():
                path.unlink()
        elif path.exists():
            kept = [ln for ln in self.read(path) if ln["step"] <= resume_step]
            from ..checkpoint import atomic_path
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    @staticmethod
    def read(path: Path) -> List[dict]:
        out = []
        if path.exists():
            for ln in path.read_text(encoding="utf-8").splitlines():
                if ln.strip():
                    try:
                        out.append(json.loads(ln))
                    except json.JSONDecodeError:
                        break                      # a line cut by a crash ends the record
        return out

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss(metrics: Path, png: Path, title: str = "") -> bool:
    """loss.png from metrics.jsonl: each logged loss and a smoothed curve; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from ..checkpoint import atomic_path
    rows = [r for r in MetricsLog.read(metrics) if math.isfinite(r.get("loss", float("nan")))]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    # centred moving average over ~5% of the points: no lag, unlike an exponential average
    h = max(1, len(loss) // 40)
    smooth = [sum(loss[max(0, i - h): i + h + 1]) / len(loss[max(0, i - h): i + h + 1])
              for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="loss (per log interval)")
    ax.plot(steps, smooth, color="tab:blue", lw=2, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if min(loss) > 0:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def save_grid(images, path: Path, nrow: Optional[int] = None, min_tile: int = 64) -> None:
    """A grid PNG of images [N, C, H, W] in [-1, 1] (C = 1 or 3), tiles upscaled (nearest) to at
    least min_tile pixels so small images stay visible; 2 px padding."""
    import numpy as np
    from PIL import Image

    from ..checkpoint import atomic_path
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    N, C, H, W = x.shape
    f = max(1, math.ceil(min_tile / max(H, W)))
    if f > 1:
        x = x.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
        H, W = H * f, W * f
    cols = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    pad = 2
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 0, dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).numpy()
    for i in range(N):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H,
             pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    img = Image.fromarray(grid[..., 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


@torch.no_grad()
def sample_images(family, ema_module, dataset, cfg, num_classes: int, amp, device,
                  n: int) -> torch.Tensor:
    """n samples of `family`'s sampler from the EMA model, as images in [-1, 1] [n, C', H', W'].
    The noise and labels (class i % num_classes) are the same every time, so grids are
    comparable across steps; the training random streams are left untouched."""
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((n, dataset.channels, dataset.image_size, dataset.image_size),
                        generator=gen)
    labels = (torch.arange(n) % num_classes).to(device) if num_classes else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            autocast(device, amp):
        x = family.sample(ema_module, noise.to(device), labels, cfg)
    return to_images(x.float(), cfg)


def to_images(x: torch.Tensor, cfg) -> torch.Tensor:
    """Samples in data space -> images in [-1, 1] for the grid: pixels are clamped; latents are
    decoded with cfg.sample_vae, or without one shown as channels 0-2 scaled by their spread."""
    if cfg.data != "latents":
        return x.clamp(-1, 1)
    if cfg.sample_vae:
        from .encode import LATENT_SCALE, load_vae
        vae = load_vae(cfg.sample_vae, x.device)
        return vae.decode(x / LATENT_SCALE).sample.float().clamp(-1, 1)
    v = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return (v / (3 * v.std().clamp_min(1e-6))).clamp(-1, 1)


def _duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """What the training loop shows while it runs.

    On a terminal (stdout and stderr both ttys) a tqdm bar that carries the latest loss. Anywhere
    else (stdout redirected to a log file, CI, a batch job) nothing redraws with carriage
    returns: `metrics` lines are printed as they come (every log_every steps) and, when none came
    for `every_s` seconds, a short line with the step, the elapsed time and an estimate of the
    time left. bar=False (--no-progress): only the metrics lines.
    """

    def __init__(self, total: int, initial: int, *, bar: bool, every_s: float = 30.0,
                 stream=None, clock=None):
        import sys
        import time

        self.total, self.step, self.step0 = total, initial, initial
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock or time.monotonic
        self.t0 = self.t_last = self.clock()
        self.bar = None
        if bar and isatty(sys.stdout) and isatty(sys.stderr):
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                desc="train")
            except ImportError:
                pass
        self.lines = bar and self.bar is None

    @property
    def interactive(self) -> bool:
        return self.bar is not None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.t_last = self.clock()

    def update(self, step: int) -> None:
        """After each optimizer step (no device synchronisation: only host clocks)."""
        self.step = step
        if self.bar is not None:
            self.bar.update(1)
            return
        now = self.clock()
        if self.lines and now - self.t_last >= self.every_s:
            done, elapsed = step - self.step0, now - self.t0
            left = (f", ~{_duration(elapsed / done * (self.total - step))} left"
                    if done > 0 else "")
            self._print(f"train: step {step}/{self.total} ({100 * step / self.total:.0f}%), "
                        f"{_duration(elapsed)} elapsed{left}")

    def metrics(self, text: str, **postfix) -> None:
        """A metrics line: the bar's postfix on a terminal, else printed as a line."""
        if self.bar is not None:
            self.bar.set_postfix(**postfix)
        else:
            self._print(text)

    def note(self, text: str) -> None:
        """A one-off message that must not break the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            self._print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
