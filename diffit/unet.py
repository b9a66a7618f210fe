"""Image-space DiffiT: a symmetric U-Net of DiffiT ResBlocks with windowed TMSA (DESIGN.md sec. 8).

    x [B, Cin, H, W] --Conv3x3 tokenizer--> level 0 (H x W) --down--> level 1 (H/2) ... level K-1
        every level: L ResBlocks in the encoder, a skip, and L ResBlocks in the decoder after the
        skip is merged; conv downsampling between encoder levels, conv upsampling between decoder
        levels; GroupNorm-SiLU-Conv3x3 head --> [B, Cout, H, W]
    ResBlock (eqs. 9-10):  h = Conv3x3(SiLU(GroupNorm(x)));  x = DiffiTBlock(h, c, grid=(H, W)) + x
    time token c [B, 512] = MLP(sinusoidal(noise label) + A aug) (+ label embedding), the same for
        all blocks; aug [B, augment_dim] = augmentation labels (diffit.augment), A bias-free

The DiffiT block sees the feature map as row-major tokens [B, H*W, C] and attends within
non-overlapping w x w windows through the attention op's own windowing (grid=(H, W)), so no
window partition / reverse copies exist. With `model.to(memory_format=torch.channels_last)` the
NCHW <-> token reshapes are views as well.

The forward takes any per-sample noise label (EDM's c_noise = ln(sigma) / 4 through
diffit.diffusion.edm.EDMPrecond, or a DDPM timestep) and returns the raw network output F.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import DiffiTBlock, TimestepEmbedder, timestep_embedding

__all__ = ["DiffiTUNetConfig", "DiffiTUNet", "PRESETS", "diffit_unet", "count_parameters"]


@dataclass
class DiffiTUNetConfig:
    """Configuration of the image-space DiffiT U-Net.

    The paper fixes the levels, the window, the FFHQ-64 channels and the time-embedding width.
    The rest it leaves unstated; our choices and why:
      * heads: channels / head_dim with head_dim = 64 (2 heads at 128 channels, 4 at 256), the
        head width of ADM's best U-Nets and of DiT; a fixed head width keeps per-head attention
        cost constant across levels.
      * GroupNorm: 32 groups (Wu & He's default, used by ADM and EDM's U-Nets), eps 1e-5.
      * channel changes: only in the down / up sampling convs (Conv3x3 stride 2 C_i -> C_i+1;
        nearest x2 then Conv3x3 C_i+1 -> C_i), so every ResBlock keeps its width and eq. 10's
        residual is the identity, exactly as written, with no 1x1 shortcut projection.
      * skips: one per resolution. Above the bottleneck it carries the encoder's output at that
        resolution; at the lowest level, whose encoder output flows straight into its decoder,
        it carries the level's input (the downsampled features), so that level too has a long
        residual path around its encoder half. The decoder merges a skip by concatenation then a
        1x1 conv back to C_i: concatenation lets it weigh encoder against decoder features per
        channel (the usual U-Net merge); the 1x1 conv restores the width the ResBlocks need.
      * ResBlocks per level: L = 2 in each of the encoder and the decoder (not given in the
        paper; EDM's DDPM++ uses 4 per resolution, at about twice the cost).
      * CIFAR-10 widths 128/256/256 (the paper gives only the resolutions; this is ADM's and
        DDPM++'s widening after the first level).
      * time token: 256 sinusoidal frequencies of the noise label -> Linear-SiLU-Linear to 512,
        as the latent model, fed unnormalised to the TMSA of every block.
      * augmentation conditioning (EDM's recipe; diffit.augment): a bias-free Linear maps the
        augmentation labels to the 256 frequency features and adds them before the time MLP,
        the point where EDM adds its augmentation mapping to the noise embedding. Bias-free, so
        zero labels (no augmentation; what sampling uses) add exactly nothing. The image presets
        take EDM's 9 labels; the probability is a training setting (EDMLoss(augment=p)).
      * dropout inside each ResBlock, before its Conv3x3 (ADM's placement); the presets take
        EDM's values for these datasets (0.13 CIFAR-10, 0.05 FFHQ-64), as the paper trains with
        EDM's recipe.
      * the head conv is zero-initialised (as ADM / EDM), so F = 0 and EDM's D = c_skip x at
        initialisation.
      * window: the same w x w everywhere (the paper: window TMSA at every level, no shift); a
        level whose grid w does not divide is an error, never a silent clamp.
    """

    image_size: int = 32                      # H = W of the input images
    in_channels: int = 3                      # image channels in
    out_channels: Optional[int] = None        # channels out; None = in_channels (EDM's D)
    channels: Tuple[int, ...] = (128, 256, 256)  # width per level; level i has size image_size/2^i
    num_res_blocks: int = 2                   # L: DiffiT ResBlocks per level, encoder and decoder
    window_size: int = 4                      # w: TMSA attends in non-overlapping w x w windows
    head_dim: int = 64                        # channels per attention head (heads = C_i / head_dim)
    mlp_ratio: float = 4.0                    # MLP hidden width / C in every DiffiT block
    norm_groups: int = 32                     # GroupNorm groups; must divide every C_i
    time_embed_dim: int = 512                 # width of the time token c (the paper: 512)
    time_freq_dim: int = 256                  # sinusoidal frequencies fed to the time MLP
    num_classes: int = 0                      # 0 = unconditional; else labels 0..num_classes-1
    class_dropout_prob: float = 0.0           # training-time label drop to the null class (CFG)
    dropout: float = 0.0                      # dropout inside every ResBlock
    augment_dim: int = 0                      # augmentation-label length (AugmentPipe.label_dim);
                                              #   0 = no augmentation conditioning (no weights)
    heun_steps: int = 18                      # EDM Heun steps the paper samples this preset with
    backend: str = "auto"                     # diffit_kernels backend: "auto" | "triton" | "torch"

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)

    def resolutions(self) -> List[int]:
        return [self.image_size // 2 ** i for i in range(len(self.channels))]

    def validate(self) -> None:
        """ValueError naming the offending field when the configuration cannot be built."""
        if not self.channels:
            raise ValueError("channels must list at least one level width")
        K = len(self.channels)
        if self.image_size < 1 or self.image_size % 2 ** (K - 1):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2^(levels-1)="
                             f"{2 ** (K - 1)} for {K} levels")
        for i, (c, r) in enumerate(zip(self.channels, self.resolutions())):
            if c % self.head_dim:
                raise ValueError(f"level {i}: channels {c} not divisible by head_dim={self.head_dim}")
            if c % self.norm_groups:
                raise ValueError(f"level {i}: channels {c} not divisible by "
                                 f"norm_groups={self.norm_groups}")
            if self.window_size < 1 or r % self.window_size:
                raise ValueError(f"level {i}: the {r}x{r} token grid is not divisible by "
                                 f"window_size={self.window_size}; choose a window dividing "
                                 f"every level's size {self.resolutions()}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.num_classes < 0 or not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"num_classes must be >= 0 and class_dropout_prob in [0, 1), got "
                             f"{self.num_classes}, {self.class_dropout_prob}")
        if self.class_dropout_prob and not self.num_classes:
            raise ValueError("class_dropout_prob > 0 needs num_classes > 0")
        if not isinstance(self.augment_dim, int) or self.augment_dim < 0:
            raise ValueError(f"augment_dim must be an int >= 0, got {self.augment_dim!r}")


PRESETS: Dict[str, DiffiTUNetConfig] = {
    # CIFAR-10, 32 / 16 / 8, window 4; unconditional as the paper; 18 Heun steps; EDM's 9
    # augmentation labels (train with EDMLoss(augment=0.12))
    "cifar10": DiffiTUNetConfig(image_size=32, channels=(128, 256, 256), window_size=4,
                                dropout=0.13, heun_steps=18, augment_dim=9),
    # FFHQ-64, 128 / 256 / 256 / 256 at 64 / 32 / 16 / 8, window 8 (global at 8x8); 40 Heun steps;
    # EDM's 9 augmentation labels (train with EDMLoss(augment=0.15))
    "ffhq64": DiffiTUNetConfig(image_size=64, channels=(128, 256, 256, 256), window_size=8,
                               dropout=0.05, heun_steps=40, augment_dim=9),
    # tests and the demo: 8x8 single-channel images, two levels (8x8 in 2x2 windows, 4x4 global)
    "tiny": DiffiTUNetConfig(image_size=8, in_channels=1, channels=(16, 32), num_res_blocks=1,
                             window_size=4, head_dim=8, norm_groups=8, time_embed_dim=32,
                             time_freq_dim=16, heun_steps=18),
}


# ---- blocks ---------------------------------------------------------------------------------
def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> row-major tokens [B, H*W, C] (a view for channels_last memory)."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def _to_image(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W] (a channels_last-strided view)."""
    B, N, C = t.shape
    return t.reshape(B, H, W, C).permute(0, 3, 1, 2)


class DiffiTResBlock(nn.Module):
    """h = Conv3x3(SiLU(GroupNorm(x))); x = DiffiTBlock(h, c) + x   (eqs. 9-10, width kept)."""

    def __init__(self, channels: int, cfg: DiffiTUNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-5)
        self.drop = nn.Dropout(cfg.dropout)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, cfg.time_embed_dim, channels // cfg.head_dim,
                                 cfg.mlp_ratio, cfg.window_size, backend=cfg.backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        h = self.conv(self.drop(F.silu(self.norm(x))))                  # [B, C, H, W]
        t = self.block(_to_tokens(h), c, grid=(H, W))                   # [B, H*W, C]
        return x + _to_image(t, H, W)                                   # [B, C, H, W]


class Downsample(nn.Module):
    """Conv3x3 stride 2: [B, Cin, H, W] -> [B, Cout, H/2, W/2]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then Conv3x3: [B, Cin, H, W] -> [B, Cout, 2H, 2W]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: encoder ResBlocks, skip merge (concat + 1x1), decoder ResBlocks."""

    def __init__(self, channels: int, cfg: DiffiTUNetConfig):
        super().__init__()
        self.encoder = nn.ModuleList(DiffiTResBlock(channels, cfg)
                                     for _ in range(cfg.num_res_blocks))
        self.merge = nn.Conv2d(2 * channels, channels, 1)
        self.decoder = nn.ModuleList(DiffiTResBlock(channels, cfg)
                                     for _ in range(cfg.num_res_blocks))


# ---- model ----------------------------------------------------------------------------------
class DiffiTUNet(nn.Module):
    """The image-space DiffiT denoiser network F(x, noise_label, y) -> [B, out_channels, H, W].

    Build with DiffiTUNet(config) or DiffiTUNet.from_preset("cifar10" | "ffhq64" | "tiny", **kw).
    Wrap it in diffit.diffusion.edm.EDMPrecond for EDM's D(x; sigma).
    """

    def __init__(self, config: Optional[DiffiTUNetConfig] = None, **overrides):
        super().__init__()
        cfg = replace(config or DiffiTUNetConfig(), **overrides)
        cfg.validate()
        self.config = cfg
        chans = cfg.channels
        K = len(chans)
        self.out_channels = cfg.out_channels or cfg.in_channels

        self.t_embedder = TimestepEmbedder(cfg.time_embed_dim, cfg.time_freq_dim)
        # row num_classes is the null class: unconditional / dropped labels, guidance
        self.y_embedder = (nn.Embedding(cfg.num_classes + 1, cfg.time_embed_dim)
                           if cfg.num_classes else None)
        # augmentation labels -> the time MLP's input features; no bias: zero labels add nothing
        self.aug_embedder = (nn.Linear(cfg.augment_dim, cfg.time_freq_dim, bias=False)
                             if cfg.augment_dim else None)

        self.tokenizer = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.levels = nn.ModuleList(Level(c, cfg) for c in chans)
        self.down = nn.ModuleList(Downsample(chans[i], chans[i + 1]) for i in range(K - 1))
        self.up = nn.ModuleList(Upsample(chans[i + 1], chans[i]) for i in range(K - 1))
        self.head_norm = nn.GroupNorm(cfg.norm_groups, chans[0], eps=1e-5)
        self.head = nn.Conv2d(chans[0], self.out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiffiTUNet":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(PRESETS[name], **overrides)

    # ---- helpers ----
    def check_input(self, x: torch.Tensor) -> None:
        """ValueError when x is not [B, in_channels, H, W] with every level's grid windowable."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape [B, {cfg.in_channels}, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        H, W = x.shape[-2:]
        K, w = len(cfg.channels), cfg.window_size
        for i in range(K):
            f = 2 ** i
            if H % f or W % f or (H // f) % w or (W // f) % w:
                raise ValueError(
                    f"x of shape {tuple(x.shape)}: level {i} would have a {H / f:g}x{W / f:g} "
                    f"token grid, which window_size={w} does not divide (H and W must be "
                    f"multiples of {2 ** (K - 1) * w} for {K} levels)")

    def _labels(self, y: Optional[torch.Tensor], B: int, device) -> Optional[torch.Tensor]:
        """Class indices [B] with the null class substituted for None and dropped labels."""
        cfg = self.config
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("y given to an unconditional model (num_classes=0)")
            return None
        if y is None:
            return torch.full((B,), cfg.num_classes, dtype=torch.long, device=device)
        if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.is_floating_point():
            raise ValueError(f"y must be an integer tensor [B={B}] of class indices in "
                             f"[0, {cfg.num_classes}] ({cfg.num_classes} = null), got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y)}")
        y = y.to(device=device, dtype=torch.long)
        if self.training and cfg.class_dropout_prob > 0:
            drop = torch.rand(B, device=device) < cfg.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, cfg.num_classes), y)
        return y

    def _time_token(self, t: torch.Tensor, augment_labels: Optional[torch.Tensor]
                    ) -> torch.Tensor:
        """t [B] float32, augment_labels [B, augment_dim] or None (= zeros) -> c [B, D_t]."""
        B = t.shape[0]
        if self.aug_embedder is None:
            if augment_labels is not None:
                raise ValueError("augment_labels given to a model without augmentation "
                                 "conditioning (augment_dim=0); build it with "
                                 "augment_dim=AugmentPipe.label_dim")
            return self.t_embedder(t)                                   # [B, D_t]
        A = self.config.augment_dim
        if augment_labels is None:
            # zeros add exactly nothing; running the Linear anyway gives its weight a (zero)
            # gradient, which DDP needs from every parameter at every step
            augment_labels = t.new_zeros(B, A)
        if (not isinstance(augment_labels, torch.Tensor) or augment_labels.shape != (B, A)
                or not augment_labels.is_floating_point()):
            got = (f"shape {tuple(augment_labels.shape)}, dtype {augment_labels.dtype}"
                   if isinstance(augment_labels, torch.Tensor) else type(augment_labels).__name__)
            raise ValueError(f"augment_labels must be a floating-point tensor "
                             f"[B={B}, augment_dim={A}], got {got}")
        w = self.aug_embedder.weight
        f = timestep_embedding(t, self.t_embedder.frequency_embedding_size)  # [B, F]
        a = self.aug_embedder(augment_labels.to(device=w.device, dtype=w.dtype))  # [B, F]
        mlp = self.t_embedder.mlp
        return mlp(f.to(mlp[0].weight.dtype) + a.to(mlp[0].weight.dtype))    # [B, D_t]

    def forward(self, x: torch.Tensor, sigma_or_t, y: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, Cin, H, W]; sigma_or_t: the per-sample noise label, scalar or [B]; y [B] or None;
        augment_labels [B, augment_dim] (diffit.augment) or None, which means zeros: no
        augmentation, as sampling uses.

        Returns the raw network output [B, Cout, H, W] (no preconditioning).
        """
        self.check_input(x)
        B, _, H, W = x.shape
        t = torch.as_tensor(sigma_or_t, device=x.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"sigma_or_t must be a scalar or have shape [B={B}], "
                             f"got shape {tuple(t.shape)}")
        c = self._time_token(t, augment_labels)                         # [B, D_t]
        labels = self._labels(y, B, x.device)
        if labels is not None:
            c = c + self.y_embedder(labels)                             # [B, D_t]

        h = self.tokenizer(x)                                           # [B, C0, H, W]
        skips = []
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            h_in = h
            for blk in level.encoder:
                h = blk(h, c)                                           # [B, Ci, H/2^i, W/2^i]
            skips.append(h_in if i == last else h)
            if i < last:
                h = self.down[i](h)                                     # [B, Ci+1, H/2^(i+1), .]
        for i in range(last, -1, -1):
            level = self.levels[i]
            if i < last:
                h = self.up[i](h)                                       # [B, Ci, H/2^i, W/2^i]
            h = level.merge(torch.cat([h, skips.pop()], dim=1))         # [B, Ci, H/2^i, W/2^i]
            for blk in level.decoder:
                h = blk(h, c)                                           # [B, Ci, H/2^i, W/2^i]
        return self.head(F.silu(self.head_norm(h)))                     # [B, Cout, H, W]

    # ---- summary ----
    def summary(self, print_fn=print) -> str:
        """A table of parameters per part and level, with the exact total; printed and returned."""
        cfg = self.config
        rows = [("time / label / augment embedding", count_parameters(self.t_embedder)
                 + count_parameters(self.y_embedder) + count_parameters(self.aug_embedder)),
                ("tokenizer", count_parameters(self.tokenizer))]
        for i, (lvl, c, r) in enumerate(zip(self.levels, cfg.channels, cfg.resolutions())):
            heads = c // cfg.head_dim
            rows.append((f"level {i}: {r}x{r}, {c} ch, {heads} heads, "
                         f"{2 * cfg.num_res_blocks} ResBlocks + merge", count_parameters(lvl)))
        rows.append(("down / up sampling", count_parameters(self.down) + count_parameters(self.up)))
        rows.append(("head", count_parameters(self.head_norm) + count_parameters(self.head)))
        total = count_parameters(self)
        width = max(len(name) for name, _ in rows)
        lines = [f"DiffiTUNet(image_size={cfg.image_size}, in={cfg.in_channels}, "
                 f"out={self.out_channels}, window={cfg.window_size}, "
                 f"classes={cfg.num_classes}, augment_dim={cfg.augment_dim}, "
                 f"backend={cfg.backend!r})"]
        lines += [f"  {name:<{width}}  {n:>12,}" for name, n in rows]
        lines.append(f"  {'total parameters':<{width}}  {total:>12,}")
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    def num_parameters(self) -> int:
        return count_parameters(self)

    def config_dict(self) -> dict:
        return asdict(self.config)


def count_parameters(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def diffit_unet(preset: str = "cifar10", **overrides) -> DiffiTUNet:
    """DiffiTUNet.from_preset(preset, **overrides)."""
    return DiffiTUNet.from_preset(preset, **overrides)
