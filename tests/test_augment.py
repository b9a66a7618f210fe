"""Non-leaking geometric augmentation (diffit.augment): identity at p = 0, exact integer ops, the
documented label layout (checked by rebuilding each transform from its label independently of the
module), value-range preservation, determinism, dtypes and memory formats."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffit.augment import EDM_CIFAR10, TRANSFORMS, AugmentPipe

ALL_ON = dict(xflip=1.0, yflip=1.0, rotate90=1.0, translate_int=1.0, scale=1.0, rotate=1.0,
              aniso=1.0, translate=1.0)
INTEGER_ONLY = dict(xflip=1.0, yflip=1.0, rotate90=1.0, translate_int=1.0, scale=0.0, rotate=0.0,
                    aniso=0.0, translate=0.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _smooth(B, C, H, W, seed=0, lo=0.2, hi=0.9):
    """Smooth images with values in [lo, hi] (a bilinearly upsampled coarse field)."""
    g = _gen(seed)
    coarse = torch.rand(B, C, max(H // 4, 2), max(W // 4, 2), generator=g)
    x = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=True)
    return lo + (hi - lo) * x


# ---- independent reading of the documented label layout --------------------------------------
def _matrix_from_labels(names, lab, H, W):
    """G (source -> output, pixel-centre coordinates) for one image, built in float64 from the
    slot names and the module docstring's table, without the module's own code."""
    v = dict(zip(names, lab.double().tolist()))

    def rot(a):
        return torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0],
                             [0, 0, 1]], dtype=torch.float64)

    def diag(sx, sy):
        return torch.diag(torch.tensor([sx, sy, 1.0], dtype=torch.float64))

    def shift(tx, ty):
        M = torch.eye(3, dtype=torch.float64)
        M[0, 2], M[1, 2] = tx, ty
        return M

    G = torch.eye(3, dtype=torch.float64)
    if "xflip" in v:
        G = diag(1 - 2 * v["xflip"], 1) @ G
    if "yflip" in v:
        G = diag(1, 1 - 2 * v["yflip"]) @ G
    if "rotate90_sin" in v:
        k = round(math.atan2(v["rotate90_sin"], 1 + v["rotate90_cos_m1"]) / (math.pi / 2))
        G = rot(k * math.pi / 2) @ G
    if "translate_int_x" in v:
        G = shift(round(v["translate_int_x"] * W), round(v["translate_int_y"] * H)) @ G
    if "scale_log2" in v:
        G = diag(2 ** v["scale_log2"], 2 ** v["scale_log2"]) @ G
    if "rotate_sin" in v:
        G = rot(math.atan2(v["rotate_sin"], 1 + v["rotate_cos_m1"])) @ G
    if "aniso_cos2phi" in v:
        a, b = v["aniso_cos2phi"], v["aniso_sin2phi"]
        lg, phi = math.hypot(a, b), math.atan2(b, a) / 2
        G = rot(phi) @ diag(2 ** lg, 2 ** -lg) @ rot(-phi) @ G
    if "translate_x" in v:
        G = shift(v["translate_x"] * W, v["translate_y"] * H) @ G
    return G


def _warp_reference(x, G, mode):
    """out(q) = x(G^-1 q) with symmetric padding, from an explicit per-pixel grid."""
    C, H, W = x.shape
    Gi = torch.linalg.inv(G)
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                          torch.arange(W, dtype=torch.float64), indexing="ij")
    q = torch.stack([j + 0.5 - W / 2, i + 0.5 - H / 2, torch.ones_like(i)], -1)   # [H, W, 3]
    p = q @ Gi.T
    grid = torch.stack([2 * p[..., 0] / W, 2 * p[..., 1] / H], -1)[None]          # [1, H, W, 2]
    return F.grid_sample(x[None].double(), grid, mode=mode, padding_mode="reflection",
                         align_corners=False)[0].to(x.dtype)


def _reflect(idx, n):
    """Symmetric reflection of integer indices into [0, n): -1 -> 0, n -> n - 1."""
    idx = idx % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


# ---- tests ------------------------------------------------------------------------------------
def test_label_layout():
    pipe = AugmentPipe(0.12)
    assert pipe.enabled == ("xflip", "yflip", "scale", "rotate", "aniso", "translate")
    assert pipe.label_dim == 9 and pipe.label_names == (
        "xflip", "yflip", "scale_log2", "rotate_cos_m1", "rotate_sin", "aniso_cos2phi",
        "aniso_sin2phi", "translate_x", "translate_y")
    assert {k for k, w in EDM_CIFAR10.items() if w > 0} == set(pipe.enabled)
    full = AugmentPipe(0.5, **ALL_ON)
    assert full.enabled == tuple(TRANSFORMS) and full.label_dim == 13
    assert AugmentPipe(0.5, **INTEGER_ONLY).label_dim == 6
    assert pipe.probability("xflip") == 1.0 and pipe.probability("scale") == pytest.approx(0.12)


@pytest.mark.parametrize("weights", [{}, ALL_ON], ids=["edm", "all"])
def test_p0_is_identity_with_zero_labels(weights):
    x = torch.randn(5, 3, 8, 8)
    pipe = AugmentPipe(0.0, **weights)
    out, labels = pipe(x, generator=_gen(0))
    assert out is x
    assert labels.shape == (5, pipe.label_dim) and labels.dtype == torch.float32
    assert not labels.any()
    # zero labels describe the identity: applying them copies the images bit for bit
    assert torch.equal(pipe.apply(x, labels), x)


def test_p1_flips_are_exact_and_labelled():
    pipe = AugmentPipe(1.0, xflip=1.0, yflip=1.0, scale=0, rotate=0, aniso=0, translate=0)
    x = torch.randn(64, 2, 6, 10)
    out, labels = pipe(x, generator=_gen(1))
    assert pipe.label_names == ("xflip", "yflip")
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    for b in range(64):
        want = x[b]
        if labels[b, 0] == 1:
            want = want.flip(-1)
        if labels[b, 1] == 1:
            want = want.flip(-2)
        assert torch.equal(out[b], want), b
    # with p = 1 each flip happens to about half of the images
    assert 10 < labels[:, 0].sum() < 54 and 10 < labels[:, 1].sum() < 54


def test_integer_transforms_are_exact():
    """Flips, quarter turns and whole-pixel shifts copy values (no interpolation), matching an
    index-level implementation with symmetric padding; k = 1 is torch.rot90(x, -1)."""
    H = W = 8
    pipe = AugmentPipe(1.0, translate_int_max=0.4, **INTEGER_ONLY)
    x = torch.randn(48, 3, H, W)
    out, labels = pipe(x, generator=_gen(2))
    assert bool(pipe.exact(labels).all())
    lab = dict(zip(pipe.label_names, labels.T))
    shifts = torch.stack([lab["translate_int_x"] * W, lab["translate_int_y"] * H], 1)
    assert torch.equal(shifts, shifts.round()) and shifts.abs().max() >= 2
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for b in range(48):
        # doubled pixel-centre coordinates stay integers: U = 2j + 1 - W
        U, V = 2 * jj + 1 - W, 2 * ii + 1 - H
        tx, ty = (int(s) for s in shifts[b].round().tolist())
        U, V = U - 2 * tx, V - 2 * ty
        k = round(math.atan2(lab["rotate90_sin"][b], 1 + lab["rotate90_cos_m1"][b]) / (math.pi / 2))
        for _ in range(k % 4):                 # undo R(pi/2): (u, v) -> (v, -u)
            U, V = V, -U
        if lab["yflip"][b]:
            V = -V
        if lab["xflip"][b]:
            U = -U
        src_j, src_i = _reflect((U + W - 1) // 2, W), _reflect((V + H - 1) // 2, H)
        assert torch.equal(out[b], x[b][:, src_i, src_j]), b
        if tx == ty == 0 and not lab["xflip"][b] and not lab["yflip"][b]:
            assert torch.equal(out[b], torch.rot90(x[b], -k, dims=(-2, -1))), b
    assert {round(math.atan2(s, 1 + c) / (math.pi / 2)) % 4 for c, s in
            zip(lab["rotate90_cos_m1"].tolist(), lab["rotate90_sin"].tolist())} == {0, 1, 2, 3}


@pytest.mark.parametrize("H, W", [(16, 16), (8, 16)], ids=["square", "wide"])
def test_labels_determine_the_transform(H, W):
    """Rebuilding each image's map from its label (independent code, float64, explicit grid)
    reproduces the output; the module's own apply(x, labels) reproduces it bit for bit."""
    pipe = AugmentPipe(1.0, translate_int_max=0.2, **{**ALL_ON, "rotate90": float(H == W)})
    x = _smooth(12, 3, H, W, seed=3)
    out, labels = pipe(x, generator=_gen(4))
    assert not pipe.exact(labels).any()          # p = 1: every continuous transform drawn
    for b in range(12):
        G = _matrix_from_labels(pipe.label_names, labels[b], H, W)
        want = _warp_reference(x[b], G, "bilinear")
        torch.testing.assert_close(out[b], want, rtol=0, atol=2e-5, msg=f"image {b}")
    assert torch.equal(pipe.apply(x, labels), out)
    # and the map is a real one: the output differs from the input
    assert (out - x).abs().amax((1, 2, 3)).min() > 1e-2


def test_geometry_preserves_the_value_range():
    """Bilinear interpolation of reflected pixels is a convex combination of input pixels, so each
    image keeps its range (no zeros from padding) and, roughly, its statistics."""
    x = _smooth(64, 3, 16, 16, seed=5)
    out, labels = AugmentPipe(1.0, translate_int_max=0.2, **ALL_ON)(x, generator=_gen(6))
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    assert bool(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())
    assert abs(out.mean().item() - x.mean().item()) < 0.02
    assert 0.8 < out.std().item() / x.std().item() < 1.05


def test_probabilities_follow_p():
    B, p = 4000, 0.25
    pipe = AugmentPipe(p, **ALL_ON)
    labels = pipe.sample_labels(B, 16, 16, generator=_gen(7))
    drawn = {k: (labels[:, pipe.slots[k]] != 0).any(1).double().mean().item() for k in TRANSFORMS}
    # flips are drawn with probability p and then flip half the time; a quarter turn 3/4 of it;
    # a U(-2, 2) px shift (0.125 of 16) rounds to zero with probability 1/4 per axis
    want = dict(xflip=p / 2, yflip=p / 2, rotate90=3 * p / 4, translate_int=p * 15 / 16,
                scale=p, rotate=p, aniso=p, translate=p)
    for k, w in want.items():
        assert abs(drawn[k] - w) < 5 * math.sqrt(w * (1 - w) / B), (k, drawn[k], w)
    # the default x-flip weight draws every image: a random flip on half of them
    edm = AugmentPipe(0.12).sample_labels(B, 4, 4, generator=_gen(8))
    assert abs(edm[:, 0].mean().item() - 0.5) < 5 * 0.5 / math.sqrt(B)


def test_deterministic_under_a_generator():
    x = torch.randn(8, 3, 8, 8)
    pipe = AugmentPipe(0.5, **ALL_ON)
    a, la = pipe(x, generator=_gen(9))
    b, lb = pipe(x, generator=_gen(9))
    c, lc = pipe(x, generator=_gen(10))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)
    # the stream does not depend on p: what p = 1 draws is a superset of what p = 0.5 draws
    l1 = AugmentPipe(1.0, **ALL_ON).sample_labels(8, 8, 8, generator=_gen(9))
    torch.testing.assert_close(torch.where(la != 0, l1, 0.0), la)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dtypes_and_memory_formats(dtype, channels_last):
    x = _smooth(6, 3, 8, 8, seed=11)
    pipe = AugmentPipe(1.0, **ALL_ON)
    ref, labels = pipe(x, generator=_gen(12))
    xi = x.to(dtype)
    if channels_last:
        xi = xi.to(memory_format=torch.channels_last)
    out, labels_i = pipe(xi, generator=_gen(12))
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(labels_i, labels)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol)


def test_bad_arguments():
    with pytest.raises(ValueError, match="p must be"):
        AugmentPipe(1.5)
    with pytest.raises(ValueError, match="weight scale"):
        AugmentPipe(0.1, scale=-1.0)
    with pytest.raises(ValueError, match="aniso_std"):
        AugmentPipe(0.1, aniso_std=float("inf"))
    pipe = AugmentPipe(0.5)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        pipe(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        pipe(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rotate90 needs square"):
        AugmentPipe(0.5, rotate90=1.0)(torch.randn(2, 1, 8, 16))
    with pytest.raises(ValueError, match=r"label_dim=9"):
        pipe.apply(torch.randn(2, 3, 8, 8), torch.zeros(2, 13))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x = _smooth(8, 3, 16, 16, seed=13)
    pipe = AugmentPipe(1.0, **ALL_ON)
    labels = pipe.sample_labels(8, 16, 16, generator=_gen(14))
    ref = pipe.apply(x, labels)
    out = pipe.apply(x.cuda(), labels.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-5)
    g = torch.Generator("cuda").manual_seed(0)
    a, la = pipe(x.cuda(), generator=g)
    assert a.is_cuda and la.is_cuda and la.shape == (8, 13)
