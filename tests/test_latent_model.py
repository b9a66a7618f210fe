"""Latent DiffiT: official state-dict layout, forward semantics against a hand-written official
model, guidance, the drop-in attention, checkpoint loading, backend parity (interpreter)."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diffit
from diffit.layers import TMSAttention, get_2d_sincos_pos_embed, timestep_embedding
from diffit.latent import (PRESETS, CheckpointMismatchError, DiffiT, DiffiTConfig, infer_config,
                           preset_config)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")


def _tsv(name):
    rows = []
    for line in (DATA / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, shape, dtype))
    return rows


def _layout(model):
    return [(k, str(tuple(v.shape)), str(v.dtype).replace("torch.", ""))
            for k, v in model.state_dict().items()]


def _tiny(input_size=8, **kw):
    """Tiny config with every parameter random (the zero-initialised output layer and adaLN
    modulation would hide most of the model), float32, torch backend unless given. Weights
    have std 1/sqrt(fan_in) so activations stay O(1) and softmax does not saturate."""
    kw.setdefault("backend", "torch")
    model = DiffiT(config=preset_config("DiffiT-tiny", input_size=input_size, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = p[0].numel() if p.dim() > 1 and "embedding" not in name else 1
            p.normal_(0, fan_in ** -0.5 if p.dim() > 1 else 0.1)
    return model


# ---- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tsv,input_size", [("diffit_xl2_256_state_dict.tsv", 32),
                                            ("diffit_xl2_512_state_dict.tsv", 64)],
                         ids=["XL2-256", "XL2-512"])
def test_xl_state_dict_matches_official_list(tsv, input_size):
    with torch.device("meta"):
        model = DiffiT(input_size=input_size)
    assert _layout(model) == _tsv(tsv)
    assert len(model.state_dict()) == 346


@pytest.mark.parametrize("input_size,count", [(32, 561_330_144), (64, 563_562_464)],
                         ids=["256px", "512px"])
def test_xl_parameter_count(input_size, count):
    with torch.device("meta"):
        model = diffit.DiffiT_XL_2(input_size=input_size)
    assert sum(p.numel() for p in model.parameters()) == count


def test_tiny_state_dict_matches_official_list():
    rows = _tsv("diffit_tiny_state_dict.tsv")
    n_tokens = int(rows[0][1].strip("()").split(",")[1])
    with torch.device("meta"):
        model = DiffiT.from_preset("DiffiT-tiny", input_size=2 * math.isqrt(n_tokens))
    assert _layout(model) == rows


@pytest.mark.parametrize("name,C,depth,H", [("DiffiT-S/2", 384, 12, 6), ("DiffiT-B/2", 768, 12, 12),
                                            ("DiffiT-L/2", 1024, 24, 16),
                                            ("DiffiT-XL/2", 1152, 28, 16)])
def test_presets(name, C, depth, H):
    with torch.device("meta"):
        model = DiffiT.from_preset(name)
    sd = model.state_dict()
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * C, C)
    assert sd["blocks.0.attn.relative_position_bias_table"].shape == (31 * 31, H)
    assert len(model.blocks) == depth and f"blocks.{depth - 1}.mlp.fc2.bias" in sd
    assert name in PRESETS


def test_official_constructor_signature():
    m = DiffiT(8, 2, 4, 32, 1, 2, 4.0, 0.1, 7, False, backend="torch")
    assert m.config == DiffiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                                    depth=1, num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1,
                                    num_classes=7, learn_sigma=False, backend="torch")
    assert m.final_layer.linear.weight.shape == (2 * 2 * 4, 32)
    assert m.y_embedder.embedding_table.weight.shape == (8, 32)
    with pytest.raises(ValueError, match="conditioning"):
        DiffiTConfig(conditioning="film")


# ---- embeddings and index against independent formulas -----------------------------------
def test_pos_embed_formula():
    D, G = 16, 5
    pe = get_2d_sincos_pos_embed(D, G)
    want = torch.empty(G * G, D, dtype=torch.float64)
    q = D // 4
    for n in range(G * G):
        row, col = divmod(n, G)
        for c in range(D):
            coord = col if c < D // 2 else row        # first half: column coordinate
            k = c % q
            w = 10000.0 ** (-k / q)
            within = c % (D // 2)
            want[n, c] = math.sin(coord * w) if within < q else math.cos(coord * w)
    torch.testing.assert_close(pe.double(), want, rtol=0, atol=1e-6)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.0, 517.5, 999.0])
    dim = 10
    emb = timestep_embedding(t, dim)
    for b, tv in enumerate(t.tolist()):
        for k in range(5):
            f = math.exp(-math.log(10000) * k / 5)
            assert emb[b, k].item() == pytest.approx(math.cos(tv * f), abs=1e-4)      # cos first
            assert emb[b, 5 + k].item() == pytest.approx(math.sin(tv * f), abs=1e-4)
    assert timestep_embedding(t, 7)[:, -1].abs().max() == 0                      # odd: pad


@pytest.mark.parametrize("gh,gw", [(3, 3), (2, 4)])
def test_relative_position_index_formula(gh, gw):
    attn = TMSAttention(8, 8, 2, window_size=(gh, gw), backend="torch")
    idx = attn.relative_position_index
    assert idx.dtype == torch.int64 and idx.shape == (gh * gw, gh * gw)
    for a in range(gh * gw):
        for b in range(gh * gw):
            (ia, ja), (ib, jb) = divmod(a, gw), divmod(b, gw)
            assert idx[a, b].item() == (ia - ib + gh - 1) * (2 * gw - 1) + (ja - jb + gw - 1)


def test_power_cosine_guidance_scale():
    m = _tiny(input_size=8)
    t = torch.tensor([999, 750, 500, 100, 0])
    s = m.guidance_scale(t, 4.4)
    for tv, sv in zip(t.tolist(), s.tolist()):
        want = (4.4 - 1) * (1 - math.cos(math.pi * (1 - tv / 1000) ** 4)) / 2 + 1
        assert sv == pytest.approx(want, rel=1e-6)
    assert s[0].item() == pytest.approx(1.0, abs=1e-6) and s[-1].item() == pytest.approx(4.4)
    assert torch.all(m.guidance_scale(t, 1.49, schedule="constant") == 1.49)
    with torch.device("meta"):
        big = DiffiT.from_preset("DiffiT-tiny", input_size=64)
    assert torch.all(big.guidance_scale(t, 1.49) == 1.49)                       # auto above 32


# ---- attention against a hand computation and an official-style module ---------------------
def _hand_attention(x, temb, Wqkv, bqkv, Wt, bt, Wp, bp, table, H, grid, window, scale=None):
    """softmax(q k^T d^-1/2 + B) v with q/k/v from the two fused linears, windows by masking."""
    B, N, C = x.shape
    d = C // H
    qkv = x @ Wqkv.T + bqkv
    if temb is not None:
        qkv = qkv + (temb @ Wt.T + bt)[:, None]
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, N, H, d).transpose(1, 2) for i in range(3))
    (_, Gw), (gh, gw) = grid, window
    pos = [divmod(n, Gw) for n in range(N)]
    bias = torch.empty(H, N, N)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for a in range(N):
        for b in range(N):
            (ia, ja), (ib, jb) = pos[a], pos[b]
            mask[a, b] = (ia // gh, ja // gw) == (ib // gh, jb // gw)
            r = ((ia % gh) - (ib % gh) + gh - 1) * (2 * gw - 1) + ((ja % gw) - (jb % gw) + gw - 1)
            bias[:, a, b] = table[r]
    s = (q @ k.transpose(-1, -2)) * (scale or d ** -0.5) + bias
    s = s.masked_fill(~mask, float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return o @ Wp.T + bp


@pytest.mark.parametrize("use_temb", [True, False], ids=["temb", "no-temb"])
@pytest.mark.parametrize("grid,window", [((4, 4), (4, 4)), ((4, 6), (2, 3))],
                         ids=["global", "windowed"])
def test_tmsa_attention_matches_hand_reference(use_temb, grid, window):
    C, Ct, H = 24, 12, 3
    attn = TMSAttention(C, Ct, H, window_size=window, backend="torch")
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    N = grid[0] * grid[1]
    x, temb = torch.randn(2, N, C), torch.randn(2, Ct)
    g = None if grid == window else grid
    out = attn(x, temb if use_temb else None, g)
    want = _hand_attention(x, temb if use_temb else None, attn.qkv.weight, attn.qkv.bias,
                           attn.qkv_temb.weight, attn.qkv_temb.bias, attn.proj.weight,
                           attn.proj.bias, attn.relative_position_bias_table, H, grid, window)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    if use_temb:  # the time term must matter, else the test would not see it dropped
        assert not torch.allclose(out, attn(x, None, g), atol=1e-3)


def test_tmsa_norm_eps_folds_layernorm():
    attn = TMSAttention(16, 16, 2, window_size=(2, 3), backend="torch")
    x, c = torch.randn(2, 6, 16) * 3 + 1, torch.randn(2, 16)
    torch.testing.assert_close(attn(x, c, norm_eps=1e-6),
                               attn(F.layer_norm(x, (16,), eps=1e-6), c), rtol=1e-4, atol=1e-5)


class OfficialStyleAttention(nn.Module):
    """Written here from DESIGN.md section 7: the official parameter names and math."""

    def __init__(self, dim, temb_dim, num_heads, window_size=16):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        w = window_size
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * w - 1) ** 2, num_heads))
        ii, jj = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
        coords = torch.stack([ii.flatten(), jj.flatten()])                # [2, w*w]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * w - 1) + rel[..., 1])
        self.qkv_temb = nn.Linear(temb_dim, 3 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, temb):
        B, N, C = x.shape
        qkv = self.qkv(x) + self.qkv_temb(temb)[:, None]
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1)[None]
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(o)


def test_from_module_round_trip():
    off = OfficialStyleAttention(24, 16, 4, window_size=3)
    ours = TMSAttention.from_module(off, backend="torch")
    assert set(ours.state_dict()) == set(off.state_dict())
    x = torch.randn(2, 9, 24, requires_grad=True)
    c = torch.randn(2, 16, requires_grad=True)
    dy = torch.randn(2, 9, 24)
    o_ref = off(x, c)
    g_ref = torch.autograd.grad(o_ref, [x, c, *off.parameters()], dy)
    o = ours(x, c)
    g = torch.autograd.grad(o, [x, c, *[dict(ours.named_parameters())[n]
                                        for n, _ in off.named_parameters()]], dy)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        off.relative_position_index[0, 0] = 1
    with pytest.raises(ValueError, match="relative_position_index"):
        TMSAttention.from_module(off)


# ---- whole-model forward against an official-style functional forward -----------------------
def _official_forward(sd, x, t, y, cfg):
    """The released model's forward written out from DESIGN.md sections 1 and 7."""
    p, C, H = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    G = cfg.input_size // p
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    f = torch.exp(-math.log(10000) * torch.arange(half) / half)
    te = torch.cat([torch.cos(t[:, None].float() * f), torch.sin(t[:, None].float() * f)], -1)
    te = F.linear(F.silu(F.linear(te, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                  sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = te + sd["y_embedder.embedding_table.weight"][y]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        a = _hand_attention(F.layer_norm(h, (C,), eps=1e-6), c, sd[b + "attn.qkv.weight"],
                            sd[b + "attn.qkv.bias"], sd[b + "attn.qkv_temb.weight"],
                            sd[b + "attn.qkv_temb.bias"], sd[b + "attn.proj.weight"],
                            sd[b + "attn.proj.bias"], sd[b + "attn.relative_position_bias_table"],
                            H, (G, G), (G, G))
        h = h + a
        m = F.gelu(F.linear(F.layer_norm(h, (C,), eps=1e-6), sd[b + "mlp.fc1.weight"],
                            sd[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    h = F.linear(F.silu(F.layer_norm(h, (C,), eps=1e-6)), sd["final_layer.linear.weight"],
                 sd["final_layer.linear.bias"])
    out = cfg.out_channels
    h = h.reshape(-1, G, G, p, p, out)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, out, G * p, G * p)


def test_forward_matches_official_semantics():
    model = _tiny(input_size=8).eval()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([1, 9, 10])                                   # 10 = the null class
    with torch.no_grad():
        out = model(x, t, y)
        want = _official_forward(model.state_dict(), x, t, y, model.config)
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_class_dropout_in_training_uses_null_class():
    model = _tiny(input_size=8, class_dropout_prob=1.0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.tensor([3, 4])
    with torch.no_grad():
        dropped = model.train()(x, t, y)
        null = model.eval()(x, t, torch.tensor([10, 10]))
        cond = model.eval()(x, t, y)
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(dropped, cond, atol=1e-3)


@pytest.mark.parametrize("channels,schedule", [(3, "auto"), ("all", "auto"), (3, "constant")])
def test_forward_with_cfg_semantics(channels, schedule):
    model = _tiny(input_size=8).eval()
    B = 2
    x = torch.randn(2 * B, 4, 8, 8)
    t = torch.tensor([900, 30, 900, 30])
    y = torch.tensor([2, 7, 10, 10])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 4.0, guidance_channels=channels,
                                     schedule=schedule)
        both = model(torch.cat([x[:B], x[:B]]), t, y)        # the second half of x is unused
    cond, uncond = both[:B], both[B:]
    k = 4 if channels == "all" else 3
    if schedule == "constant":
        s = torch.full((B,), 4.0)
    else:
        s = 3.0 * (1 - torch.cos(math.pi * (1 - t[:B].float() / 1000) ** 4)) / 2 + 1
    guided = uncond[:, :k] + s.view(-1, 1, 1, 1) * (cond[:, :k] - uncond[:, :k])
    torch.testing.assert_close(out[:B, :k], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[B:, :k], guided, rtol=1e-5, atol=1e-5)
    # unguided channels: the conditional output for the samples (the first half), and as
    # released the unconditional one in the (discarded) second half
    torch.testing.assert_close(out[:, k:], both[:, k:])


# ---- training features ----------------------------------------------------------------------
@pytest.mark.parametrize("conditioning", ["tmsa", "adaln"])
def test_gradients_reach_every_parameter(conditioning):
    model = _tiny(input_size=8, conditioning=conditioning).train()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 2]))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if name == "pos_embed":
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if "qkv_temb" not in name:  # k's time term gets an (exactly) zero gradient
                assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_same_gradients():
    model = _tiny(input_size=8, class_dropout_prob=0.0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model.train()(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adaln_block_initialises_to_identity():
    """adaLN-Zero: with the zero-initialised modulation each block is the identity."""
    model = DiffiT.from_preset("DiffiT-tiny", input_size=8, conditioning="adaln",
                               backend="torch")
    h, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    torch.testing.assert_close(model.blocks[0](h, c, (4, 4)), h)
    assert "blocks.0.adaLN_modulation.1.weight" in model.state_dict()
    assert "blocks.0.attn.qkv_temb.weight" not in model.state_dict()


def test_autocast_bf16():
    model = _tiny(input_size=8).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_residual_add_keeps_the_stream_dtype_and_values():
    """The block adds its bf16 MLP branch onto the fp32 stream by type promotion (one kernel):
    bit for bit what a cast then an add gives, gradients included; the stream's dtype wins."""
    from diffit.layers import DiffiTBlock, _residual_add

    x = torch.randn(2, 5, 8, requires_grad=True)
    m = torch.randn(2, 5, 8).bfloat16().requires_grad_()
    dy = torch.randn(2, 5, 8)
    got = _residual_add(x, m)
    want = x + m.to(x.dtype)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, (x, m), dy),
                                                  torch.autograd.grad(want, (x, m), dy)))
    assert _residual_add(m, x).dtype == torch.bfloat16          # never widens the stream
    blk = DiffiTBlock(64, 64, 4, window_size=4, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert blk(torch.randn(2, 16, 64), torch.randn(2, 64)).dtype == torch.float32


# ---- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_from_pretrained_round_trip(tmp_path, suffix):
    from diffit.checkpoint import save_state_dict

    model = _tiny(input_size=8, num_classes=5).eval()
    path = save_state_dict(model.state_dict(), tmp_path / f"m{suffix}")
    loaded = DiffiT.from_pretrained(path, backend="torch").eval()
    assert loaded.config == model.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y))
    assert not list(tmp_path.glob(".*tmp"))


def test_infer_config_from_official_layout():
    with torch.device("meta"):
        sd = DiffiT(input_size=64).state_dict()
    cfg = infer_config(sd)
    assert (cfg.input_size, cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_classes,
            cfg.learn_sigma, cfg.patch_size) == (64, 1152, 28, 16, 1000, True, 2)


def test_mismatched_checkpoint_loads_nothing():
    model = _tiny(input_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}
    bad = dict(good)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.0.attn.qkv.weight"] = torch.randn(3, 3)
    bad["blocks.0.attn.extra"] = torch.randn(2)
    with pytest.raises(CheckpointMismatchError) as e:
        model.load_checkpoint(bad)
    msg = str(e.value)
    for key in ("blocks.1.mlp.fc2.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.extra",
                "nothing was loaded", "missing", "unexpected", "mis-shaped"):
        assert key in msg
    assert e.value.missing == ["blocks.1.mlp.fc2.bias"]
    assert e.value.unexpected == ["blocks.0.attn.extra"]
    tampered = dict(good)
    tampered["blocks.0.attn.relative_position_index"] = good[
        "blocks.0.attn.relative_position_index"].flip(0)
    with pytest.raises(CheckpointMismatchError, match="relative position index"):
        model.load_checkpoint(tampered)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.load_checkpoint(good)
    assert torch.equal(model.state_dict()["final_layer.linear.bias"],
                       good["final_layer.linear.bias"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_or_mismatched_file(tmp_path, suffix):
    from diffit.checkpoint import save_state_dict

    model = _tiny(input_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_state_dict(model.state_dict(), tmp_path / f"m{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(path.name)):
        model.load_checkpoint(path)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        DiffiT.from_pretrained(path)
    other = DiffiT.from_preset("DiffiT-tiny", input_size=16, backend="torch")   # other latent size
    path2 = save_state_dict(other.state_dict(), tmp_path / f"o{suffix}")
    with pytest.raises(CheckpointMismatchError, match="pos_embed"):
        model.load_checkpoint(path2)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        DiffiT.from_pretrained(path2, config=preset_config("DiffiT-tiny", input_size=8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- backends -------------------------------------------------------------------------------
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("conditioning", ["tmsa", "adaln"])
def test_backends_agree_tiny(conditioning, dtype):
    """Same weights, backend torch vs triton (the interpreter): the output and every parameter
    gradient within the numerics rule (DESIGN.md section 5; whole model in `dtype`)."""
    from diffit_kernels.testing import assert_parity, model_rows

    base = _tiny(input_size=8, conditioning=conditioning, num_classes=10)   # 16 tokens, 4 heads
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([321]), torch.tensor([4])
    dy = torch.randn(1, 8, 8, 8)

    def run(backend, dt):
        m = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, conditioning=conditioning,
                                        backend=backend))
        m.load_state_dict(base.state_dict())
        m = m.to(dt).eval()
        o = m(x.to(dt), t, y)
        o.float().backward(dy)
        return o.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    ref = run("torch", torch.float32)
    pt = run("torch", dtype) if dtype != torch.float32 else ref
    assert_parity(model_rows(dtype, run("triton", dtype), ref, pt))


@pytest.mark.interpreter
@pytest.mark.parametrize("grid,window,use_temb", [((4, 4), (4, 4), True), ((4, 6), (2, 3), False)],
                         ids=["global-temb", "windowed-no-temb"])
def test_tmsa_attention_triton_matches_hand_reference(grid, window, use_temb):
    """The drop-in module on the Triton backend against the hand computation, with gradients."""
    C, Ct, H = 32, 16, 2
    attn = TMSAttention(C, Ct, H, window_size=window, backend="triton")
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    N = grid[0] * grid[1]
    x = torch.randn(2, N, C, requires_grad=True)
    temb = torch.randn(2, Ct) if use_temb else None
    g = None if grid == window else grid
    leaves = [x, attn.qkv.weight, attn.relative_position_bias_table]
    dy = torch.randn(2, N, C)
    out = attn(x, temb, g)
    grads = torch.autograd.grad(out, leaves, dy)
    want = _hand_attention(x, temb, attn.qkv.weight, attn.qkv.bias, attn.qkv_temb.weight,
                           attn.qkv_temb.bias, attn.proj.weight, attn.proj.bias,
                           attn.relative_position_bias_table, H, grid, window)
    want_grads = torch.autograd.grad(want, leaves, dy)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


@pytest.mark.interpreter
def test_autocast_bf16_triton_backend():
    """fp32 weights under bf16 autocast: the Triton path is as close to fp32 as eager is."""
    from diffit_kernels.testing import max_err, rule_bound

    base = _tiny(input_size=8)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([3])
    outs = {}
    for backend, amp in (("triton", True), ("torch", True), ("torch", False)):
        m = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, backend=backend))
        m.load_state_dict(base.state_dict())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outs[backend, amp] = m.eval()(x, t, y).float()
    ref, pt, out = outs["torch", False], outs["torch", True], outs["triton", True]
    assert max_err(out, ref) <= rule_bound(ref, pt, torch.bfloat16, 2.0)


@pytest.mark.interpreter
def test_compiled_blocks_fullgraph_with_the_fused_ops():
    """Regional torch.compile (what `python -m diffit train` does on CUDA): every block's forward
    compiled fullgraph with the custom ops inside, fp32 weights under bf16 autocast. One graph
    serves both blocks and a second step recompiles nothing; the output and every gradient obey
    the numerics rule against the fp32 eager model (eager bf16 autocast as the yardstick), and
    the two compiled steps agree bit for bit."""
    from diffit.accel import compile_blocks
    from diffit_kernels.testing import assert_parity, model_rows

    base = _tiny(input_size=8)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([321, 7]), torch.tensor([4, 1])
    keep = torch.zeros(2, dtype=torch.long)

    def model(backend):
        m = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, backend=backend))
        m.load_state_dict(base.state_dict())
        return m.train()

    def run(m, amp=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            o = m(x, t, y, force_drop_ids=keep)
        o.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return o.detach().float(), grads

    comp = model("triton")
    keys = comp.state_dict().keys()
    torch._dynamo.reset()
    try:
        assert compile_blocks(comp, backend="aot_eager") == 2
        assert comp.state_dict().keys() == keys
        with torch._dynamo.config.patch(error_on_recompile=True):
            first, second = run(comp), run(comp)
    finally:
        torch._dynamo.reset()
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][n], second[1][n]) for n in first[1])
    assert_parity(model_rows(torch.bfloat16, first, run(model("torch"), amp=False),
                             run(model("torch"))))


# ---- on a CUDA GPU: DiffiT-XL/2's shapes through the compiled kernels -----------------------
@pytest.mark.gpu
@pytest.mark.parametrize("input_size", [32, 64], ids=["256px-N256", "512px-N1024"])
def test_gpu_xl_blocks_bf16_autocast_match_eager(input_size):
    """DiffiT-XL/2 widths (C 1152, 16 heads, d 72) at two blocks, fp32 weights under bf16
    autocast as in training: the Triton backend's output and every parameter gradient within
    the numerics rule against the fp32 eager model, with eager bf16 autocast as the yardstick."""
    from diffit_kernels.testing import assert_parity, model_rows

    torch.manual_seed(0)
    cfg = dict(input_size=input_size, depth=2)
    base = DiffiT(config=preset_config("DiffiT-XL/2", backend="torch", **cfg))
    with torch.no_grad():  # the zero-initialised output layer would hide every other gradient
        for p in base.final_layer.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(2, 4, input_size, input_size, device="cuda")
    t, y = torch.tensor([17, 640], device="cuda"), torch.tensor([3, 1000], device="cuda")
    dy = torch.randn(2, 8, input_size, input_size, device="cuda")
    keep = torch.zeros(2, dtype=torch.long, device="cuda")

    def run(backend, amp):
        m = DiffiT(config=preset_config("DiffiT-XL/2", backend=backend, **cfg)).cuda()
        m.load_state_dict(base.state_dict())
        # train mode, as in training, but the label-dropout decision is given (keep both
        # labels: class 3 and the null row 1000 both get gradients): an unseeded draw per run
        # compared three models fed different labels on the card (issue 12.3)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            o = m(x, t, y, force_drop_ids=keep)
        o.float().backward(dy)
        return o.detach().float(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    rows = model_rows(torch.bfloat16, run("triton", True), run("torch", False),
                      run("torch", True))
    assert_parity(rows)
