"""The checkpoint `python -m diffit sample` and `diffit demo` sample from.

read_sampling_checkpoint finds the weights in any form the trainer or a release leaves (run
directory, checkpoints folder, `latest` pointer, trainer checkpoint, bare state dict) together
with the family and configuration they record.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from .checkpoint import (PathLike, _is_optimizer_state, _strip_prefixes, load_state_dict_file,
                         state_dict_from_object)


# ---- checkpoints for sampling ---------------------------------------------------------------
# what `python -m diffit sample` and `diffit demo` take: a run directory, its checkpoints folder,
# the `latest` pointer, a trainer checkpoint, or a bare (official / safetensors) state dict


class SamplingCheckpointError(ValueError):
    """A checkpoint cannot be sampled from; the message names the file and what it holds."""


@dataclass
class SamplingCheckpoint:
    """The weights to sample from and what the checkpoint says about its model."""
    path: Path                        # the file the weights were read from
    kind: str                         # "trainer" (python -m diffit train) or "state dict"
    family: str                       # "latent" or "image" (diffit.training.families.FAMILIES)
    weights: str                      # "ema", "model", or "file" (a bare state dict)
    state_dict: Dict[str, torch.Tensor]
    preset: Optional[str] = None      # the trainer's model preset
    model_config: Optional[dict] = None  # the trainer's model config (asdict of the dataclass)
    train_config: Optional[dict] = None  # the trainer's TrainConfig (asdict)
    step: Optional[int] = None        # training step of a trainer checkpoint

    @property
    def data_is_latent(self) -> bool:
        """Whether the model's data space is VAE latents (decode to get images): official
        latent checkpoints and latent runs trained on --data latents; a latent-family run on
        pixels (digits, folders) samples images directly."""
        if self.family != "latent":
            return False
        return self.train_config is None or self.train_config.get("data") == "latents"

    def describe(self) -> str:
        what = (f"trainer checkpoint, step {self.step}" if self.kind == "trainer"
                else "state dict")
        w = {"ema": "EMA weights", "model": "training (non-EMA) weights",
             "file": "the file's weights"}[self.weights]
        preset = f" {self.preset}" if self.preset else ""
        return f"{self.path} ({what}): {self.family} model{preset}, {w}"


_TEXT_LIMIT = 4096   # a `latest` pointer is one short line; anything this small and textual is
                     # not a checkpoint


def _read_small_text(path: Path) -> Optional[str]:
    """The content of a small UTF-8 text file, else None (a binary checkpoint)."""
    if path.stat().st_size > _TEXT_LIMIT:
        return None
    raw = path.read_bytes()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def resolve_checkpoint(path: PathLike) -> Path:
    """The checkpoint file `path` stands for: a run directory (its checkpoints/ folder), a
    checkpoints folder or a `latest` pointer (the file it names), or a checkpoint file itself.
    FileNotFoundError / SamplingCheckpointError name the path and what was found there."""
    from .training.state import CKPT_PREFIX, CheckpointError, latest_checkpoint, list_checkpoints

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        try:
            found = latest_checkpoint(folder)
        except CheckpointError as e:
            raise SamplingCheckpointError(str(e).split(" (resume")[0]) from None
        if found is None:
            others = sorted(p.name for p in folder.iterdir())[:10]
            raise SamplingCheckpointError(
                f"{path} holds no checkpoint: no `latest` pointer and no "
                f"{CKPT_PREFIX}<step>.pt in {folder} (found: {others or 'nothing'})")
        return found
    text = _read_small_text(path)
    if text is None:
        return path
    name = text.strip()
    if not name or "\n" in name or "/" in name or not name.endswith(".pt"):
        raise SamplingCheckpointError(
            f"{path} is a {len(text.encode())}-byte text file, not a checkpoint nor a `latest` "
            f"pointer (it starts {text[:60]!r})")
    target = path.parent / name
    if not target.is_file():
        present = [p.name for p in list_checkpoints(path.parent)]
        raise SamplingCheckpointError(
            f"{path} is a `latest` pointer naming {name!r}, which does not exist in "
            f"{path.parent}; checkpoints present: {present or 'none'}")
    return target


def _state_dict_family(sd: Mapping[str, torch.Tensor], path: Path) -> str:
    if "x_embedder.proj.weight" in sd:
        return "latent"
    if "tokenizer.weight" in sd:
        return "image"
    raise SamplingCheckpointError(
        f"checkpoint {path} is not a DiffiT state dict: it has neither the latent model's "
        f"x_embedder.proj.weight nor the U-Net's tokenizer.weight (first keys: "
        f"{sorted(sd)[:6]})")


def read_sampling_checkpoint(path: PathLike, weights: Optional[str] = None
                             ) -> SamplingCheckpoint:
    """Read what `python -m diffit sample --checkpoint PATH` samples from.

    `path` as resolve_checkpoint takes it. A trainer checkpoint gives its family, preset, model
    and training configs and its EMA weights (weights="model": the training weights); a bare
    state dict (.safetensors, or a .pt holding one, maybe DiT-style under "ema" / "model") gives
    the family its keys belong to. Errors name the file and what it holds: a pointer, an
    optimizer state, an unknown family, a foreign file.
    """
    from .training.families import FAMILIES, family_of
    from .training.state import FORMAT

    if weights not in (None, "ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        if weights == "model":
            raise SamplingCheckpointError(f"--weights model: {file} is a bare state dict (one "
                                          "set of weights, no EMA / model choice)")
        sd = load_state_dict_file(file)
        return SamplingCheckpoint(file, "state dict", _state_dict_family(sd, file), "file", sd)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SamplingCheckpointError(
            f"checkpoint {file} is not a readable torch or safetensors file (truncated, corrupt, "
            f"or another format?): {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if isinstance(obj, Mapping) and "format" in obj:
        if obj["format"] != FORMAT:
            raise SamplingCheckpointError(f"checkpoint {file} has format {obj['format']!r}; "
                                          f"this version reads {FORMAT!r}")
        return _trainer_checkpoint(obj, file, weights, FAMILIES, family_of)
    if isinstance(obj, Mapping) and _is_optimizer_state(obj):
        raise SamplingCheckpointError(
            f"checkpoint {file} holds only an optimizer state (entries 'state', 'param_groups'), "
            "no model weights: pass the model checkpoint (checkpoints/latest of the run)")
    try:
        sd = state_dict_from_object(obj, file, weights)
    except (KeyError, ValueError) as e:
        raise SamplingCheckpointError(str(e).replace("; pass key=", "")) from None
    used = weights or next((k for k in ("ema", "model") if isinstance(obj, Mapping)
                            and isinstance(obj.get(k), Mapping)), "file")
    return SamplingCheckpoint(file, "state dict", _state_dict_family(sd, file), used, sd)


def _trainer_checkpoint(obj: Mapping, file: Path, weights: Optional[str], families,
                        family_of) -> SamplingCheckpoint:
    cfg = obj.get("config")
    missing = [k for k in ("model_config", "config") if not isinstance(obj.get(k), Mapping)]
    if missing:
        raise SamplingCheckpointError(f"trainer checkpoint {file} lacks {missing}: it cannot "
                                      "say which model it holds")
    preset = cfg.get("model")
    family = obj.get("family")
    if family is None:                      # written before checkpoints recorded the family
        try:
            family = family_of(str(preset)).name
        except ValueError as e:
            raise SamplingCheckpointError(f"trainer checkpoint {file}: {e}") from None
    if family not in families:
        raise SamplingCheckpointError(
            f"trainer checkpoint {file} records model family {family!r} (preset {preset!r}); "
            f"this version knows the families {sorted(families)}")
    key = weights or "ema"
    sd = obj.get(key)
    if not isinstance(sd, Mapping) or not sd:
        have = [k for k in ("ema", "model") if isinstance(obj.get(k), Mapping) and obj[k]]
        raise SamplingCheckpointError(f"trainer checkpoint {file} has no {key!r} weights "
                                      f"(it has {have or 'no weights at all'})")
    return SamplingCheckpoint(file, "trainer", family, key, _strip_prefixes(dict(sd)),
                              preset=preset, model_config=dict(obj["model_config"]),
                              train_config=dict(cfg), step=obj.get("step"))
