"""The training configuration of `python -m diffit train`: TrainConfig (dataclass defaults < the
JSON file given with --config < flags), the fields free to differ on resume, and the readers of
config files and dicts. The loop (diffit.training.train) and the model families
(diffit.training.families) both import it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional


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
    backend: str = _opt("auto", "diffit_kernels backend: triton (our fused kernels), torch (the "
                        "plain reference), auto (on CUDA the faster of the two, timed on the "
                        "run's own step at start-up; elsewhere the reference)",
                        choices=("auto", "triton", "torch"))
    grad_checkpointing: bool = _opt(False, "recompute every block in backward (less memory)")
    # data
    data: str = _opt("digits", "dataset kind", choices=("digits", "folder", "latents"))
    data_path: Optional[str] = _opt(None, "image folder, or latent tensor file (.pt/.npz/...)")
    image_size: Optional[int] = _opt(None, "image side (default: the preset's); latents "
                                     "define their own", type=int)
    channels: Optional[int] = _opt(None, "folder data: 3 reads RGB, 1 grayscale (default: "
                                   "the preset's)", type=int)
    flip: Optional[bool] = _opt(None, "random horizontal flips (default: on for folders)")
    augment: float = _opt(0.0, "image space: EDM's labelled geometric augmentation probability "
                          "(diffit.augment; EDM uses 0.12 on CIFAR-10, 0.15 on FFHQ-64); 0 = off")
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
    compile: Optional[bool] = _opt(None, "regional torch.compile of the blocks with the fused "
                                   "kernels inside (default: on for CUDA, off on CPU and under "
                                   "FSDP)")
    compile_mode: str = _opt("auto", "with compile: reduce-overhead also replays each block "
                             "as a CUDA graph (one process, no grad_checkpointing); auto = "
                             "reduce-overhead where it runs, else default",
                             choices=("auto", "default", "reduce-overhead"))
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
    progress: bool = _opt(True, "progress bar on a terminal; elsewhere plain progress lines "
                          "(no carriage-return redraws)")

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
        need(0.0 <= self.augment <= 1.0, f"augment must be in [0, 1], got {self.augment}")
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


# fields that do not change the training trajectory: free to differ when resuming. Every other
# field must match the checkpoint's; one the checkpoint lacks (added to TrainConfig after it was
# written) counts as its default, so a new field must default to the old behaviour
_RESUME_FREE = {"steps", "out", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
                "num_samples", "sample_steps", "guidance", "sample_vae", "progress",
                "num_workers", "data_path", "device", "backend", "compile", "compile_mode"}


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
