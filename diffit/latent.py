"""Latent DiffiT (DESIGN.md section 7): the official release's model on the fused kernels.

    x [B, 4, I, I] -> patch embed + fixed 2-D sin-cos pos_embed           tokens [B, N, C]
    c = TimestepEmbedder(t) + LabelEmbedder(y)                           time token [B, C]
    depth x DiffiTBlock(x, c)            (or AdaLNBlock for the paper's ablation)
    LN -> SiLU -> Linear -> unpatchify                                   [B, out, I, I]

State-dict names and shapes are exactly the official ones, so an official checkpoint loads with
`load_state_dict(sd, strict=True)`; `DiffiT.from_pretrained` adds the checks and the inference
of the configuration from the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from diffit_kernels import adaln_norm, relative_position_index

from .layers import (LN_EPS, AdaLNBlock, DiffiTBlock, TimestepEmbedder, _check_backend,
                     get_2d_sincos_pos_embed)

CONDITIONINGS = ("tmsa", "adaln")


@dataclass
class DiffiTConfig:
    input_size: int = 32            # latent side (image side / 8); 32 and 64 are released
    patch_size: int = 2             # p: tokens are p x p latent patches
    in_channels: int = 4            # latent channels (SD VAE)
    hidden_size: int = 1152         # C
    depth: int = 28                 # number of blocks
    num_heads: int = 16             # H (head dim C / H = 72 for XL)
    mlp_ratio: float = 4.0          # MLP hidden = mlp_ratio * C
    class_dropout_prob: float = 0.1 # label dropout in training; > 0 adds the null class row
    num_classes: int = 1000         # 0 = unconditional (no label embedding)
    learn_sigma: bool = True        # output eps and the variance interpolation v (2x channels)
    conditioning: str = "tmsa"      # "tmsa" (DiffiT) or "adaln" (DiT adaLN-Zero, ablation)
    backend: str = "auto"           # "auto" | "triton" | "torch", handed to every op call
    grad_checkpointing: bool = False  # recompute blocks in backward to save activation memory

    def __post_init__(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, "
                             f"got {self.conditioning!r}")
        _check_backend(self.backend)
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} must be divisible by "
                             f"patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 "
                             "(2-D sin-cos positional embedding)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


# Widths / depths / heads: XL as released, S / B / L as DiT's; "tiny" is the test config.
PRESETS: Dict[str, dict] = {
    "DiffiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
    "DiffiT-L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "DiffiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "DiffiT-S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "DiffiT-tiny": dict(hidden_size=64, depth=2, num_heads=4, patch_size=2, num_classes=10),
}


def preset_config(name: str, **overrides) -> DiffiTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DiffiTConfig(**{**PRESETS[name], **overrides})


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model; nothing was loaded. Lists every offending key."""

    def __init__(self, source: str, missing, unexpected, mismatched, bad_values=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), \
            list(mismatched)
        self.bad_values = list(bad_values)
        lines = [f"checkpoint {source} does not match the model; nothing was loaded"]

        def block(title, items):
            if items:
                shown = list(items)[:20]
                more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)

        block("missing keys", self.missing)
        block("unexpected keys", self.unexpected)
        block("mis-shaped keys", [f"{k} checkpoint {c} vs model {m}"
                                  for k, c, m in self.mismatched])
        block("bad values", self.bad_values)
        super().__init__("\n".join(lines))


# ---- embedders and final layer --------------------------------------------------------------
class PatchEmbed(nn.Module):
    """[B, Cin, I, I] -> [B, (I/p)^2, C] row-major tokens via a p x p stride-p conv (key proj)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                  # [B, N, C]


class LabelEmbedder(nn.Module):
    """Class labels -> [B, C]; row num_classes is the null class used by guidance and dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)                             # [B, C]


class FinalLayer(nn.Module):
    """LN (no affine) -> SiLU -> Linear(C, p*p*out), zero-initialised (key linear)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, backend: str):
        super().__init__()
        self.backend = backend
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = adaln_norm(x, eps=LN_EPS, activation="silu", backend=self.backend)  # [B, N, C]
        return self.linear(y)                                           # [B, N, p*p*out]


# ---- the model ------------------------------------------------------------------------------
class DiffiT(nn.Module):
    """Latent DiffiT with the official constructor, forward and guided forward.

    `DiffiT(input_size=32, patch_size=2, ...)` takes the official arguments (plus conditioning,
    backend and grad_checkpointing), or `DiffiT(config=DiffiTConfig(...))`.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, *,
                 conditioning: str = "tmsa", backend: str = "auto",
                 grad_checkpointing: bool = False, config: Optional[DiffiTConfig] = None):
        super().__init__()
        if config is None:
            config = DiffiTConfig(input_size, patch_size, in_channels, hidden_size, depth,
                                  num_heads, mlp_ratio, class_dropout_prob, num_classes,
                                  learn_sigma, conditioning, backend, grad_checkpointing)
        cfg = self.config = config
        self.input_size, self.patch_size = cfg.input_size, cfg.patch_size
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.num_classes, self.learn_sigma = cfg.num_classes, cfg.learn_sigma
        self.num_heads, self.backend = cfg.num_heads, cfg.backend
        self.grad_checkpointing = cfg.grad_checkpointing
        G = self.grid_size = cfg.input_size // cfg.patch_size
        C = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.y_embedder = (LabelEmbedder(cfg.num_classes, C, cfg.class_dropout_prob)
                           if cfg.num_classes > 0 else None)
        # fixed, but a parameter (requires_grad=False) as in the official state dict
        self.pos_embed = nn.Parameter(torch.zeros(1, G * G, C), requires_grad=False)
        block = DiffiTBlock if cfg.conditioning == "tmsa" else AdaLNBlock
        self.blocks = nn.ModuleList([
            block(C, C, cfg.num_heads, cfg.mlp_ratio, window_size=G, backend=cfg.backend)
            for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(C, cfg.patch_size, self.out_channels, backend=cfg.backend)
        self.initialize_weights()

    @classmethod
    def from_config(cls, config: DiffiTConfig) -> "DiffiT":
        return cls(config=config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiffiT":
        return cls(config=preset_config(name, **overrides))

    def initialize_weights(self) -> None:
        """DiT's scheme: xavier Linear / patch conv, N(0, 0.02) embeddings, zero output layer."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1],
                                                         self.grid_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            if isinstance(blk, AdaLNBlock):
                nn.init.zeros_(blk.adaLN_modulation[1].weight)
                nn.init.zeros_(blk.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*out] -> [B, out, G*p, G*p] with the (B, G, G, p, p, out) layout."""
        B, G, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(B, G, G, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, c, G * p, G * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, in, I, I] latents, t [B] timesteps, y [B] labels -> [B, out, I, I]."""
        I = self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, I, I):
            raise ValueError(f"x must have shape [B, {self.in_channels}, {I}, {I}], "
                             f"got shape {tuple(x.shape)}")
        G = self.grid_size
        # pos_embed first: the sum takes its row-major layout, not the transposed one of the
        # patch conv's tokens, so every block sees the same contiguous stream (no copy in the
        # first block's ops, and one compiled graph serves all blocks)
        h = self.pos_embed + self.x_embedder(x)                         # [B, N, C]
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        c = self.t_embedder(t)                                          # [B, C]
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(f"this model is class-conditional ({self.num_classes} "
                                 "classes): pass labels y [B]")
            c = c + self.y_embedder(y, self.training, force_drop_ids)   # [B, C]
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, (G, G), use_reentrant=False)
            else:
                h = block(h, c, (G, G))                                 # [B, N, C]
        h = self.final_layer(h)                                         # [B, N, p*p*out]
        return self.unpatchify(h)                                       # [B, out, I, I]

    def guidance_scale(self, t: torch.Tensor, cfg_scale: float, diffusion_steps: int = 1000,
                       scale_pow: float = 4.0, schedule: str = "auto") -> torch.Tensor:
        """Per-sample guidance scale [B]: the official power-cosine ramp or a constant.

        power-cosine: s(t) = (cfg - 1) * (1 - cos(pi * (1 - t / steps) ^ pow)) / 2 + 1
        "auto" = power-cosine for input_size <= 32 (256 px), constant above (as released).
        """
        if schedule == "auto":
            schedule = "power-cosine" if self.input_size <= 32 else "constant"
        t = t.float()
        if schedule == "constant":
            return torch.full_like(t, float(cfg_scale))
        if schedule != "power-cosine":
            raise ValueError(f"schedule must be 'auto', 'power-cosine' or 'constant', "
                             f"got {schedule!r}")
        ramp = (1 - torch.cos(math.pi * (1 - t / diffusion_steps) ** scale_pow)) / 2
        return (cfg_scale - 1) * ramp + 1

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float, diffusion_steps: int = 1000, scale_pow: float = 4.0,
                         *, guidance_channels: Union[int, str] = 3,
                         schedule: str = "auto") -> torch.Tensor:
        """Classifier-free guided forward on a [cond | uncond] batch, as released.

        The first half of x is used for both halves; y holds the labels then the null labels.
        eps[:, :k] = uncond + s(t) * (cond - uncond) for k = guidance_channels (3 as released;
        "all" = every eps channel); the other channels keep the conditional output.
        """
        if x.shape[0] % 2:
            raise ValueError(f"x must hold a [cond | uncond] batch of even size, "
                             f"got shape {tuple(x.shape)}")
        k = self.in_channels if guidance_channels == "all" else int(guidance_channels)
        if not 0 <= k <= self.in_channels:
            raise ValueError(f"guidance_channels must be 'all' or 0..{self.in_channels}, "
                             f"got {guidance_channels!r}")
        B = x.shape[0] // 2
        half = x[:B]
        out = self.forward(torch.cat([half, half]), t, y)              # [2B, out, I, I]
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps[:B], eps[B:]
        s = self.guidance_scale(t[:B], cfg_scale, diffusion_steps, scale_pow, schedule)
        guided = uncond + s.to(eps.dtype).view(-1, 1, 1, 1) * (cond - uncond)  # [B, k, I, I]
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)   # [2B, out, I, I]

    # ---- checkpoints ------------------------------------------------------------------------
    def check_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "state dict"):
        """Raise CheckpointMismatchError unless sd has exactly this model's keys and shapes."""
        check_state_dict_against(self.state_dict(), sd, source)

    def load_checkpoint(self, src: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                        key: Optional[str] = None) -> "DiffiT":
        """Load a state dict or checkpoint file strictly; on any mismatch load nothing."""
        from .checkpoint import load_state_dict_file

        source = "state dict"
        if not isinstance(src, Mapping):
            source, src = str(src), load_state_dict_file(src, key=key)
        self.check_state_dict(src, source)
        self.load_state_dict(src, strict=True)
        return self

    @classmethod
    def from_pretrained(cls, path, config: Optional[Union[DiffiTConfig, str]] = None, *,
                        key: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                        **overrides) -> "DiffiT":
        """Build the model a checkpoint (.safetensors or .pt) describes and load it strictly.

        The configuration (latent size, patch, width, depth, heads, classes, learn_sigma,
        conditioning) is inferred from the tensors unless `config` (a DiffiTConfig or a preset
        name) is given; `overrides` set DiffiTConfig fields such as backend. Every key, shape and
        index buffer is checked before anything is loaded.
        """
        from .checkpoint import load_state_dict_file

        sd = load_state_dict_file(path, key=key)
        if config is None:
            config = infer_config(sd, str(path))
        elif isinstance(config, str):
            config = preset_config(config)
        config = dataclasses.replace(config, **overrides)
        with torch.device("meta"):
            model = cls(config=config)
        check_state_dict_against(model.state_dict(), sd, str(path))
        model = model.to_empty(device=device)
        model.load_state_dict(sd, strict=True)
        return model


def check_state_dict_against(expected: Mapping[str, torch.Tensor],
                             sd: Mapping[str, torch.Tensor], source: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched, bad = [], []
    for k, e in expected.items():
        if k not in sd:
            continue
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            mismatched.append((k, type(v).__name__, tuple(e.shape)))
        elif tuple(v.shape) != tuple(e.shape):
            mismatched.append((k, tuple(v.shape), tuple(e.shape)))
        elif k.endswith("relative_position_index"):
            # the kernels derive the index from the window shape: the stored one must agree
            n = math.isqrt(e.shape[0])
            if v.dtype.is_floating_point or not torch.equal(v.cpu().long(),
                                                            relative_position_index(n, n)):
                bad.append(f"{k} is not Swin's relative position index for a {n}x{n} window")
    if missing or unexpected or mismatched or bad:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched, bad)


def infer_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> DiffiTConfig:
    """The DiffiTConfig an official-layout state dict describes (class dropout assumed 0.1
    when a null-class row is present, as released)."""
    need = ("pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight",
            "blocks.0.attn.relative_position_bias_table", "blocks.0.mlp.fc1.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointMismatchError(source + " (cannot infer the configuration)", absent, [],
                                      [])
    C, cin, p, _ = sd["x_embedder.proj.weight"].shape
    N = sd["pos_embed"].shape[1]
    G = math.isqrt(N)
    if G * G != N:
        raise ValueError(f"{source}: pos_embed has {N} tokens, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = sd["blocks.0.attn.relative_position_bias_table"].shape[1]
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / C
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    rows = sd["y_embedder.embedding_table.weight"].shape[0] \
        if "y_embedder.embedding_table.weight" in sd else 0
    adaln = "blocks.0.adaLN_modulation.1.weight" in sd
    return DiffiTConfig(input_size=G * p, patch_size=p, in_channels=cin, hidden_size=C,
                        depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                        class_dropout_prob=0.1 if rows else 0.0,
                        num_classes=max(rows - 1, 0), learn_sigma=out == 2 * cin,
                        conditioning="adaln" if adaln else "tmsa")


def DiffiT_XL_2(**kw) -> DiffiT:
    return DiffiT.from_preset("DiffiT-XL/2", **kw)


def DiffiT_L_2(**kw) -> DiffiT:
    return DiffiT.from_preset("DiffiT-L/2", **kw)


def DiffiT_B_2(**kw) -> DiffiT:
    return DiffiT.from_preset("DiffiT-B/2", **kw)


def DiffiT_S_2(**kw) -> DiffiT:
    return DiffiT.from_preset("DiffiT-S/2", **kw)
