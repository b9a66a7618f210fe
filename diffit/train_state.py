"""Training state outside the model: process group setup, every rank's random state, and the
checkpoint files of `python -m diffit train` (format, listing, reading with checks).

Checkpoints are written by Trainer.save_checkpoint through diffit.checkpoint.save_object (temp file
+ os.replace); `latest` is rewritten only after the checkpoint file it names is complete.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch

FORMAT = "diffit-train-1"
CKPT_PREFIX = "ckpt_"


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: Any
    owns_group: bool        # we initialised the process group, so we destroy it


def init_distributed(device_arg: Optional[str]) -> DistInfo:
    """Rank / world from torchrun's environment; NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if world > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, device, owns)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    if info.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out



def seed_all(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(device) -> dict:
    """Every generator a training step draws from, in a form torch.load(weights_only) reads."""
    import numpy as np
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                    "has_gauss": has_gauss, "cached": cached},
          "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device) -> None:
    import numpy as np
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)



class CheckpointError(ValueError):
    """A training checkpoint cannot be used; nothing was loaded."""


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoint files, oldest first (temporary files start with '.')."""
    if not ckpt_dir.is_dir():
        return []
    files = [p for p in ckpt_dir.glob(f"{CKPT_PREFIX}*.pt") if p.stem[len(CKPT_PREFIX):].isdigit()]
    return sorted(files, key=lambda p: int(p.stem[len(CKPT_PREFIX):]))


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The file `latest` names (the newest file when a crash came between writing the first
    checkpoint and its pointer), or None when there is no checkpoint yet."""
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        files = list_checkpoints(ckpt_dir)
        return files[-1] if files else None
    name = pointer.read_text(encoding="utf-8").strip()
    path = ckpt_dir / name
    if not name or not path.is_file():
        others = [p.name for p in list_checkpoints(ckpt_dir)]
        raise CheckpointError(f"{pointer} names {name!r}, which does not exist; checkpoints "
                              f"present: {others or 'none'} (resume one with --resume PATH)")
    return path


def other_checkpoints_hint(path: Path) -> str:
    others = [str(p) for p in list_checkpoints(path.parent) if p.resolve() != path.resolve()]
    if not others:
        return ""
    return f"; other checkpoints in {path.parent}: {others} (resume one with --resume PATH)"


def read_checkpoint(path: Path) -> dict:
    """Load a training checkpoint (CPU tensors) with checks; CheckpointError when unusable."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}{other_checkpoints_hint(path)}") from e
    need = ("format", "step", "epoch", "batch_in_epoch", "model", "ema", "optimizer", "rng",
            "config", "model_config", "world_size", "dataset_len")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a diffit training checkpoint "
                              f"(format {FORMAT!r}){other_checkpoints_hint(path)}")
    missing = [k for k in need if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks entries {missing}"
                              f"{other_checkpoints_hint(path)}")
    return obj

