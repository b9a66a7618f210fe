"""`python -m diffit train`: DiffiT training for the latent model (ADM loss) and the image-space
U-Net (EDM loss), on one device or under torchrun (DDP, or FSDP with --fsdp).

    python -m diffit train --model tiny --data digits --image-size 16 --steps 2000 --out runs/d
    python -m diffit train --config configs/latent_s2.json --data-path latents.pt
    torchrun --nproc_per_node=8 -m diffit train --config configs/latent_xl2.json --resume

Configuration: dataclass defaults < the JSON file given with --config < flags. The preset picks
the model family through FAMILIES (diffit/training/families.py, the only model-specific code):
latent presets ("DiffiT-S/2", ..., "DiffiT-XL/2") train with the ADM / DiT Gaussian diffusion
loss (eps + learned variance) and sample with its ancestral sampler; image-space presets ("tiny",
"cifar10", "ffhq64") train with EDM's loss and sample with EDM's Heun sampler. The data sets the
model's input size, channels and (with class_cond) classes.

How it runs: on CUDA the blocks are compiled in place with torch.compile (diffit/accel.py,
fullgraph), each compiled block replayed as a CUDA graph in one process without gradient
checkpointing (--compile-mode default: compile only; --no-compile: eager); on CPU eager. Inside
them run our fused kernels or the plain reference ops: --backend auto (the default) times a few
forward + backward passes of the run's own step with each at start-up and keeps the faster (a
resumed run keeps its checkpoint's choice on a card of the same name); --backend triton or torch
fixes it. The log names the configuration, the timings and the first step's time.

Outputs under --out (rank 0 writes; every file is written atomically or appended line by line):
    config.json                     the resolved configuration
    metrics.jsonl                   one line per log interval: step, loss, lr, grad_norm, images/s;
                                    digits with a class-conditional model: a line {step,
                                    digits_quality} after each sample grid (diffit.quality)
    loss.png                        the loss curve (matplotlib), refreshed at every checkpoint
    samples.png, samples/step_*.png sample grids from the EMA model (every sample_every steps)
    checkpoints/ckpt_<step>.pt      model, EMA, optimizer, step, data position, RNG states of
    checkpoints/latest              every rank, config; the last keep_checkpoints are kept and
                                    `latest` names the newest complete one

--resume continues from checkpoints/latest (or --resume PATH): the model, EMA, optimizer, data
order and every rank's random state are restored, so on CPU the losses after resuming equal those
of an uninterrupted run bit for bit. An unreadable or mismatched checkpoint is an error that names
the file and the earlier checkpoints that remain.

Resuming on another number of ranks works too, with the same global batch_size (each rank takes
batch_size / world, which must divide): model, EMA and optimizer are saved whole (full state dicts
under FSDP as well), so any world size, with or without FSDP, loads them; the data continues at the
same place in the epoch's order (a position counted in global batches; only where an epoch ends
depends on the world size); a rank the checkpoint holds a random state for restores it, any other
seeds every generator with fresh_rank_seed(seed, step, rank). Bit-for-bit equality with an
uninterrupted run is promised only at the same world size.

Stopping (preemption): SIGTERM (what Slurm and Kubernetes send before a kill), SIGUSR1 (Slurm's
--signal) and SIGINT (Ctrl-C) end the run after the current step (data-loader workers ignore
them and end with the loader). The ranks agree on that step, rank 0 writes a complete checkpoint
(`latest` moves only once it is), the sample grid is skipped, and the process exits with status
75 (EXIT_STOPPED, sysexits' EX_TEMPFAIL: try again later; 0 = finished, 2 = bad arguments, 1 =
crash): run the same command with --resume to continue. Further signals while the checkpoint is
written are ignored (SIGKILL still ends the process at once; the unfinished temporary file is
never named `latest`). torchrun forwards SIGTERM and SIGINT to its workers (add SIGUSR1 with
--signals-to-handle), kills them --shutdown-timeout seconds later (30 by default: the checkpoint
must be written within that) and exits 1 when a worker exits 75.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

# re-exported: diffit.training.train is where users and tests find the training API
from ..accel import autocast
from .config import (_RESUME_FREE, TrainConfig, config_from_dict,  # noqa: F401
                     load_config_file)
from .families import FAMILIES, Family, family_of
from .feedback import MetricsLog, Progress, plot_loss, sample_images, save_grid
from .state import (CKPT_PREFIX, FORMAT, STOP_SIGNALS, CheckpointError, DistInfo,
                    StopRequest, barrier, check_compatible, fresh_rank_seed, full_state_dicts,
                    gather_objects, ignore_stop_signals, init_distributed, latest_checkpoint,
                    list_checkpoints, load_training_state, read_checkpoint, rng_state, seed_all,
                    set_rng_state, shut_down, wrap_model, write_checkpoint)

# exit status of `python -m diffit train` stopped by a signal with its checkpoint complete:
# sysexits' EX_TEMPFAIL ("try again later"), so a requeue wrapper can tell it from success (0),
# bad arguments (2) and crashes (1)
EXIT_STOPPED = 75


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
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch, kept when resuming "
                             f"on another number of ranks) must be divisible by the world size "
                             f"{d.world}")
        self.batch_per_rank = cfg.batch_size // d.world
        self.sampler = ResumableSampler(ds, d.world, d.rank, seed=cfg.seed)
        if self.sampler.num_samples < self.batch_per_rank:
            raise ValueError(f"the dataset has {len(ds)} items: fewer than one batch of "
                             f"{self.batch_per_rank} per rank")
        self.loader_gen = torch.Generator()
        self.loader = DataLoader(ds, batch_size=self.batch_per_rank, sampler=self.sampler,
                                 drop_last=True, num_workers=cfg.num_workers,
                                 pin_memory=d.device.type == "cuda", generator=self.loader_gen,
                                 worker_init_fn=ignore_stop_signals)

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
        self.net = wrap_model(self.model, self.ema.module, d, self.fsdp,
                              fam.block_types())
        # after the EMA's deepcopy and the DDP / FSDP wrapping: only the trained model's blocks
        # are compiled (the state-dict keys do not change)
        from ..accel import compile_for_run
        self.compiled, mode, describe = compile_for_run(
            self.model, cfg.compile, d.device, fsdp=self.fsdp, mode=cfg.compile_mode,
            world=d.world, grad_checkpointing=cfg.grad_checkpointing)
        self.cudagraphs = self.compiled and mode == "reduce-overhead"
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 weight_decay=cfg.weight_decay)
        self.loss_fn = fam.make_loss(self.model, cfg)
        self.amp = (torch.bfloat16 if cfg.precision == "bf16" or
                    (cfg.precision == "auto" and d.device.type == "cuda") else None)
        seed_all(cfg.seed * d.world + d.rank)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.saved_step: Optional[int] = None      # the step the newest checkpoint holds
        self.backend_choice: Optional[dict] = None  # backend "auto" timed (_choose_backend)

        resume_path = self._find_resume(resume)
        saved_choice = self._load(resume_path) if resume_path is not None else None
        choice_note = self._choose_backend(saved_choice)
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            from ..checkpoint import atomic_path
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
        self.run_mode = describe(self.backend_choice["backend"] if self.backend_choice
                                 else cfg.backend)
        self._log(f"diffit train: runs {self.run_mode}")
        if choice_note:
            self._log(f"diffit train: {choice_note}")

    # ---- setup helpers ----
    @property
    def fsdp(self) -> bool:
        return self.cfg.fsdp and self.dist.world > 1

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

    def _load(self, path: Path) -> Optional[dict]:
        """Model, EMA, optimizer, step and data position from a checkpoint of any world size;
        this rank's random state when the checkpoint has one (see the module docstring).
        Returns the checkpoint's backend choice (_choose_backend), if it has one."""
        cfg, d = self.cfg, self.dist
        ck = read_checkpoint(path)
        free = _RESUME_FREE - ({"steps"} if cfg.lr_schedule == "cosine" else set())
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        model_defaults = {f.name: f.default for f in dataclasses.fields(self.model.config)
                          if f.default is not dataclasses.MISSING}
        check_compatible(ck, path, config=dataclasses.asdict(cfg), free=free, defaults=defaults,
                         model_config=self.model_config, model_state=self.model.state_dict(),
                         dataset_len=len(self.dataset), model_defaults=model_defaults)
        load_training_state(ck, path, self.model, self.ema.module, self.optimizer, self.fsdp)
        self.step, self.epoch = int(ck["step"]), int(ck["epoch"])
        self.batch_in_epoch = int(ck["batch_in_epoch"])
        if d.rank < len(ck["rng"]):
            set_rng_state(ck["rng"][d.rank], d.device)
        else:
            seed_all(fresh_rank_seed(cfg.seed, self.step, d.rank))
        saved = int(ck["world_size"])
        if saved != d.world:
            # batch_in_epoch counts global batches, so the next one starts at the same place in
            # the epoch's order at any world size; only where the epoch ends depends on the
            # world size (DistributedSampler pads every shard to the same length)
            if self.batch_in_epoch >= self.sampler.num_samples // self.batch_per_rank:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            span = (lambda a, b: f"rank {a}" if a == b else f"ranks {a}-{b}")
            streams = (f"{span(saved, d.world - 1)} seeded afresh" if d.world > saved else
                       f"the random streams of {span(d.world, saved - 1)} end")
            self._log(f"resuming a checkpoint of {saved} ranks on {d.world}: global batch "
                      f"{cfg.batch_size} as {d.world} x {self.batch_per_rank} (was {saved} x "
                      f"{cfg.batch_size // saved}); {streams}; the losses will not match a "
                      f"{saved}-rank run bit for bit")
        self.saved_step = self.step
        self._log(f"resumed from {path} at step {self.step}")
        return ck.get("backend_choice")

    def _choose_backend(self, saved: Optional[dict]) -> str:
        """Backend "auto" where both backends run (CUDA): time the forward + backward of this
        run's step with each and keep the faster on the model and its EMA copy
        (accel.choose_backend); every rank agrees (the slowest rank's times decide). A resumed
        run keeps its checkpoint's choice when it was made on a card of the same name. Our
        kernels are left out when a call of our ops in the loss's forward on the trial batch
        does not match the reference by the numerics rule (accel.check_kernels, at this run's
        shapes, gradients included), or when their first step's loss is not finite
        or not the reference's to within accel.TRIAL_RTOL on the same batch and noise (a
        wrong result on this card; at a fresh start the zero-initialised output layers make
        the loss blind to the blocks, so this bites on resumed runs). The trial changes nothing
        a step depends on: one batch read from the dataset, no optimizer step, the gradients
        dropped, every random state put back; under DDP it runs the bare model (DDP's gradient
        hooks stay idle outside its forward). Returns the log line, or "" where the choice is
        fixed."""
        from .. import accel

        d = self.dist
        candidates = accel.backends_to_time(self.cfg.backend, d.device)
        if not candidates:
            return ""
        card = accel.device_name(d.device)
        if saved and saved.get("backend") in candidates and saved.get("device") == card:
            self.backend_choice = saved
            accel.set_backend((self.model, self.ema.module), saved["backend"])
            how = f"the choice of the run's checkpoint, timed on {card}"
        else:
            rng = rng_state(d.device)
            x, y = self._trial_batch()

            def probe():  # the loss's forward on the trial batch, for accel.check_kernels
                # (under FSDP without autograd: a sharded forward whose backward never runs
                # would leave its gradient hooks waiting; the check is then forward-only)
                with accel.autocast(d.device, self.amp), \
                        torch.no_grad() if self.fsdp else contextlib.nullcontext():
                    return self.loss_fn(self.model, x, y)

            try:
                # the model itself, not DDP's wrapper: no gradient all-reduce, the same for
                # both, so a backend failing on one rank cannot leave the others waiting in one;
                # each backend's first step from the same random state, so their losses compare
                chosen, merged, secs = accel.choose_backend(
                    lambda: self._forward_backward(x, y, self.model).detach(),
                    (self.model, self.ema.module), candidates, d.device, d.world,
                    start=lambda b: set_rng_state(rng, d.device), probe=probe)
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                set_rng_state(rng, d.device)
            self.backend_choice = {"backend": chosen, "ms": merged, "device": card}
            how = accel.timing_note("steps", d.device, secs)
        return accel.describe_choice(self.backend_choice["backend"], self.backend_choice["ms"],
                                     how)

    def _trial_batch(self):
        """The first batch_per_rank items of the dataset, on the device (the loader's position
        is not moved)."""
        from torch.utils.data import default_collate

        n, dev = self.batch_per_rank, self.dist.device
        x, y = default_collate([self.dataset[i % len(self.dataset)] for i in range(n)])
        return x.to(dev), (y.to(dev) if self.num_classes else None)

    # ---- checkpoint / samples / plots ----
    def save_checkpoint(self) -> Optional[Path]:
        """Every rank calls this (state gathering is collective); rank 0 writes."""
        rng = gather_objects(rng_state(self.dist.device), self.dist)
        model_sd, ema_sd, opt_sd = full_state_dicts(self.model, self.ema.module, self.optimizer,
                                                    self.fsdp)
        path = None
        if self.rank0:
            obj = {"format": FORMAT, "step": self.step, "epoch": self.epoch,
                   "batch_in_epoch": self.batch_in_epoch, "model": model_sd, "ema": ema_sd,
                   "optimizer": opt_sd, "rng": rng, "config": dataclasses.asdict(self.cfg),
                   "model_config": self.model_config, "family": self.family.name,
                   "world_size": self.dist.world, "dataset_len": len(self.dataset)}
            if self.backend_choice is not None:
                obj["backend_choice"] = self.backend_choice
            path = write_checkpoint(obj, self.ckpt_dir, self.step, self.cfg.keep_checkpoints)
        barrier(self.dist)
        self.saved_step = self.step
        return path

    def sample(self, n: Optional[int] = None) -> Optional[torch.Tensor]:
        """n samples from the EMA model as images in [-1, 1] (rank 0; every rank under FSDP),
        from the same noise and labels every time (see feedback.sample_images)."""
        n = self.cfg.num_samples if n is None else n
        if n <= 0 or not (self.rank0 or self.fsdp):
            return None
        return sample_images(self.family, self.ema.module, self.dataset, self.cfg,
                             self.num_classes, self.amp, self.dist.device, n)

    def write_samples(self) -> Optional[Path]:
        imgs = self.sample()
        if imgs is None or not self.rank0:
            return None
        nrow = self.num_classes if self.num_classes and imgs.shape[0] >= self.num_classes \
            else None
        step_png = self.out / "samples" / f"step_{self.step:08d}.png"
        save_grid(imgs, step_png, nrow=nrow)
        save_grid(imgs, self.out / "samples.png", nrow=nrow)
        if self.cfg.data == "digits" and self.num_classes:
            self.write_digits_quality(imgs)
        return self.out / "samples.png"

    def write_digits_quality(self, imgs: torch.Tensor) -> Optional[dict]:
        """The grid's digits quality (diffit.quality: a classifier's accuracy on the labels the
        grid drew for, the Frechet distance of its features) as a metrics.jsonl line of its own
        {"step", "digits_quality"}; None without scikit-learn."""
        from ..quality import digits_quality

        labels = torch.arange(imgs.shape[0]) % self.num_classes    # as sample_images drew them
        try:
            q = digits_quality(imgs, labels)
        except ImportError as e:
            self._log(f"diffit train: no digits quality for the samples: {e}")
            return None
        self.metrics.write({"step": self.step, "digits_quality": q})
        self._log(f"diffit train: step {self.step} samples: classifier accuracy "
                  f"{q['accuracy']:.3f} (real digits {q['reference']['accuracy']:.3f}), Frechet "
                  f"distance {q['frechet_distance']:.3f} (real "
                  f"{q['reference']['frechet_distance']:.3f})")
        return q

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
        loss = self._forward_backward(x, y)
        params = [p for p in self.model.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return loss.detach(), gn.detach(), lr

    def _forward_backward(self, x: torch.Tensor, y: Optional[torch.Tensor],
                          net: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """The loss of one batch and its gradients (the optimizer's zeroed first), through
        `net` (default self.net)."""
        dev = self.dist.device
        if self.cudagraphs:
            # a new step for inductor's cudagraph trees: the last step's block outputs (all
            # consumed by now) may be overwritten by this step's replays
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(dev, self.amp):
            loss = self.loss_fn(self.net if net is None else net, x, y).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def fit(self) -> dict:
        """Train to cfg.steps; then the final checkpoint, loss plot and sample grid. SIGTERM,
        SIGUSR1 or SIGINT ends the run after the current step on every rank, with a checkpoint
        and no sample grid; the summary's `stopped` then names the signal (else None)."""
        with StopRequest(self.dist) as stop:
            if not stop.installed:
                self._log("diffit train: not in the main thread: stop signals are not handled")
            return self._fit(stop)

    def _fit(self, stop: StopRequest) -> dict:
        cfg, d = self.cfg, self.dist
        dev = d.device
        progress = Progress(cfg.steps, self.step, bar=cfg.progress) if self.rank0 else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        gn_max = torch.zeros((), dtype=torch.float64, device=dev)
        n_in_interval, t_interval, t_start = 0, 0.0, time.perf_counter()
        last_ckpt, start_step, stopped = None, self.step, None
        batches = self._batches()
        try:
            while self.step < cfg.steps and not stopped:
                t0 = time.perf_counter()
                x, y = next(batches)
                self.batch_in_epoch += 1
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True) if self.num_classes else None
                first = self.step == start_step
                loss, gn, lr = self.train_step(x, y)
                if first:
                    self._first_step_note(t0, progress)
                loss_sum += loss.double()
                gn_max = torch.maximum(gn_max, gn.double())
                n_in_interval += 1
                if dev.type == "cuda" and self.step % cfg.log_every == 0:
                    torch.cuda.synchronize(dev)
                t_interval += time.perf_counter() - t0
                if progress is not None:
                    progress.update(self.step)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._write_metrics(loss_sum, gn_max, n_in_interval, t_interval, lr,
                                        time.perf_counter() - t_start, progress)
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
                stopped = stop.agreed()
        finally:
            # shuts the loader's workers down now: they ignore SIGTERM (ignore_stop_signals),
            # so at interpreter exit multiprocessing could not terminate them
            batches.close()
            if progress is not None:
                progress.close()
        if stopped:
            self._log(f"diffit train: {stopped} received: stopping after step {self.step} of "
                      f"{cfg.steps}, writing a checkpoint")
        t_save = time.perf_counter()
        if self.step > start_step and self.saved_step != self.step:
            last_ckpt = self.save_checkpoint()
        self.write_plot()
        # a signal during the final checkpoint skips the sample grid (every rank agrees)
        stopped = stopped or stop.agreed()
        samples = None
        if stopped:
            self._log(f"diffit train: checkpoint for step {self.step} complete "
                      f"({time.perf_counter() - t_save:.1f} s"
                      f"{f', {stop.ignored} later signal(s) ignored' if stop.ignored else ''}); "
                      f"exiting with status {EXIT_STOPPED}: run the same command with --resume "
                      "to continue")
        else:
            samples = self.write_samples()
        barrier(d)
        return {"step": self.step, "out": str(self.out), "checkpoint": last_ckpt,
                "samples": samples, "loss_png": self.out / "loss.png", "stopped": stopped,
                "wall_s": time.perf_counter() - t_start}

    def _first_step_note(self, t0: float, progress: Optional[Progress]) -> None:
        """Log the first step's wall time: it includes torch.compile and kernel autotuning,
        which the images/s of the metrics lines after it no longer pay."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        what = ("torch.compile of the blocks and kernel autotuning" if self.compiled
                else "kernel compilation and autotuning")
        text = f"diffit train: first step {time.perf_counter() - t0:.1f} s (includes {what})"
        if progress is not None:
            progress.note(text)

    def _write_metrics(self, loss_sum, gn_max, n: int, t_interval: float, lr: float,
                       elapsed: float, progress: Optional[Progress]) -> None:
        """One metrics.jsonl line for the interval that ends now (a collective with world > 1)."""
        cfg, d = self.cfg, self.dist
        if d.world > 1:
            import torch.distributed as dist
            dist.all_reduce(loss_sum)
            dist.all_reduce(gn_max, op=dist.ReduceOp.MAX)
        mean_loss = loss_sum.item() / (n * d.world)
        rec = {"step": self.step, "loss": mean_loss, "lr": lr, "grad_norm": gn_max.item(),
               "images_per_s": n * cfg.batch_size / max(t_interval, 1e-9),
               "epoch": self.epoch, "time_s": elapsed}
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"the loss is {mean_loss} at step {self.step}: lower lr, keep grad_clip on; the "
                f"last good checkpoint is {latest_checkpoint(self.ckpt_dir)}")
        if not self.rank0:
            return
        self.metrics.write(rec)
        text = (f"step {self.step}/{cfg.steps} loss {mean_loss:.4f} lr {lr:.3g} "
                f"{rec['images_per_s']:.1f} img/s")
        if progress is not None:
            progress.metrics(text, loss=f"{mean_loss:.4f}", img_s=f"{rec['images_per_s']:.1f}")
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.dist.owns_group:
            shut_down(self.dist)
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
        if isinstance(f.default, bool) or f.name in ("flip", "compile"):
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
        what = (f"stopped by {summary['stopped']} at step {summary['step']}"
                if summary["stopped"] else f"{summary['step']} steps")
        print(f"diffit train: {what} in {summary['wall_s']:.1f} s; outputs in {summary['out']}")
    return EXIT_STOPPED if summary["stopped"] else 0


__all__ = ["CKPT_PREFIX", "EXIT_STOPPED", "FAMILIES", "FORMAT", "STOP_SIGNALS",
           "CheckpointError", "DistInfo", "Family", "StopRequest",
           "MetricsLog", "TrainConfig", "Trainer", "add_parser", "config_from_args",
           "config_from_dict", "family_of", "latest_checkpoint", "list_checkpoints",
           "load_config_file", "plot_loss", "read_checkpoint", "rng_state", "run", "save_grid",
           "seed_all", "set_rng_state", "train"]
