"""Checkpoint files: read / write state dicts as .safetensors or .pt, every write atomic.

A write goes to a temporary file in the destination's directory and is renamed over the target
with os.replace, so a crash or a full disk never leaves a half-written file under the real name.
What sampling reads from a run lives in diffit.sample_checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

# containers training scripts wrap a state dict in, tried in this order when no key is given
_NESTED_KEYS = ("ema", "model", "state_dict", "module")
# prefixes DDP and torch.compile add to every key
_PREFIXES = ("module.", "_orig_mod.")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make every output private
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path: PathLike, key: Optional[str] = None,
                         map_location: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch .pt / .pth / .bin file.

    .pt files may wrap the state dict (DiT-style {"model", "ema", "opt"}): `key` picks the entry;
    without it "ema", then "model", "state_dict", "module" are tried. DDP's "module." and
    torch.compile's "_orig_mod." prefixes are removed. A missing, unreadable or truncated file
    raises FileNotFoundError / ValueError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the safetensors package "
                              "(pip install safetensors)") from e
        try:
            sd = load_file(str(path), device=str(map_location))
        except Exception as e:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file "
                             f"(truncated or corrupt?): {e}") from e
        return _strip_prefixes(dict(sd))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is not a readable torch file "
                         f"(truncated or corrupt?): {e}") from e
    return state_dict_from_object(obj, path, key)


def state_dict_from_object(obj, path: PathLike, key: Optional[str] = None
                           ) -> Dict[str, torch.Tensor]:
    """The state dict inside what torch.load returned for `path` (see load_state_dict_file)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if key is not None:
        if key not in obj:
            raise KeyError(f"checkpoint {path} has no entry {key!r}; it has {sorted(obj)}")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if _is_optimizer_state(obj):
            raise ValueError(f"checkpoint {path} holds an optimizer state (entries 'state', "
                             "'param_groups'), not model weights")
        for k in _NESTED_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            opt = [k for k, v in obj.items() if isinstance(v, Mapping) and _is_optimizer_state(v)]
            raise ValueError(f"checkpoint {path} holds no state dict: its entries are "
                             f"{sorted(obj)}"
                             + (f" ({opt[0]!r} is an optimizer state, no model weights)"
                                if opt else "") + "; pass key=")
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path}: entry {key!r} is a {type(obj).__name__}, "
                         "not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path}: entries {bad[:5]} are not tensors")
    return _strip_prefixes(dict(obj))


def _is_optimizer_state(obj: Mapping) -> bool:
    return "param_groups" in obj and "state" in obj


def save_state_dict(sd: Mapping[str, torch.Tensor], path: PathLike,
                    metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write `sd` atomically: .safetensors by suffix (tensors cloned so none share storage),
    anything else with torch.save."""
    path = Path(path)
    tensors = {k: v.detach() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata)
        else:
            torch.save(tensors, tmp)
    return path


def save_object(obj, path: PathLike) -> Path:
    """torch.save any object (a training checkpoint with optimizer state, ...) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
