"""Training state outside the training loop: process group setup, stop signals agreed over the
ranks, every rank's random state, and the checkpoint files of `python -m diffit train` (writing,
listing, reading with checks, loading into a run of any world size).

A checkpoint is written under a temporary name, flushed to disk and renamed; `latest` is rewritten
only after the file it names is complete, and older files are removed only after that.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    cpu_group: Any = None   # gloo group for host-side flags (None: the default group is gloo)


def init_distributed(device_arg: Optional[str]) -> DistInfo:
    """Rank / world from torchrun's environment; NCCL on CUDA, gloo on CPU. With NCCL a small
    gloo group carries the per-step stop flag (StopRequest.agreed), so the check never waits for
    the GPU; like any gloo group it needs GLOO_SOCKET_IFNAME where the host name does not resolve
    to the address the other nodes reach."""
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
    cpu_group = None
    if world > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        if "gloo" not in str(dist.get_backend()):
            # the stop flag is agreed every step: over gloo that never waits for the GPU queue
            cpu_group = dist.new_group(backend="gloo")
    return DistInfo(rank, world, local, device, owns, cpu_group)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist
        dist.barrier()


LEAVE_TIMEOUT_S = 60.0


def shut_down(info: DistInfo) -> None:
    """The end of a process group this process made: every rank at a barrier, each destroys
    its groups, and none returns (so none exits) before every rank has: a rank that exited
    while a peer still tore its gloo group down left that peer to abort now and then
    ("terminate called without an active exception", SIGABRT after a finished run, once in
    CI under torchrun; the spawned test workers met it twice before they left this way)."""
    import torch.distributed as dist

    barrier(info)
    store = dist.distributed_c10d._get_default_store()  # outlives the groups: ours to hold
    dist.destroy_process_group()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    leave_together(store, info.world, f"diffit/left/{restart}")


def leave_together(store, world: int, key: str, timeout_s: float = LEAVE_TIMEOUT_S) -> bool:
    """Count this rank in at `key` of the group's store and wait until all `world` ranks have
    (at most timeout_s). Returns whether they all did; a store that fails (its host gone)
    ends the wait: a finished run never fails at its exit."""
    import time

    deadline = time.monotonic() + timeout_s
    try:
        store.add(key, 1)
        while store.add(key, 0) < world:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
    except Exception:  # noqa: BLE001 - best effort, see above
        return False
    return True


def gather_objects(obj, info: DistInfo) -> list:
    from ..accel import all_ranks
    return all_ranks(obj, info.world)



def wrap_model(model, ema_module, info: DistInfo, fsdp: bool, block_types: tuple):
    """What the loss calls: the model itself on one process, DDP(model), or under FSDP the model
    (and its EMA copy) sharded in place, one FSDP unit per block of `block_types` plus the root."""
    if info.world == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        mesh = init_device_mesh(info.device.type, (info.world,))
        for module in (model, ema_module):
            for m in list(module.modules()):
                if isinstance(m, block_types):
                    fully_shard(m, mesh=mesh)
            fully_shard(module, mesh=mesh)
        if hasattr(ema_module, "forward_with_cfg"):
            register_fsdp_forward_method(ema_module, "forward_with_cfg")
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")



def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the stop signals are the main process's to act on. Slurm
    signals every process of a job step and Ctrl-C reaches the whole process group; a loader
    worker killed by one would crash the step the main process is finishing. The workers still
    end when the loader shuts down (Trainer.fit closes it) or the main process dies, but no
    longer on the SIGTERM of multiprocessing's terminate()."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)

class StopRequest:
    """SIGTERM, SIGUSR1 and SIGINT become a request to stop after the current step.

    The handler only records the signal: it can run in the middle of a print or of a checkpoint
    write, so it does no I/O and raises nothing. The training loop calls `agreed()` after every
    step; it takes the largest signal number over the ranks (all-reduce MAX on a CPU group), so
    all ranks stop after the same step even when one alone was signalled: a rank that stopped
    alone would leave the others waiting in their next collective. Signals after the first are
    counted in `ignored` and otherwise ignored, so a second one (Slurm signals every process of a
    step and torchrun forwards its own; an impatient Ctrl-C) cannot cut the checkpoint short.

    A context manager: the handlers are installed on entry and the previous ones restored on exit.
    Python installs handlers only in the main thread; elsewhere `installed` stays False.
    """

    def __init__(self, dist: Optional[DistInfo] = None, signals: Sequence[str] = STOP_SIGNALS):
        self.dist = dist
        self.signals = [getattr(signal, s) for s in signals if hasattr(signal, s)]
        self.received = 0               # the first signal's number, 0 = none yet
        self.ignored = 0                # signals after the first
        self.installed = False
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            self.ignored += 1
        else:
            self.received = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: the handler was set outside Python and cannot be put back; the default is
            # closest to it
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        self.installed = False

    def agreed(self) -> Optional[str]:
        """The name of the signal that stops the run (this rank's or another's), None to go on.
        With world > 1 a collective: every rank calls it after the same step."""
        sig = self.received
        if self.dist is not None and self.dist.world > 1:
            import torch.distributed as dist
            flag = torch.tensor([sig], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dist.cpu_group)
            sig = int(flag.item())
        return signal.Signals(sig).name if sig else None


def seed_all(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def fresh_rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank that a checkpoint holds no random state for (a run resumed on more
    ranks than wrote it): the first 8 bytes of sha256("diffit-resume:<seed>:<step>:<rank>"),
    as a non-negative int. The same on every machine and unrelated to other ranks' streams."""
    digest = hashlib.sha256(f"diffit-resume:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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



def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass                    # some file systems refuse to fsync a directory: best effort
    finally:
        os.close(fd)


def write_checkpoint(obj: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """ckpt_<step>.pt, then `latest` naming it, then all but the newest `keep` removed. Each file
    is written under a temporary name, flushed to disk and renamed, so a crash, a kill or a
    preempted node at any moment leaves `latest` naming a complete checkpoint."""
    from ..checkpoint import atomic_path
    path = ckpt_dir / f"{CKPT_PREFIX}{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        _fsync(tmp)
    with atomic_path(ckpt_dir / "latest") as tmp:
        tmp.write_text(path.name + "\n", encoding="utf-8")
        _fsync(tmp)
    _fsync(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def check_compatible(ck: dict, path: Path, *, config: dict, free: set, defaults: dict,
                     model_config: dict, model_state: dict, dataset_len: int,
                     model_defaults: Optional[dict] = None) -> None:
    """CheckpointError unless checkpoint `ck` continues this run: same model configuration and
    state-dict shapes, same data size, same settings except those in `free` (a setting the
    checkpoint lacks counts as its value in `defaults`, a model field as its value in
    `model_defaults`: checkpoints written before a field existed). The world size may differ
    (see load_training_state)."""
    from ..latent import CheckpointMismatchError, check_state_dict_against
    theirs, model = {**(model_defaults or {}), **ck["model_config"]}, config.get("model")
    if ck["config"].get("model") != model or theirs != model_config:
        diff = [f"{k}: {theirs.get(k)!r} there vs {model_config.get(k)!r} here"
                for k in sorted(set(model_config) | set(theirs))
                if model_config.get(k) != theirs.get(k)]
        raise CheckpointError(
            f"checkpoint {path} was written for model {ck['config'].get('model')!r} "
            f"(this run: {model!r}) with a different configuration "
            f"({'; '.join(diff) or 'same fields'}); nothing was loaded"
            f"{other_checkpoints_hint(path)}")
    try:
        check_state_dict_against(model_state, ck["model"], str(path))
        check_state_dict_against(model_state, ck["ema"], f"{path} (ema)")
    except CheckpointMismatchError as e:
        raise CheckpointError(str(e)) from e
    if ck["dataset_len"] != dataset_len:
        raise CheckpointError(f"checkpoint {path} was trained on {ck['dataset_len']} items; "
                              f"this dataset has {dataset_len}")
    saved = {**defaults, **ck["config"]}
    diff = sorted(k for k in config if k not in free and saved.get(k) != config[k])
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was trained with different settings: "
            + ", ".join(f"{k}={saved.get(k)!r} there vs {config[k]!r} here" for k in diff)
            + "; pass the same settings to continue it, or start a new run with another --out")


def full_state_dicts(model, ema_module, optimizer, fsdp: bool) -> Tuple[dict, dict, dict]:
    """(model, EMA, optimizer) state dicts. Under FSDP the full ones, gathered to the CPU (a
    collective), with the optimizer state keyed by parameter name; otherwise torch's own (the
    optimizer's keyed by position). Both are independent of the world size."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=o),
                get_model_state_dict(ema_module, options=o),
                get_optimizer_state_dict(model, optimizer, options=o))
    return model.state_dict(), ema_module.state_dict(), optimizer.state_dict()


def _param_names(model, optimizer) -> List[str]:
    """State-dict names of the optimizer's parameters in its own order. Checkpoint wrappers
    (grad_checkpointing) add a level to parameter names but not to state-dict keys, which is
    what FSDP's full optimizer state names parameters by."""
    names = {id(p): n.replace("_checkpoint_wrapped_module.", "")
             for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def rekey_optimizer_state(sd: dict, names: List[str], by_name: bool, source: str) -> dict:
    """torch numbers an optimizer's parameters 0, 1, ... in param_groups order; FSDP's full
    optimizer state dict names them. Returns `sd` keyed the way asked (`names`: this optimizer's
    parameter names in its order), so a checkpoint written with or without FSDP loads into
    either."""
    keys = [k for g in sd["param_groups"] for k in g["params"]]
    if all(isinstance(k, str) for k in keys) == by_name:
        return sd
    to = dict(enumerate(names)) if by_name else {n: i for i, n in enumerate(names)}
    unknown = [k for k in keys if k not in to]
    if unknown or len(keys) != len(names):
        raise CheckpointError(f"{source}: the optimizer state holds {len(keys)} parameters "
                              f"(unknown here: {unknown[:5]}); this model's optimizer has "
                              f"{len(names)}")
    return {"state": {to[k]: v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [to[k] for k in g["params"]]}
                             for g in sd["param_groups"]]}


def load_training_state(ck: dict, path: Path, model, ema_module, optimizer, fsdp: bool) -> None:
    """Load a checkpoint's model, EMA and optimizer state, whatever world size and wrapping
    (single process, DDP or FSDP) wrote it: model and EMA entries are full state dicts, and the
    optimizer state is rekeyed to this run's form. Every rank calls it under FSDP."""
    names = _param_names(model, optimizer)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ck["model"], options=o)
        set_model_state_dict(ema_module, ck["ema"], options=o)
        set_optimizer_state_dict(model, optimizer,
                                 rekey_optimizer_state(ck["optimizer"], names, True, str(path)),
                                 options=o)
        return
    model.load_state_dict(ck["model"])
    ema_module.load_state_dict(ck["ema"])
    opt_sd = rekey_optimizer_state(ck["optimizer"], names, False, str(path))
    try:
        optimizer.load_state_dict(opt_sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from e
