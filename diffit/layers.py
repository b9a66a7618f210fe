"""DiffiT building blocks shared by the latent model (diffit.latent) and the image-space U-Net.

Every block runs through the public ops of diffit_kernels (DESIGN.md section 3):

    DiffiTBlock  (TMSA conditioning, paper eqs. 7-8)
        q, k, v = time_qkv(x, c, ..., norm_eps=1e-6)         LN(x) folded into the QKV GEMM
        o       = tmsa_attention(q, k, v, table=...)          relative-position bias table
        y, x    = adaln_norm(proj(o), residual=x)             x += attn;  y = LN(x)
        x       = x + MLP(y)
    AdaLNBlock   (DiT's adaLN-Zero, the paper's ablation) uses adaln_norm's shift/scale/gate.
Under autocast the residual stream x stays float32 and the ops take it as it is: time_qkv's
fused LayerNorm reads it and writes its output in the compute dtype, adaln_norm adds the 16-bit
branch onto it and returns y in the compute dtype (no cast kernels between the blocks' ops).

A module stores the `backend` string it was built with and hands it to every op call; the op
resolves it per call from the tensors' device (the device is not known in __init__), so there is
one code path: backend="torch" is the plain-PyTorch reference, "triton" the fused kernels.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffit_kernels import adaln_norm, relative_position_index, time_qkv, tmsa_attention
from diffit_kernels._common import BACKENDS as _BACKENDS

LN_EPS = 1e-6


def _check_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own.

    The fused ops are custom ops that autocast does not see, so blocks cast their inputs and
    weights to this dtype themselves (what autocast would have done for the Linear layers).
    Each weight is cast once per forward, which in training is once per optimizer step, the
    only time it changes (a per-step cache would save nothing); under torch.compile, the
    training default on CUDA, the casts of activations fuse into the neighbouring kernels.
    """
    dev = x.device.type
    if dev in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _residual_add(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch in x's dtype. A bf16 branch (autocast) onto the fp32 residual stream is one
    add kernel reading it as it is (type promotion, exact), not a cast kernel and then the add."""
    if torch.promote_types(x.dtype, branch.dtype) != x.dtype:
        branch = branch.to(x.dtype)
    return x + branch


def _pair(w: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(w, int):
        w = (w, w)
    w = tuple(int(v) for v in w)
    if len(w) != 2 or min(w) < 1:
        raise ValueError(f"{name} must be a positive int or a pair (gh, gw), got {w!r}")
    return w


# ---- embeddings -----------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim], float32.

    emb = [cos(t * f_k), sin(t * f_k)] with f_k = max_period^(-k / half), k < half = dim // 2;
    cos comes first as in the official release; an odd dim gets one zero column.
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape [B], got shape {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)                 # [half]
    args = t.float()[:, None] * freqs[None]                             # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)         # [B, 2*half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, hidden]: sinusoidal frequencies, then Linear-SiLU-Linear (keys mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = timestep_embedding(t, self.frequency_embedding_size)         # [B, 256]
        return self.mlp(f.to(self.mlp[0].weight.dtype))                  # [B, hidden]


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, embed_dim]: [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (D/2))."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                                        # [D/2]
    out = pos.to(torch.float64)[:, None] * omega[None]                  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)           # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding (MAE / DiT construction), float32 [Gh*Gw, D].

    Tokens are row-major (n = i*Gw + j). The first D/2 channels embed the column coordinate j,
    the last D/2 the row coordinate i, each as [sin, cos] (DESIGN.md section 7).
    """
    gh, gw = _pair(grid_size, "grid_size")
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    i = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)     # row of token n
    j = torch.arange(gw, dtype=torch.float64).repeat(gh)                # column of token n
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, j),
                     get_1d_sincos_pos_embed(embed_dim // 2, i)], dim=1)
    return emb.float()


# ---- attention ------------------------------------------------------------------------------
class TMSAttention(nn.Module):
    """Time-dependent multi-head self-attention; a drop-in for the official `DiffiTAttention`.

    Same constructor arguments, parameter / buffer names and `forward(x, temb)` contract:
    x [B, N, C] already layer-normed, temb [B, temb_dim] the time token, output [B, N, C].

        q, k, v = x W_qkv^T + b + (temb W_temb^T + b_temb)      split into heads of d = C / H
        O = softmax(q k^T * scale + B_rel) v,   B_rel from relative_position_bias_table

    window_size: int or (gh, gw): the attention window; the module owns its table
        [(2gh-1)(2gw-1), H] and relative_position_index [gh*gw, gh*gw] (int64, persistent, kept
        for checkpoint compatibility: the ops derive the same index from (gh, gw)).
    temb_dim: None builds the attention without the time term (no qkv_temb), as DiT's blocks.
    attn_drop: attention-probability dropout is not implemented by the fused kernel; only 0.
    """

    def __init__(self, dim: int, temb_dim: Optional[int], num_heads: int,
                 window_size: Union[int, Sequence[int]] = 16, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if attn_drop:
            raise NotImplementedError(
                f"attn_drop={attn_drop}: attention dropout is not supported by the fused TMSA "
                "kernel (the official DiffiT model uses 0.0)")
        self.dim, self.temb_dim, self.num_heads = dim, temb_dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.window_size = _pair(window_size, "window_size")
        self.backend = _check_backend(backend)
        gh, gw = self.window_size

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * gh - 1) * (2 * gw - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(gh, gw),
                             persistent=True)
        self.qkv_temb = nn.Linear(temb_dim, 3 * dim) if temb_dim else None
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, temb_dim={self.temb_dim}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, backend={self.backend!r}")

    def _layout(self, N: int, grid) -> Tuple[Tuple[int, int], Optional[Tuple[int, int]]]:
        """(grid, window) for tmsa_attention; window None when one window covers the grid."""
        if grid is None:
            grid = self.window_size
            if grid[0] * grid[1] != N:
                raise ValueError(
                    f"x has N={N} tokens but window_size={self.window_size} covers "
                    f"{grid[0] * grid[1]}: pass grid=(Gh, Gw) for windowed attention")
        grid = _pair(grid, "grid")
        return grid, (None if grid == self.window_size else self.window_size)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor], grid=None, *,
                norm_eps: Optional[float] = None) -> torch.Tensor:
        """x [B, N, C], temb [B, temb_dim] or None (plain TMSA without the time term).

        grid: (Gh, Gw) of the N row-major tokens; None = one window covering all tokens.
        norm_eps: a float means x is the raw residual stream and LayerNorm (no affine) is
            applied first, fused into the QKV projection; None (the official contract) = x is
            already normalised.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, C={self.dim}], got shape {tuple(x.shape)}")
        B, N, C = x.shape
        grid, window = self._layout(N, grid)
        if temb is not None and self.qkv_temb is None:
            raise ValueError("this TMSAttention was built with temb_dim=None: pass temb=None")
        dt = compute_dtype(x)
        tw = tb = None
        if temb is not None:
            temb, tw, tb = temb.to(dt), self.qkv_temb.weight.to(dt), _to(self.qkv_temb.bias, dt)
        if norm_eps is None or x.dtype != torch.float32:
            x = x.to(dt)  # else the fused LayerNorm reads the float32 residual stream itself
        q, k, v = time_qkv(x, temb, self.qkv.weight.to(dt), _to(self.qkv.bias, dt),
                           tw, tb, self.num_heads, norm_eps=norm_eps,
                           backend=self.backend)                        # 3 x [B, H, N, d]
        o = tmsa_attention(q, k, v, table=self.relative_position_bias_table, grid=grid,
                           window=window, scale=self.scale, backend=self.backend)  # [B, H, N, d]
        o = o.transpose(1, 2).reshape(B, N, C)                          # [B, N, C]
        return self.proj_drop(self.proj(o))                             # [B, N, C]

    @classmethod
    def from_module(cls, m: nn.Module, *, backend: str = "auto") -> "TMSAttention":
        """A TMSAttention holding a copy of the weights of an official `DiffiTAttention`-like m.

        Reads m.qkv, m.qkv_temb, m.proj, m.relative_position_bias_table,
        m.relative_position_index, m.num_heads and m.scale; the result lives on m's device and
        dtype and computes the same function. Raises ValueError when the index buffer is not
        Swin's construction for a (gh, gw) window (the kernels derive the index from (gh, gw)).
        """
        for name in ("qkv", "proj", "relative_position_bias_table", "relative_position_index",
                     "num_heads"):
            if not hasattr(m, name):
                raise TypeError(f"from_module needs a DiffiTAttention-like module with "
                                f"`{name}`; {type(m).__name__} has none")
        qkv_temb = getattr(m, "qkv_temb", None)
        dim, H = m.qkv.in_features, int(m.num_heads)
        n = m.relative_position_index.shape[0]
        ws = getattr(m, "window_size", None)
        if ws is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"cannot infer a square window from relative_position_index "
                                 f"of shape {tuple(m.relative_position_index.shape)}")
            ws = side
        gh, gw = _pair(ws, "window_size")
        head_dim = dim // H
        scale = float(getattr(m, "scale", head_dim ** -0.5))
        proj_drop = getattr(getattr(m, "proj_drop", None), "p", 0.0)
        attn_drop = getattr(getattr(m, "attn_drop", None), "p", 0.0)
        new = cls(dim, qkv_temb.in_features if qkv_temb is not None else None, H, (gh, gw),
                  qkv_bias=m.qkv.bias is not None,
                  qk_scale=None if math.isclose(scale, head_dim ** -0.5) else scale,
                  attn_drop=attn_drop, proj_drop=proj_drop, backend=backend)
        if not torch.equal(m.relative_position_index.cpu(), new.relative_position_index):
            raise ValueError(f"{type(m).__name__}.relative_position_index is not Swin's index "
                             f"for a {gh}x{gw} window; the fused kernels assume that layout")
        if qkv_temb is not None and qkv_temb.bias is None:
            new.qkv_temb.bias = None
        ref = m.qkv.weight
        new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(m.state_dict(), strict=True)
        new.train(m.training)
        return new


# ---- blocks ---------------------------------------------------------------------------------
class Mlp(nn.Module):
    """fc1 (C -> hidden) -> GELU(tanh) -> fc2 (hidden -> C)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DiffiTBlock(nn.Module):
    """x = x + TMSA(LN(x), c);  x = x + MLP(LN(x))   (LN without affine, eps 1e-6).

    Keys attn.* and mlp.fc1 / fc2 (the norms have none), as the official blocks.
    """

    def __init__(self, dim: int, temb_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 window_size: Union[int, Sequence[int]] = 16, *, backend: str = "auto"):
        super().__init__()
        self.backend = _check_backend(backend)
        self.attn = TMSAttention(dim, temb_dim, num_heads, window_size, qkv_bias=True,
                                 backend=backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid=None) -> torch.Tensor:
        """x [B, N, C] residual stream, c [B, temb_dim] time token -> [B, N, C]."""
        a = self.attn(x, c, grid, norm_eps=LN_EPS)                      # [B, N, C]
        # a in the compute dtype onto the residual stream as it is (float32 under autocast):
        # h = x + a stays in x's dtype, y = LN(h) comes out in a's, the MLP's input
        y, x = adaln_norm(a, residual=x, eps=LN_EPS, backend=self.backend)  # x += a; y = LN(x)
        return _residual_add(x, self.mlp(y))                            # [B, N, C]


class AdaLNBlock(nn.Module):
    """DiT's adaLN-Zero block on the same kernels (the paper's TMSA-vs-adaLN ablation).

        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))      zero-initialised
        x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)                 (no time term in qkv)
        x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)
    Keys attn.* (no qkv_temb), mlp.*, adaLN_modulation.1.
    """

    def __init__(self, dim: int, temb_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 window_size: Union[int, Sequence[int]] = 16, *, backend: str = "auto"):
        super().__init__()
        self.backend = _check_backend(backend)
        self.attn = TMSAttention(dim, None, num_heads, window_size, qkv_bias=True,
                                 backend=backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid=None) -> torch.Tensor:
        """x [B, N, C] residual stream, c [B, temb_dim] -> [B, N, C]."""
        mod = self.adaLN_modulation(c).to(x.dtype)                      # [B, 6C]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)  # 6 x [B, C] views
        y = adaln_norm(x, shift1, scale1, eps=LN_EPS, backend=self.backend)  # [B, N, C]
        a = self.attn(y, None, grid)                                    # [B, N, C]
        y, x = adaln_norm(a, shift2, scale2, residual=x, gate=gate1, eps=LN_EPS,
                          backend=self.backend)                         # x += gate1 * a
        m = self.mlp(y).to(x.dtype)                                     # [B, N, C]
        return x + gate2[:, None, :] * m                                # [B, N, C]
