"""Image-space DiffiT U-Net (diffit.unet): presets, shapes, gradients, window checks, class and
augmentation conditioning, the EDM wrapper around it, and torch-vs-Triton agreement under the
interpreter."""
import hashlib

import pytest
import torch
from torch import nn

from diffit.augment import AugmentPipe
from diffit.diffusion.edm import EDMLoss, EDMPrecond, heun_sampler
from diffit.layers import timestep_embedding
from diffit.unet import PRESETS, DiffiTUNet, DiffiTUNetConfig, count_parameters


def _randomize_head(model: DiffiTUNet) -> None:
    """The head is zero-initialised (F = 0 at init); tests that look through it need weights."""
    nn.init.normal_(model.head.weight, std=0.1)
    nn.init.normal_(model.head.bias, std=0.1)


@pytest.mark.parametrize("preset", ["tiny", "cifar10", "ffhq64"])
def test_preset_shapes_and_summary(preset, capsys):
    model = DiffiTUNet.from_preset(preset, backend="torch").eval()
    cfg = model.config
    text = model.summary()
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in capsys.readouterr().out and "total parameters" in text
    assert model.num_parameters() == total == count_parameters(model)
    # the per-part rows add up to the total, so the summary cannot leave a module out
    parts = [int(line.rsplit(None, 1)[1].replace(",", "")) for line in text.splitlines()[1:-1]]
    assert sum(parts) == total

    S = cfg.image_size
    x = torch.randn(2, cfg.in_channels, S, S)
    _randomize_head(model)
    with torch.no_grad():
        out = model(x, torch.randn(2))
    assert out.shape == (2, cfg.in_channels, S, S)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_presets_follow_the_paper():
    c, f = PRESETS["cifar10"], PRESETS["ffhq64"]
    assert c.resolutions() == [32, 16, 8] and c.window_size == 4 and c.heun_steps == 18
    assert f.resolutions() == [64, 32, 16, 8] and f.channels == (128, 256, 256, 256)
    assert f.window_size == 8 and f.heun_steps == 40
    assert c.time_embed_dim == f.time_embed_dim == 512
    # EDM's augmentation labels (the probability is a training setting: EDMLoss(augment=p))
    assert c.augment_dim == f.augment_dim == AugmentPipe(0.12).label_dim == 9
    assert PRESETS["tiny"].augment_dim == 0


@pytest.mark.parametrize("preset", ["tiny", "cifar10", "ffhq64"])
def test_forward_backward(preset):
    """Every parameter gets a finite, non-zero gradient from the EDM loss (torch backend), with
    augmentation where the preset is conditioned on it."""
    model = DiffiTUNet.from_preset(preset, backend="torch").train()
    _randomize_head(model)
    cfg = model.config
    images = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size) * 0.5
    edm = EDMLoss(augment=AugmentPipe(1.0) if cfg.augment_dim else None)
    loss = edm(EDMPrecond(model), images, generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# state dicts of the presets without augmentation conditioning, recorded before augment_dim
# existed: (keys, parameters, sha256 of "key:shape;..." in state-dict order)
_OLD_STATE = {"tiny": (82, 78_813, "971872682bfe125f"),
              "cifar10": (216, 18_826_283, "dcd62f955b7633e3"),
              "ffhq64": (286, 27_241_659, "de19d4bcb7feabc9")}


def _fingerprint(model):
    sd = model.state_dict()
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    return len(sd), model.num_parameters(), hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("preset", ["tiny", "cifar10", "ffhq64"])
def test_augment_dim_zero_keeps_the_old_state_dict(preset):
    """augment_dim=0 has exactly the parameter set of before (old checkpoints load strictly);
    augment_dim=A adds one bias-free [time_freq_dim, A] weight and nothing else."""
    old = DiffiTUNet.from_preset(preset, backend="torch", augment_dim=0)
    assert _fingerprint(old) == _OLD_STATE[preset]
    aug = DiffiTUNet.from_preset(preset, backend="torch", augment_dim=9)
    F = aug.config.time_freq_dim
    assert aug.aug_embedder.bias is None and aug.aug_embedder.weight.shape == (F, 9)
    assert set(aug.state_dict()) - set(old.state_dict()) == {"aug_embedder.weight"}
    assert aug.num_parameters() == old.num_parameters() + 9 * F
    assert "augment embedding" in aug.summary(print_fn=None)


def test_augment_labels_none_equals_zeros_and_old_weights_carry_over():
    tiny = dict(backend="torch")
    old = DiffiTUNet.from_preset("tiny", **tiny).eval()
    _randomize_head(old)
    aug = DiffiTUNet.from_preset("tiny", augment_dim=5, **tiny).eval()
    missing, unexpected = aug.load_state_dict(old.state_dict(), strict=False)
    assert missing == ["aug_embedder.weight"] and unexpected == []
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, -0.5, 1.0])
    with torch.no_grad():
        ref = old(x, t)
        none = aug(x, t)
        zeros = aug(x, t, augment_labels=torch.zeros(3, 5))
        some = aug(x, t, augment_labels=torch.randn(3, 5))
    assert torch.equal(none, zeros)
    assert torch.equal(none, ref)              # zero labels add exactly nothing
    assert (some - none).abs().amax((1, 2, 3)).min() > 1e-4
    # EDM's placement: the labels' projection joins the noise features before the time MLP
    a = torch.randn(3, 5)
    f = timestep_embedding(t, aug.config.time_freq_dim)
    torch.testing.assert_close(aug._time_token(t, a),
                               aug.t_embedder.mlp(f + a @ aug.aug_embedder.weight.T))
    with pytest.raises(ValueError, match=r"augment_labels must be .*\[B=3, augment_dim=5\]"):
        aug(x, t, augment_labels=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"augment_labels must be .*dtype torch.int64"):
        aug(x, t, augment_labels=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="augment_dim=0"):
        old(x, t, augment_labels=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="augment_dim"):
        DiffiTUNet.from_preset("tiny", augment_dim=-1)


def test_augment_embedding_gets_gradients():
    """Augmented training reaches the augmentation weights (every label slot's column) and the
    time MLP through them; without labels the weight still gets a (zero) gradient, as DDP needs."""
    model = DiffiTUNet.from_preset("tiny", backend="torch", augment_dim=9).train()
    _randomize_head(model)
    images = torch.randn(8, 1, 8, 8) * 0.5
    g = torch.Generator().manual_seed(1)
    EDMLoss(augment=1.0)(EDMPrecond(model), images, generator=g).mean().backward()
    grad = model.aug_embedder.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(0) > 0).all()         # each of the 9 label slots was used
    model.zero_grad(set_to_none=True)
    EDMLoss()(EDMPrecond(model), images, generator=g).mean().backward()
    assert model.aug_embedder.weight.grad is not None
    assert not model.aug_embedder.weight.grad.any()
    assert model.t_embedder.mlp[0].weight.grad.abs().sum() > 0


def test_zero_head_gives_c_skip_denoiser():
    """At initialisation F = 0, so EDM's D(x; sigma) is exactly c_skip x."""
    model = DiffiTUNet.from_preset("tiny", backend="torch")
    pre = EDMPrecond(model)
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.1, 3.0])
    c_skip = pre.coefficients(sigma.view(-1, 1, 1, 1))[0]
    torch.testing.assert_close(pre(x, sigma), c_skip * x)


def test_channels_last_matches_contiguous():
    """channels_last memory makes the NCHW <-> token reshapes views; the result is the same."""
    model = DiffiTUNet.from_preset("tiny", backend="torch").eval()
    _randomize_head(model)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.3, -0.7])
    with torch.no_grad():
        ref = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_class_conditioning():
    model = DiffiTUNet.from_preset("tiny", backend="torch", num_classes=3,
                                   class_dropout_prob=0.5).eval()
    _randomize_head(model)
    assert model.y_embedder.num_embeddings == 4  # 3 classes + the null class
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with torch.no_grad():
        uncond = model(x, t)
        null = model(x, t, torch.tensor([3, 3]))
        cond = model(x, t, torch.tensor([0, 1]))
    torch.testing.assert_close(uncond, null)
    assert not torch.allclose(cond, uncond)
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        DiffiTUNet.from_preset("tiny", backend="torch")(x, t, torch.tensor([0, 1]))
    # training drops labels to the null class: with p = 0.5, some of 64 samples are dropped
    model.train()
    labels = model._labels(torch.zeros(64, dtype=torch.long), 64, x.device)
    assert (labels == 3).any() and (labels == 0).any()


@pytest.mark.parametrize("preset, window, level", [("tiny", 3, 0), ("cifar10", 16, 2),
                                                   ("ffhq64", 16, 3)])
def test_window_not_dividing_grid_fails_at_construction(preset, window, level):
    with pytest.raises(ValueError, match=rf"level {level}: .* window_size={window}"):
        DiffiTUNet.from_preset(preset, window_size=window)


def test_bad_inputs_fail_at_forward():
    model = DiffiTUNet.from_preset("tiny", backend="torch")
    t = torch.zeros(2)
    # 12x12: level 0 has 3x3 windows, but level 1's 6x6 grid is not divisible by 4
    with pytest.raises(ValueError, match=r"level 1 would have a 6x6 token grid.*window_size=4"):
        model(torch.randn(2, 1, 12, 12), t)
    with pytest.raises(ValueError, match=r"level 0 would have a 8x10 token grid"):
        model(torch.randn(2, 1, 8, 10), t)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match="sigma_or_t"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(3))
    # other multiples of 8 work: the model is not tied to its training resolution
    assert model(torch.randn(1, 1, 16, 8), 0.0).shape == (1, 1, 16, 8)


def test_config_checks():
    with pytest.raises(ValueError, match="head_dim"):
        DiffiTUNet(DiffiTUNetConfig(image_size=8, channels=(24,), head_dim=16, window_size=4))
    with pytest.raises(ValueError, match="norm_groups"):
        DiffiTUNet(DiffiTUNetConfig(image_size=8, channels=(16,), head_dim=8, norm_groups=32,
                                    window_size=4))
    with pytest.raises(ValueError, match="image_size"):
        DiffiTUNet(DiffiTUNetConfig(image_size=10, channels=(16, 16, 16), head_dim=8,
                                    norm_groups=8, window_size=1))
    with pytest.raises(ValueError, match="unknown preset"):
        DiffiTUNet.from_preset("imagenet")


def test_edm_sampling_with_the_tiny_model():
    model = DiffiTUNet.from_preset("tiny", backend="torch").eval()
    _randomize_head(model)
    noise = torch.randn(2, 1, 8, 8)
    x = heun_sampler(EDMPrecond(model), noise, num_steps=4)
    assert x.shape == noise.shape and torch.isfinite(x).all()


# ---- backends -------------------------------------------------------------------------------
@pytest.mark.interpreter
@pytest.mark.parametrize("head_dim", [16, 8], ids=["d16", "d8-tiny-preset"])
def test_backends_agree_tiny(head_dim):
    """Same weights, backend="triton" (kernels under the interpreter) vs "torch" (reference):
    the output and every parameter's gradient agree. 8x8 images, window 4: level 0 runs 2x2
    windows of 16 tokens through the kernel's windowing, level 1 one global 4x4 window. Head
    dim 8 is the tiny preset's (the digits demo's model), padded to a 16-wide chunk in-kernel."""
    cfg = dict(image_size=8, in_channels=1, channels=(16, 32), num_res_blocks=1, window_size=4,
               head_dim=head_dim, norm_groups=8, time_embed_dim=32, time_freq_dim=16,
               num_classes=2)
    ref = DiffiTUNet(DiffiTUNetConfig(**cfg, backend="torch"))
    _randomize_head(ref)
    tri = DiffiTUNet(DiffiTUNetConfig(**cfg, backend="triton"))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.4, -1.1])
    y = torch.tensor([1, 2])
    outs = []
    for m in (ref, tri):
        out = m(x, t, y)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for (name, pr), (_, pt) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(pt.grad, pr.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["ffhq64", "cifar10"])
def test_gpu_preset_bf16_autocast_matches_eager(preset):
    """The preset's widths and windows (ffhq64: 8x8 windows of 64 tokens, cifar10: 4x4 windows
    of 16) on CUDA, fp32 weights under bf16 autocast as in training, one ResBlock per level:
    the Triton backend's output and every parameter gradient within the numerics rule against
    fp32 eager, with eager bf16 autocast as the yardstick (DESIGN.md section 5)."""
    from diffit_kernels.testing import assert_parity, model_rows

    torch.manual_seed(0)
    base = DiffiTUNet.from_preset(preset, num_res_blocks=1, backend="torch")
    _randomize_head(base)
    size = base.config.image_size
    x = torch.randn(2, 3, size, size, device="cuda")
    sigma = torch.tensor([0.3, 12.0], device="cuda")
    dy = torch.randn_like(x)

    def run(backend, amp):
        m = DiffiTUNet.from_preset(preset, num_res_blocks=1, backend=backend).cuda()
        m.load_state_dict(base.state_dict())
        # train mode with the presets' dropout, drawn alike in the three runs: with a draw of
        # its own each run compared different networks, and the eager bf16 yardstick then
        # measured the dropout difference instead of rounding
        torch.cuda.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            o = m(x, sigma)
        o.float().backward(dy)
        return o.detach().float(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    rows = model_rows(torch.bfloat16, run("triton", True), run("torch", False),
                      run("torch", True))
    assert_parity(rows)
