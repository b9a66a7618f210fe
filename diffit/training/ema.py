"""Exponential moving average of a model's weights (the model the samplers use).

    ema <- d * ema + (1 - d) * param          for every floating-point parameter
    ema <- buffer                             for buffers (copied, not averaged)
    d_step = min(decay, (1 + step) / (10 + step))   with warmup (else d_step = decay)

The warmup lets short runs (the demo, fine-tuning) get a useful average: with a fixed 0.9999 the
average still holds mostly the initial weights after 10k steps. It changes nothing in a long run,
where d_step reaches `decay` after ~ 1 / (1 - decay) steps.

The average is a full module (a deep copy of the model, no gradients, eval mode) so it can be
sampled from and saved like the model; with FSDP the copy is sharded the same way as the model,
and the update runs on the local shards.
"""
from __future__ import annotations

import copy
from typing import Iterator, Tuple

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class EMA:
    """EMA(model, decay=0.9999, warmup=True); call update(model, step) after each optimizer
    step. `module` is the averaged copy."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step `step` (0-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def _pairs(self, model: nn.Module) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
        mine = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            if name not in mine:
                raise KeyError(f"EMA has no parameter {name!r}: was it built from this model?")
            yield name, mine[name], p

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Average `model` (the unwrapped module, not DDP) into the EMA; returns the decay."""
        d = self.decay_at(step)
        ema_p, cur_p = [], []
        for _, e, p in self._pairs(model):
            if e.is_floating_point():
                ema_p.append(_local(e))
                cur_p.append(_local(p).to(e.dtype))
            else:
                _local(e).copy_(_local(p))
        if ema_p:
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - d)
        mine = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            if name in mine:
                _local(mine[name]).copy_(_local(b))
        return d

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the EMA equal to the model (no averaging)."""
        for _, e, p in self._pairs(model):
            _local(e).copy_(_local(p))
