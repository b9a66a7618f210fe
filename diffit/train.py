"""`python -m diffit train`: DiffiT training for the latent model (ADM loss) and the image-space
U-Net (EDM loss), on one device or under torchrun (DDP, or FSDP with --fsdp).

    python -m diffit train --model tiny --data digits --image-size 16 --steps 2000 --out runs/d
    python -m diffit train --config configs/latent_s2.json --data-path latents.pt
    torchrun --nproc_per_node=8 -m diffit train --config configs/latent_xl2.json --resume

Configuration: dataclass defaults < the JSON file given with --config < flags. The preset picks
the model family through FAMILIES (diffit/train_families.py, the only model-specific code):
latent presets ("DiffiT-S/2", ..., "DiffiT-XL/2") train with the ADM / DiT Gaussian diffusion
loss (eps + learned variance) and sample with its ancestral sampler; image-space presets ("tiny",
"cifar10", "ffhq64") train with EDM's loss and sample with EDM's Heun sampler. The data sets the
model's input size, channels and (with class_cond) classes.

Outputs under --out (rank 0 writes; every file is written atomically or appended line by line):
    config.json                     the resolved configuration
    metrics.jsonl                   one line per log interval: step, loss, lr, grad_norm, images/s
    loss.png                        the loss curve (matplotlib), refreshed at every checkpoint
    samples.png, samples/step_*.png sample grids from the EMA model (every sample_every steps)
    checkpoints/ckpt_<step>.pt      model, EMA, optimizer, step, data position, RNG states of
    checkpoints/latest              every rank, config; the last keep_checkpoints are kept and
                                    `latest` names the newest complete one

--resume continues from checkpoints/latest (or --resume PATH): the model, EMA, optimizer, data
order and every rank's random state are restored, so on CPU the losses after resuming equal those
of an uninterrupted run bit for bit. An unreadable or mismatched checkpoint is an error that names
the file and the earlier checkpoints that remain.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

# re-exported: diffit.train is where users and tests find the training API
from .train_families import FAMILIES, Family, family_of
from .train_feedback import MetricsLog, plot_loss, save_grid
from .train_state import (CKPT_PREFIX, FORMAT, CheckpointError, DistInfo, barrier,
                          gather_objects, init_distributed, latest_checkpoint, list_checkpoints,
                          other_checkpoints_hint, read_checkpoint, rng_state, seed_all,
                          set_rng_state)


# ---- configuration --------------------------------------------------------------------------
def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str = _opt("tiny", "preset: latent (DiffiT-S/2 ... DiffiT-XL/2, DiffiT-tiny) or "
                      "image space (tiny, cifar10, ffhq64)")
    model_args: Dict[str, Any] = _opt(None, "JSON object of preset-config overrides, e.g. "
                                      "'{\"channels\": [32, 64]}'", type=json.loads)
    class_cond: bool = _opt(True, "condition on the data's labels when it has any")
    class_dropout: float = _opt(0.1, "label dropout probability (classifier-free guidance)")
    backend: str = _opt("auto", "diffit_kernels backend", choices=("auto", "triton", "torch"))
    grad_checkpointing: bool = _opt(False, "recompute every block in backward (less memory)")
    # data
    data: str = _opt("digits", "dataset kind", choices=("digits", "folder", "latents"))
    data_path: Optional[str] = _opt(None, "image folder, or latent tensor file (.pt/.npz/...)")
    image_size: Optional[int] = _opt(None, "image side (default: the preset's); latents "
                                     "define their own", type=int)
    channels: Optional[int] = _opt(None, "folder data: 3 reads RGB, 1 grayscale (default: "
                                   "the preset's)", type=int)
    flip: Optional[bool] = _opt(None, "random horizontal flips (default: on for folders)")
    num_workers: int = _opt(0, "data loader worker processes per rank")
    # optimisation
    batch_size: int = _opt(64, "global batch size (split evenly over the ranks)")
    steps: int = _opt(1000, "total optimizer steps")
    optimizer: str = _opt("adamw", "optimizer", choices=("adamw", "adam"))
    lr: float = _opt(1e-4, "peak learning rate")
    weight_decay: float = _opt(0.0, "weight decay")
    beta1: float = _opt(0.9, "Adam beta1")
    beta2: float = _opt(0.999, "Adam beta2")
    warmup_steps: int = _opt(0, "linear learning-rate warmup steps")
    lr_schedule: str = _opt("constant", "after warmup", choices=("constant", "cosine"))
    grad_clip: float = _opt(1.0, "max gradient norm (0 = no clipping)")
    ema_decay: float = _opt(0.9999, "EMA decay")
    ema_warmup: bool = _opt(True, "EMA decay min(decay, (1+s)/(10+s)) (short runs)")
    precision: str = _opt("auto", "autocast: auto = bf16 on CUDA, fp32 elsewhere",
                          choices=("auto", "fp32", "bf16"))
    seed: int = _opt(0, "global seed (rank r draws with seed * world + r)")
    # distribution
    fsdp: bool = _opt(False, "under torchrun: shard model, EMA and optimizer state (FSDP2) "
                      "instead of DDP")
    device: Optional[str] = _opt(None, "default: cuda:LOCAL_RANK when available, else cpu")
    # outputs and feedback
    out: str = _opt("runs/diffit", "output directory")
    log_every: int = _opt(10, "steps per metrics line")
    ckpt_every: int = _opt(1000, "steps per checkpoint (0 = only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk")
    sample_every: int = _opt(0, "steps per sample grid (0 = only at the end)")
    num_samples: int = _opt(16, "images in a sample grid (0 = none)")
    sample_steps: Optional[int] = _opt(None, "sampler steps (default: EDM preset's Heun steps; "
                                       "250 for latent)", type=int)
    guidance: float = _opt(1.0, "classifier-free guidance scale for sample grids")
    sample_vae: Optional[str] = _opt(None, "latent data: diffusers VAE to decode sample grids")
    progress: bool = _opt(True, "progress bar")

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        for f in dataclasses.fields(self):
            ch = f.metadata.get("choices")
            if ch and getattr(self, f.name) not in ch:
                raise ValueError(f"{f.name} must be one of {ch}, got {getattr(self, f.name)!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(0 <= self.class_dropout < 1,
             f"class_dropout must be in [0, 1), got {self.class_dropout}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.ckpt_every >= 0, f"ckpt_every must be >= 0, got {self.ckpt_every}")
        need(self.keep_checkpoints >= 1,
             f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.sample_every >= 0, f"sample_every must be >= 0, got {self.sample_every}")
        need(self.num_samples >= 0, f"num_samples must be >= 0, got {self.num_samples}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.model_args is None or isinstance(self.model_args, dict),
             f"model_args must be a JSON object, got {self.model_args!r}")
        return self


# fields that do not change the training trajectory: free to differ when resuming
_RESUME_FREE = {"steps", "out", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
                "num_samples", "sample_steps", "guidance", "sample_vae", "progress",
                "num_workers", "data_path", "device", "backend"}


def config_from_dict(d: Mapping[str, Any], source: str = "config") -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; known keys: {sorted(names)}")
    return TrainConfig(**dict(d)).validate()


def load_config_file(path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a JSON object, got {type(d).__name__}")
    d.pop("_comment", None)
    return d


# ---- the trainer ----------------------------------------------------------------------------
class Trainer:
    """Builds everything from a TrainConfig; fit() trains and returns a summary dict.

    Attributes after construction: dist (DistInfo), dataset, model (the raw network), ema (EMA),
    net (what the loss calls: model, DDP(model) or the FSDP-sharded model), optimizer, step.
    """

    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None):
        from torch.utils.data import DataLoader

        from .data import ResumableSampler, build_dataset
        from .ema import EMA

        self.cfg = cfg = cfg.validate()
        self.dist = d = init_distributed(cfg.device)
        self.rank0 = d.rank == 0
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.family = fam = family_of(cfg.model)
        self._log = (lambda *a: print(*a, flush=True)) if self.rank0 else (lambda *a: None)

        # data: the data decides the model's input size, channels and classes
        size, channels = fam.native(cfg.model)
        self.dataset = ds = build_dataset(
            cfg.data, cfg.data_path, image_size=cfg.image_size or size,
            channels=cfg.channels or (channels if channels in (1, 3) else 3), flip=cfg.flip,
            seed=cfg.seed)
        if cfg.batch_size % d.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size "
                             f"{d.world}")
        self.batch_per_rank = cfg.batch_size // d.world
        self.sampler = ResumableSampler(ds, d.world, d.rank, seed=cfg.seed)
        if self.sampler.num_samples < self.batch_per_rank:
            raise ValueError(f"the dataset has {len(ds)} items: fewer than one batch of "
                             f"{self.batch_per_rank} per rank")
        self.loader_gen = torch.Generator()
        self.loader = DataLoader(ds, batch_size=self.batch_per_rank, sampler=self.sampler,
                                 drop_last=True, num_workers=cfg.num_workers,
                                 pin_memory=d.device.type == "cuda", generator=self.loader_gen)

        # model: identical initial weights on every rank, then per-rank random streams
        seed_all(cfg.seed)
        overrides = {**fam.data_overrides(ds, cfg), **(cfg.model_args or {})}
        self.model = fam.build(cfg.model, overrides, cfg.grad_checkpointing).to(d.device)
        self.model_config = dataclasses.asdict(self.model.config)
        self.num_classes = int(self.model_config.get("num_classes", 0))
        if cfg.guidance != 1.0 and not (self.num_classes and cfg.class_dropout > 0):
            raise ValueError(f"guidance={cfg.guidance} needs a class-conditional model trained "
                             "with class_dropout > 0 (labelled data, class_cond on); use 1.0")
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        self.net = self._wrap()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 weight_decay=cfg.weight_decay)
        self.loss_fn = fam.make_loss(self.model)
        self.amp = (torch.bfloat16 if cfg.precision == "bf16" or
                    (cfg.precision == "auto" and d.device.type == "cuda") else None)
        seed_all(cfg.seed * d.world + d.rank)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

        resume_path = self._find_resume(resume)
        if resume_path is not None:
            self._load(resume_path)
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            from .checkpoint import atomic_path
            with atomic_path(self.out / "config.json") as tmp:
                tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n",
                               encoding="utf-8")
            self.metrics = MetricsLog(self.out / "metrics.jsonl",
                                      self.step if resume_path is not None else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._log(f"diffit train: {fam.name} model {cfg.model} ({n_params:,} parameters), "
                  f"{_describe(ds)}, world {d.world} on {d.device}"
                  f"{' (FSDP)' if self.fsdp else ' (DDP)' if d.world > 1 else ''}, "
                  f"batch {cfg.batch_size}, {cfg.steps} steps"
                  f"{f', resumed at step {self.step}' if resume_path is not None else ''}")

    # ---- setup helpers ----
    @property
    def fsdp(self) -> bool:
        return self.cfg.fsdp and self.dist.world > 1

    def _wrap(self):
        d = self.dist
        if d.world == 1:
            return self.model
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
            mesh = init_device_mesh(d.device.type, (d.world,))
            kinds = self.family.block_types()
            for module in (self.model, self.ema.module):
                for m in list(module.modules()):
                    if isinstance(m, kinds):
                        fully_shard(m, mesh=mesh)
                fully_shard(module, mesh=mesh)
            if hasattr(self.ema.module, "forward_with_cfg"):
                register_fsdp_forward_method(self.ema.module, "forward_with_cfg")
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def _find_resume(self, resume: Optional[str]) -> Optional[Path]:
        if resume in (None, "", "none"):
            if list_checkpoints(self.ckpt_dir):
                raise ValueError(f"{self.ckpt_dir} already holds checkpoints: pass --resume to "
                                 "continue that run, or choose another --out")
            return None
        if resume in ("auto", "latest"):
            path = latest_checkpoint(self.ckpt_dir)
            if path is None:
                self._log(f"--resume: no checkpoint in {self.ckpt_dir} yet, starting fresh")
            return path
        return Path(resume)

    def _state_dicts(self):
        """(model, ema, optimizer) state dicts; full (gathered) ones under FSDP, rank 0 only."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
            o = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=o),
                    get_model_state_dict(self.ema.module, options=o),
                    get_optimizer_state_dict(self.model, self.optimizer, options=o))
        return self.model.state_dict(), self.ema.module.state_dict(), self.optimizer.state_dict()

    def _check_compatible(self, ck: dict, path: Path) -> None:
        from .latent import CheckpointMismatchError, check_state_dict_against
        mine, theirs = self.model_config, ck["model_config"]
        if ck["config"].get("model") != self.cfg.model or theirs != mine:
            diff = [f"{k}: {theirs.get(k)!r} there vs {mine.get(k)!r} here"
                    for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
            raise CheckpointError(
                f"checkpoint {path} was written for model {ck['config'].get('model')!r} "
                f"(this run: {self.cfg.model!r}) with a different configuration "
                f"({'; '.join(diff) or 'same fields'}); nothing was loaded"
                f"{other_checkpoints_hint(path)}")
        try:
            check_state_dict_against(self.model.state_dict(), ck["model"], str(path))
            check_state_dict_against(self.model.state_dict(), ck["ema"], f"{path} (ema)")
        except CheckpointMismatchError as e:
            raise CheckpointError(str(e)) from e
        if ck["world_size"] != self.dist.world:
            raise CheckpointError(
                f"checkpoint {path} was written by {ck['world_size']} ranks and this run has "
                f"{self.dist.world}: the data order and per-rank random streams cannot continue "
                "exactly; resume with the same number of processes")
        if ck["dataset_len"] != len(self.dataset):
            raise CheckpointError(f"checkpoint {path} was trained on {ck['dataset_len']} items; "
                                  f"this dataset has {len(self.dataset)}")
        mine = dataclasses.asdict(self.cfg)
        free = _RESUME_FREE - ({"steps"} if self.cfg.lr_schedule == "cosine" else set())
        diff = sorted(k for k in mine if k not in free and ck["config"].get(k) != mine[k])
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was trained with different settings: "
                + ", ".join(f"{k}={ck['config'].get(k)!r} there vs {mine[k]!r} here" for k in diff)
                + "; pass the same settings to continue it, or start a new run with another --out")

    def _load(self, path: Path) -> None:
        ck = read_checkpoint(path)
        self._check_compatible(ck, path)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, set_model_state_dict, set_optimizer_state_dict)
            o = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ck["model"], options=o)
            set_model_state_dict(self.ema.module, ck["ema"], options=o)
            set_optimizer_state_dict(self.model, self.optimizer, ck["optimizer"], options=o)
        else:
            self.model.load_state_dict(ck["model"])
            self.ema.module.load_state_dict(ck["ema"])
            try:
                self.optimizer.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}"
                                      ) from e
        self.step, self.epoch = int(ck["step"]), int(ck["epoch"])
        self.batch_in_epoch = int(ck["batch_in_epoch"])
        set_rng_state(ck["rng"][self.dist.rank], self.dist.device)
        self._log(f"resumed from {path} at step {self.step}")

    # ---- checkpoint / samples / plots ----
    def save_checkpoint(self) -> Optional[Path]:
        """Every rank calls this (state gathering is collective); rank 0 writes."""
        from .checkpoint import atomic_path, save_object
        rng = gather_objects(rng_state(self.dist.device), self.dist)
        model_sd, ema_sd, opt_sd = self._state_dicts()
        path = None
        if self.rank0:
            obj = {"format": FORMAT, "step": self.step, "epoch": self.epoch,
                   "batch_in_epoch": self.batch_in_epoch, "model": model_sd, "ema": ema_sd,
                   "optimizer": opt_sd, "rng": rng, "config": dataclasses.asdict(self.cfg),
                   "model_config": self.model_config, "family": self.family.name,
                   "world_size": self.dist.world, "dataset_len": len(self.dataset)}
            path = self.ckpt_dir / f"{CKPT_PREFIX}{self.step:08d}.pt"
            save_object(obj, path)
            with atomic_path(self.ckpt_dir / "latest") as tmp:
                tmp.write_text(path.name + "\n", encoding="utf-8")
            for old in list_checkpoints(self.ckpt_dir)[:-self.cfg.keep_checkpoints]:
                if old != path:
                    old.unlink(missing_ok=True)
        barrier(self.dist)
        return path

    @torch.no_grad()
    def sample(self, n: Optional[int] = None) -> Optional[torch.Tensor]:
        """n samples from the EMA model as images in [-1, 1] (rank 0; every rank under FSDP).
        The noise and labels are the same every time, so grids are comparable across steps;
        the training random streams are left untouched."""
        n = self.cfg.num_samples if n is None else n
        if n <= 0 or not (self.rank0 or self.fsdp):
            return None
        ds, dev = self.dataset, self.dist.device
        gen = torch.Generator().manual_seed(self.cfg.seed)
        noise = torch.randn((n, ds.channels, ds.image_size, ds.image_size), generator=gen)
        labels = (torch.arange(n) % self.num_classes).to(dev) if self.num_classes else None
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
                torch.autocast(dev.type, dtype=self.amp or torch.float32,
                               enabled=self.amp is not None):
            x = self.family.sample(self.ema.module, noise.to(dev), labels, self.cfg)
        return self._to_images(x.float())

    def _to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in data space -> images in [-1, 1] for the grid."""
        if self.cfg.data != "latents":
            return x.clamp(-1, 1)
        if self.cfg.sample_vae:
            from .encode import LATENT_SCALE, load_vae
            vae = load_vae(self.cfg.sample_vae, x.device)
            return vae.decode(x / LATENT_SCALE).sample.float().clamp(-1, 1)
        # no decoder: show latent channels 0-2 as RGB, scaled by their spread
        v = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
        return (v / (3 * v.std().clamp_min(1e-6))).clamp(-1, 1)

    def write_samples(self) -> Optional[Path]:
        imgs = self.sample()
        if imgs is None or not self.rank0:
            return None
        nrow = self.num_classes if self.num_classes and imgs.shape[0] >= self.num_classes \
            else None
        step_png = self.out / "samples" / f"step_{self.step:08d}.png"
        save_grid(imgs, step_png, nrow=nrow)
        save_grid(imgs, self.out / "samples.png", nrow=nrow)
        return self.out / "samples.png"

    def write_plot(self) -> None:
        if self.rank0:
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png",
                      f"{self.cfg.model} on {self.cfg.data}")

    # ---- training ----
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        return cfg.lr

    def _batches(self):
        """(x, y) batches forever; the position (epoch, batch_in_epoch) is advanced by the
        consumer so a checkpoint records exactly what has been used."""
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch * self.batch_per_rank)
            self.dataset.set_epoch(self.epoch)
            self.loader_gen.manual_seed(self.cfg.seed * 100_003 + self.epoch)
            got = False
            for batch in self.loader:
                got = True
                yield batch
            if not got and self.batch_in_epoch == 0:
                raise RuntimeError("the data loader yielded no batch for a whole epoch")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, x: torch.Tensor, y: Optional[torch.Tensor]):
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        dev = self.dist.device
        with torch.autocast(dev.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            loss = self.loss_fn(self.net, x, y).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return loss.detach(), gn.detach(), lr

    def fit(self) -> dict:
        cfg, d = self.cfg, self.dist
        dev = d.device
        bar = None
        if self.rank0 and cfg.progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                           desc="train")
            except ImportError:
                bar = None
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        gn_max = torch.zeros((), dtype=torch.float64, device=dev)
        n_in_interval, t_interval, t_start = 0, 0.0, time.perf_counter()
        last_ckpt, start_step = None, self.step
        batches = self._batches()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                x, y = next(batches)
                self.batch_in_epoch += 1
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True) if self.num_classes else None
                loss, gn, lr = self.train_step(x, y)
                loss_sum += loss.double()
                gn_max = torch.maximum(gn_max, gn.double())
                n_in_interval += 1
                if dev.type == "cuda" and self.step % cfg.log_every == 0:
                    torch.cuda.synchronize(dev)
                t_interval += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    if d.world > 1:
                        import torch.distributed as dist
                        dist.all_reduce(loss_sum)
                        dist.all_reduce(gn_max, op=dist.ReduceOp.MAX)
                    mean_loss = loss_sum.item() / (n_in_interval * d.world)
                    rec = {"step": self.step, "loss": mean_loss, "lr": lr,
                           "grad_norm": gn_max.item(),
                           "images_per_s": n_in_interval * cfg.batch_size / max(t_interval, 1e-9),
                           "epoch": self.epoch, "time_s": time.perf_counter() - t_start}
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"the loss is {mean_loss} at step {self.step}: lower lr, keep "
                            f"grad_clip on; the last good checkpoint is "
                            f"{latest_checkpoint(self.ckpt_dir)}")
                    if self.rank0:
                        self.metrics.write(rec)
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean_loss:.4f}",
                                            img_s=f"{rec['images_per_s']:.1f}")
                        else:
                            print(f"step {self.step}/{cfg.steps} loss {mean_loss:.4f} "
                                  f"lr {lr:.3g} {rec['images_per_s']:.1f} img/s", flush=True)
                    loss_sum.zero_()
                    gn_max.zero_()
                    n_in_interval, t_interval = 0, 0.0
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 \
                        and self.step < cfg.steps:
                    last_ckpt = self.save_checkpoint()
                    self.write_plot()
                if cfg.sample_every and self.step % cfg.sample_every == 0 \
                        and self.step < cfg.steps:
                    self.write_samples()
        finally:
            if bar is not None:
                bar.close()
        if self.step > start_step:
            last_ckpt = self.save_checkpoint()
        self.write_plot()
        samples = self.write_samples()
        barrier(d)
        summary = {"step": self.step, "out": str(self.out), "checkpoint": last_ckpt,
                   "samples": samples, "loss_png": self.out / "loss.png",
                   "wall_s": time.perf_counter() - t_start}
        return summary

    def close(self) -> None:
        if self.dist.owns_group:
            import torch.distributed as dist
            barrier(self.dist)
            dist.destroy_process_group()
            self.dist.owns_group = False


def _describe(ds) -> str:
    from .data import describe
    return describe(ds)


def train(cfg: TrainConfig, resume: Optional[str] = None) -> dict:
    """Build a Trainer, fit, shut the process group down; returns fit()'s summary."""
    trainer = Trainer(cfg, resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


# ---- command line ---------------------------------------------------------------------------
def _add_config_flags(p: argparse.ArgumentParser, skip=()) -> None:
    """One flag per TrainConfig field; absent flags stay absent (argparse.SUPPRESS), so the
    config file's values survive."""
    g = p.add_argument_group("configuration (flags override --config)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: "
                  f"{f.default!r})")
        typ = f.metadata.get("type")
        if isinstance(f.default, bool) or f.name == "flip":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ or (type(f.default) if f.default is not None else str)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        g.add_argument(flag, dest=f.name, **kw)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train latent or image-space DiffiT",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="JSON file of TrainConfig fields")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from OUT/checkpoints/latest (or PATH); starts fresh when "
                        "there is no checkpoint yet")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON and exit")
    _add_config_flags(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args) -> TrainConfig:
    d: Dict[str, Any] = load_config_file(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    d.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_dict(d, str(args.config) if args.config else "flags")


def run(args) -> int:
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        summary = train(cfg, args.resume)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"diffit train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"diffit train: {summary['step']} steps in {summary['wall_s']:.1f} s; outputs in "
              f"{summary['out']}")
    return 0


__all__ = ["CKPT_PREFIX", "FAMILIES", "FORMAT", "CheckpointError", "DistInfo", "Family",
           "MetricsLog", "TrainConfig", "Trainer", "add_parser", "config_from_args",
           "config_from_dict", "family_of", "latest_checkpoint", "list_checkpoints",
           "load_config_file", "plot_loss", "read_checkpoint", "rng_state", "run", "save_grid",
           "seed_all", "set_rng_state", "train"]
