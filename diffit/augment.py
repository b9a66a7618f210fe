"""Non-leaking geometric augmentation with augmentation labels, for EDM-style training.

Karras et al. 2020 (ADA) showed that augmenting a generative model's training data leaks the
augmentation into the samples unless the transformations can be undone; EDM (Karras et al. 2022,
appendix on augmentation regularisation) sidesteps the question for diffusion models by telling the
denoiser which transformation was applied: the network is conditioned on an augmentation-label
vector, trained on augmented images with their labels, and sampled with an all-zero label, which
means "no augmentation". EDM's CIFAR-10 recipe draws each geometric transformation with probability
p = 0.12 (FFHQ-64: 0.15) and feeds a 9-dimensional label to the network. This module is written from
those descriptions and from ADA's definitions of the transformations; it is not a port of either
code base.

Every transformation is an affine map of pixel-centre coordinates (x right, y down, origin at the
image centre, in pixels). Per image, transformation k is drawn with probability min(1, p * w_k)
(w_k its weight); a transformation not drawn is the identity and leaves its label slots at zero.
The drawn ones are composed in the fixed order below into one 3x3 matrix G (source -> output), and
the output is out(q) = in(G^-1 q), sampled with grid_sample and symmetric (reflection) padding:

    name           drawn parameter (ADA's distributions)    map                  label slots
    xflip          i ~ U{0, 1}                             x -> (1 - 2i) x      [i]
    yflip          i ~ U{0, 1}                             y -> (1 - 2i) y      [i]
    rotate90       k ~ U{0, 1, 2, 3}                       R(k pi/2)            [cos - 1, sin]
    translate_int  t ~ U(-m, m)^2 (W, H), rounded to px    + t                  [tx / W, ty / H]
    scale          l ~ N(0, scale_std^2)                   * 2^l                [l]
    rotate         a ~ U(-pi r, pi r)                      R(a)                 [cos a - 1, sin a]
    aniso          l ~ N(0, aniso_std^2), phi ~ U(0, pi)   R(phi) diag(2^l, 2^-l) R(-phi)
                                                                           [l cos 2phi, l sin 2phi]
    translate      t ~ N(0, translate_std^2)^2 (W, H)      + t                  [tx / W, ty / H]

R(a) = [[cos a, -sin a], [sin a, cos a]] (clockwise on screen, as y points down). Only transforms
with a positive weight get slots, in this order, so the label length (`label_dim`) depends on the
enabled set; EDM's CIFAR-10 set (the default: xflip, yflip, scale, rotate, aniso, translate) gives
1 + 1 + 1 + 2 + 2 + 2 = 9. Each encoding is zero exactly at the identity and determines the map:
the flips and rotate90 take exact values (0, +-1), translate_int slots are multiples of 1/W and
1/H, and the anisotropic slots (a, b) are the log2-coordinates of the symmetric, traceless log of
its matrix, exp(ln 2 [[a, b], [b, -a]]), which is unique although (l, phi) and (-l, phi + pi/2)
describe the same map.

Why this set: the six EDM CIFAR-10 transformations are the defaults, x-flips with weight 1e8 so
that every image carries a random, labelled flip whenever p > 0 (our reading of EDM's setting: a
mirrored image is plausible data, so flipping half of them costs nothing); rotate90 and
translate_int are there for data without a canonical orientation or position, and are off by
default because EDM's recipe does not use them. ADA's colour transformations, cutout and its
2x-supersampled, wavelet-filtered resampling are not included: EDM's recipe uses geometry only,
and bilinear grid_sample is enough at these probabilities (the interpolation blur is itself a
function of the label, so it does not leak).

Exactness: an image whose continuous transforms (scale, rotate, aniso, translate) were all not drawn
is resampled with nearest-neighbour lookups at exact pixel centres (flips, quarter turns and integer
shifts move pixel centres onto pixel centres), so its values are copied bit for bit; the rest use
bilinear interpolation. The choice follows from the label alone.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["AugmentPipe", "TRANSFORMS", "EDM_CIFAR10", "EDM_FFHQ64_P", "EDM_CIFAR10_P"]

# transformation name -> its label slots, in the order they are composed
TRANSFORMS: Dict[str, Tuple[str, ...]] = {
    "xflip": ("xflip",),
    "yflip": ("yflip",),
    "rotate90": ("rotate90_cos_m1", "rotate90_sin"),
    "translate_int": ("translate_int_x", "translate_int_y"),
    "scale": ("scale_log2",),
    "rotate": ("rotate_cos_m1", "rotate_sin"),
    "aniso": ("aniso_cos2phi", "aniso_sin2phi"),
    "translate": ("translate_x", "translate_y"),
}
_EXACT = ("xflip", "yflip", "rotate90", "translate_int")   # move pixel centres onto pixel centres

# EDM's CIFAR-10 weights (probability of each transform = min(1, p * weight)) and probabilities
EDM_CIFAR10: Dict[str, float] = dict(xflip=1e8, yflip=1.0, rotate90=0.0, translate_int=0.0,
                                     scale=1.0, rotate=1.0, aniso=1.0, translate=1.0)
EDM_CIFAR10_P = 0.12
EDM_FFHQ64_P = 0.15


class AugmentPipe:
    """Geometric augmentation returning (images, labels); see the module docstring for the maths.

    Args:
        p: probability scale in [0, 1]; transform k is drawn with probability min(1, p * w_k).
            p = 0 returns the input itself and all-zero labels.
        xflip, yflip, rotate90, translate_int, scale, rotate, aniso, translate: the weights w_k
            (>= 0; 0 disables the transform and removes its label slots). Defaults: EDM's
            CIFAR-10 set.
        translate_int_max: m, the integer shift's range as a fraction of the image size (ADA 0.125).
        scale_std: std of log2 of the isotropic scale (ADA 0.2).
        rotate_max: r, the arbitrary rotation's range as a fraction of pi (1 = any angle).
        aniso_std: std of log2 of the anisotropic stretch (ADA 0.2).
        translate_std: std of the fractional shift as a fraction of the image size (ADA 0.125).
    Call:
        pipe(x [B, C, H, W] float, generator=None) -> (x_aug [B, C, H, W], labels [B, label_dim])
        x_aug has x's dtype, device and memory format (NCHW or channels_last); the warp runs in
        float32 for half / bfloat16 input. labels are float32 on x's device. Every random number
        comes from `generator` (on x's device) when one is given, and the number drawn per call
        depends only on B, so a seeded generator reproduces the call.
    """

    def __init__(self, p: float, *, xflip: float = EDM_CIFAR10["xflip"],
                 yflip: float = EDM_CIFAR10["yflip"], rotate90: float = EDM_CIFAR10["rotate90"],
                 translate_int: float = EDM_CIFAR10["translate_int"],
                 scale: float = EDM_CIFAR10["scale"], rotate: float = EDM_CIFAR10["rotate"],
                 aniso: float = EDM_CIFAR10["aniso"], translate: float = EDM_CIFAR10["translate"],
                 translate_int_max: float = 0.125, scale_std: float = 0.2, rotate_max: float = 1.0,
                 aniso_std: float = 0.2, translate_std: float = 0.125):
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        weights = dict(xflip=xflip, yflip=yflip, rotate90=rotate90, translate_int=translate_int,
                       scale=scale, rotate=rotate, aniso=aniso, translate=translate)
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or not 0.0 <= w < math.inf:
                raise ValueError(f"weight {name} must be a finite number >= 0, got {w!r}")
        spreads = dict(translate_int_max=translate_int_max, scale_std=scale_std,
                       rotate_max=rotate_max, aniso_std=aniso_std, translate_std=translate_std)
        for name, v in spreads.items():
            if not isinstance(v, (int, float)) or not 0.0 <= v < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.p = float(p)
        self.weights = {k: float(w) for k, w in weights.items()}
        self.translate_int_max = float(translate_int_max)
        self.scale_std = float(scale_std)
        self.rotate_max = float(rotate_max)
        self.aniso_std = float(aniso_std)
        self.translate_std = float(translate_std)
        self.enabled: Tuple[str, ...] = tuple(k for k in TRANSFORMS if self.weights[k] > 0)
        self.label_names: Tuple[str, ...] = tuple(s for k in self.enabled for s in TRANSFORMS[k])
        self.label_dim = len(self.label_names)
        # slice of the label vector holding each enabled transform's slots
        self.slots: Dict[str, slice] = {}
        start = 0
        for k in self.enabled:
            self.slots[k] = slice(start, start + len(TRANSFORMS[k]))
            start += len(TRANSFORMS[k])

    def __repr__(self) -> str:
        w = ", ".join(f"{k}={self.weights[k]:g}" for k in self.enabled)
        return f"AugmentPipe(p={self.p:g}, {w}; label_dim={self.label_dim})"

    def probability(self, name: str) -> float:
        """Probability that transform `name` is drawn for an image."""
        return min(1.0, self.p * self.weights[name])

    # ---- checks ----
    def _check(self, x: torch.Tensor, what: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{what} must be a [B, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        H, W = x.shape[-2:]
        if "rotate90" in self.enabled and H != W:
            raise ValueError(f"rotate90 needs square images, got {what} of shape {tuple(x.shape)}")

    def _check_labels(self, labels: torch.Tensor, x: torch.Tensor) -> None:
        B = x.shape[0]
        if (not isinstance(labels, torch.Tensor) or labels.shape != (B, self.label_dim)
                or not labels.is_floating_point()):
            got = (f"shape {tuple(labels.shape)}, dtype {labels.dtype}"
                   if isinstance(labels, torch.Tensor) else type(labels).__name__)
            raise ValueError(f"labels must be a floating-point tensor [B={B}, label_dim="
                             f"{self.label_dim}] (slots {list(self.label_names)}), got {got}")

    # ---- sampling ----
    def sample_labels(self, B: int, H: int, W: int, device=None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draws the transforms of B images of H x W and returns their labels, float32
        [B, label_dim] (translate_int slots are whole pixels of that size)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, the images on {device}; "
                             "pass a generator on the images' device")
        labels = torch.zeros(B, self.label_dim, dtype=torch.float32, device=device)

        def rand(*shape):
            return torch.rand(B, *shape, dtype=torch.float32, device=device, generator=generator)

        def randn(*shape):
            return torch.randn(B, *shape, dtype=torch.float32, device=device, generator=generator)

        # every enabled transform draws its numbers whether or not p selects it, so the stream
        # a generator produces does not depend on p
        for name in self.enabled:
            use = rand() < self.probability(name)                               # [B]
            if name in ("xflip", "yflip"):
                value = torch.floor(rand() * 2).clamp_(max=1)[:, None]          # [B, 1]
            elif name == "rotate90":
                k = torch.floor(rand() * 4).clamp_(max=3)                       # [B]
                cos = (k == 0).float() - (k == 2).float()
                sin = (k == 1).float() - (k == 3).float()
                value = torch.stack([cos - 1, sin], dim=1)                      # [B, 2]
            elif name == "translate_int":
                u = (rand(2) * 2 - 1) * self.translate_int_max                  # [B, 2]
                value = torch.stack([torch.round(u[:, 0] * W) / W,
                                     torch.round(u[:, 1] * H) / H], dim=1) + 0.0  # no -0
            elif name == "scale":
                value = randn(1) * self.scale_std                               # [B, 1]
            elif name == "rotate":
                a = (rand() * 2 - 1) * (math.pi * self.rotate_max)
                # cos a - 1 = -2 sin^2(a/2) keeps its precision for small angles
                value = torch.stack([-2 * torch.sin(a / 2) ** 2, torch.sin(a)], dim=1)
            elif name == "aniso":
                lg = randn() * self.aniso_std
                two_phi = rand() * (2 * math.pi)
                value = torch.stack([lg * torch.cos(two_phi), lg * torch.sin(two_phi)], dim=1)
            else:  # translate
                value = randn(2) * self.translate_std                           # [B, 2]
            labels[:, self.slots[name]] = torch.where(use[:, None], value, 0.0)
        return labels

    # ---- labels -> transform ----
    def matrices(self, labels: torch.Tensor, H: int, W: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The source -> output maps G [B, 3, 3] (pixel-centre coordinates) the labels describe."""
        B = labels.shape[0]
        lab = labels.to(dtype)
        G = torch.eye(3, dtype=dtype, device=labels.device).expand(B, 3, 3)

        def linear(m00, m01, m10, m11):
            M = torch.zeros(B, 3, 3, dtype=dtype, device=labels.device)
            M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1] = m00, m01, m10, m11
            M[:, 2, 2] = 1
            return M

        def shift(tx, ty):
            M = torch.eye(3, dtype=dtype, device=labels.device).repeat(B, 1, 1)
            M[:, 0, 2], M[:, 1, 2] = tx, ty
            return M

        one = torch.ones(B, dtype=dtype, device=labels.device)
        ln2 = math.log(2)
        for name in self.enabled:
            v = lab[:, self.slots[name]]
            if name == "xflip":
                M = linear(1 - 2 * v[:, 0], 0, 0, one)
            elif name == "yflip":
                M = linear(one, 0, 0, 1 - 2 * v[:, 0])
            elif name in ("rotate90", "rotate"):
                c, s = 1 + v[:, 0], v[:, 1]
                M = linear(c, -s, s, c)
            elif name == "translate_int":
                # whole pixels by definition: rounding removes the float error of label * size
                M = shift(torch.round(v[:, 0] * W), torch.round(v[:, 1] * H))
            elif name == "scale":
                s = torch.exp2(v[:, 0])
                M = linear(s, 0, 0, s)
            elif name == "aniso":
                # exp(ln2 L) for L = [[a, b], [b, -a]]: L^2 = r^2 I, so the series sums to
                # cosh(ln2 r) I + sinh(ln2 r) / r L
                a, b = v[:, 0], v[:, 1]
                r = torch.sqrt(a * a + b * b)
                sinhc = torch.where(r > 0, torch.sinh(ln2 * r) / torch.where(r > 0, r, one),
                                    ln2 * one)
                ch = torch.cosh(ln2 * r)
                M = linear(ch + sinhc * a, sinhc * b, sinhc * b, ch - sinhc * a)
            else:  # translate
                M = shift(v[:, 0] * W, v[:, 1] * H)
            G = M @ G
        return G

    def _theta(self, labels: torch.Tensor, H: int, W: int, dtype: torch.dtype) -> torch.Tensor:
        """affine_grid's theta [B, 2, 3]: output -> source in normalised (align_corners=False)
        coordinates, g = 2 u / W (x) and 2 v / H (y) for pixel-centre coordinates (u, v)."""
        G = self.matrices(labels, H, W, dtype)
        a, b, c, d = G[:, 0, 0], G[:, 0, 1], G[:, 1, 0], G[:, 1, 1]
        det = a * d - b * c
        inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
        inv = inv / det[:, None, None]                                          # [B, 2, 2]
        t_inv = -(inv @ G[:, :2, 2:])[..., 0]                                   # [B, 2]
        # with D = diag(2/W, 2/H): theta = [D inv D^-1 | D t_inv]
        row_x = torch.stack([inv[:, 0, 0], inv[:, 0, 1] * (H / W), t_inv[:, 0] * (2 / W)], -1)
        row_y = torch.stack([inv[:, 1, 0] * (W / H), inv[:, 1, 1], t_inv[:, 1] * (2 / H)], -1)
        return torch.stack([row_x, row_y], dim=1)                               # [B, 2, 3]

    def exact(self, labels: torch.Tensor) -> torch.Tensor:
        """bool [B]: True where only pixel-centre-preserving transforms were drawn."""
        cont = [self.slots[k] for k in self.enabled if k not in _EXACT]
        if not cont:
            return torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        return torch.stack([(labels[:, sl] == 0).all(1) for sl in cont]).all(0)

    def apply(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Warps x [B, C, H, W] by the transforms `labels` [B, label_dim] describe."""
        self._check(x)
        self._check_labels(labels, x)
        B, C, H, W = x.shape
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        labels = labels.to(x.device)
        theta = self._theta(labels, H, W, work)
        grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)         # [B, H, W, 2]
        xw = x.to(work)
        out = F.grid_sample(xw, grid, mode="nearest", padding_mode="reflection",
                            align_corners=False)                               # [B, C, H, W]
        if any(k not in _EXACT for k in self.enabled):
            smooth = F.grid_sample(xw, grid, mode="bilinear", padding_mode="reflection",
                                   align_corners=False)                        # [B, C, H, W]
            out = torch.where(self.exact(labels)[:, None, None, None], out, smooth)
        out = out.to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        B, _, H, W = x.shape
        if self.p == 0 or self.label_dim == 0:
            return x, torch.zeros(B, self.label_dim, dtype=torch.float32, device=x.device)
        labels = self.sample_labels(B, H, W, x.device, generator)
        return self.apply(x, labels), labels
