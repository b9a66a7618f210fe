"""diffit.training.data: the image-folder loader on a temporary folder of PNGs, latent files, the
digits, and the resumable sampler."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffit.training.data import (DigitsDataset, ImageFolderDataset, LatentDataset,
                                  ResumableSampler, build_dataset)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture
def folder(tmp_path):
    """cat/ (3 red images of mixed sizes), dog/ (2 blue images): 5 images, 2 classes."""
    root = tmp_path / "imgs"
    for i, (h, w) in enumerate([(12, 20), (20, 12), (8, 8)]):
        _png(root / "cat" / f"{i}.png", _solid(h, w, (255, 0, 0)))
    for i in range(2):
        _png(root / "dog" / f"{i}.png", _solid(10, 10, (0, 0, 255)))
    return root


def test_image_folder_labels_shapes_values(folder):
    ds = ImageFolderDataset(folder, image_size=8, channels=3, flip=False)
    assert len(ds) == 5 and ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert (ds.channels, ds.image_size) == (3, 8)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        want = torch.tensor([1.0, -1.0, -1.0] if y == 0 else [-1.0, -1.0, 1.0])
        torch.testing.assert_close(x, want.view(3, 1, 1).expand(3, 8, 8), atol=1 / 127.5, rtol=0)
        assert y == (0 if ds.files[i].parent.name == "cat" else 1)
    xb, yb = next(iter(DataLoader(ds, batch_size=5)))
    assert xb.shape == (5, 3, 8, 8) and sorted(yb.tolist()) == [0, 0, 0, 1, 1]


def test_image_folder_center_crop_and_grayscale(tmp_path):
    # 8 x 24: a white centre third between black sides; the centre crop keeps only the white
    arr = np.zeros((8, 24, 3), dtype=np.uint8)
    arr[:, 8:16] = 255
    _png(tmp_path / "a.png", arr)
    ds = ImageFolderDataset(tmp_path, image_size=8, channels=1, flip=False)
    assert ds.num_classes == 0 and ds.classes == []
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and y == 0
    torch.testing.assert_close(x, torch.ones(1, 8, 8))


def test_image_folder_flips_are_a_function_of_seed_epoch_index(tmp_path):
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, 0] = 255                                   # a white left column
    for i in range(16):
        _png(tmp_path / f"{i:02d}.png", arr)
    ds = ImageFolderDataset(tmp_path, image_size=8, flip=True, seed=3)

    def flips(epoch):
        ds.set_epoch(epoch)
        return [bool(ds[i][0][0, 0, -1] > 0) for i in range(len(ds))]   # white on the right

    e0, e1 = flips(0), flips(1)
    assert 0 < sum(e0) < len(ds)                     # some flipped, some not
    assert e0 != e1                                  # a new draw every epoch
    assert flips(0) == e0                            # and the same draw when repeated
    ds.set_epoch(0)
    for i in range(len(ds)):                         # a flip mirrors exactly
        row = ds[i][0][0, 0].tolist()
        assert row == ([-1.0] * 7 + [1.0] if e0[i] else [1.0] + [-1.0] * 7)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderDataset(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(tmp_path, 8)
    with pytest.raises(ValueError, match="bad.png"):
        ds[0]
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path, 8, channels=2)


def test_latent_files(tmp_path):
    lat = torch.randn(6, 4, 8, 8)
    lab = torch.tensor([0, 2, 1, 2, 0, 1])
    torch.save({"latents": lat.half(), "labels": lab}, tmp_path / "l.pt")
    ds = LatentDataset(tmp_path / "l.pt")
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (6, 4, 8, 3)
    x, y = ds[1]
    assert x.dtype == torch.float32 and torch.equal(x, lat[1].half().float()) and y == 2

    # the `sample --latents-only` layout: arr_0 latents, arr_1 labels (-1 = unconditional)
    np.savez(tmp_path / "s.npz", arr_0=lat.numpy(), arr_1=np.full(6, -1))
    ds = LatentDataset(tmp_path / "s.npz")
    assert ds.num_classes == 0 and ds[5][1] == 0 and torch.equal(ds[5][0], lat[5])

    torch.save(lat, tmp_path / "plain.pt")
    assert len(build_dataset("latents", str(tmp_path / "plain.pt"))) == 6

    torch.save(torch.randn(6, 4, 8), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        LatentDataset(tmp_path / "bad.pt")
    torch.save({"latents": lat, "labels": torch.arange(5)}, tmp_path / "badlab.pt")
    with pytest.raises(ValueError, match="labels"):
        LatentDataset(tmp_path / "badlab.pt")
    with pytest.raises(ValueError, match="does not exist"):
        LatentDataset(tmp_path / "nope.pt")


def test_digits():
    ds = DigitsDataset(image_size=8)
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (1797, 1, 8, 10)
    x = ds.images
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    up = DigitsDataset(image_size=16)
    assert up[0][0].shape == (1, 16, 16) and up[0][1] == ds[0][1]
    # upsampling keeps the picture: pooling the 16x16 back is close to the 8x8 original
    pooled = torch.nn.functional.avg_pool2d(up.images[:50], 2)
    assert (pooled - x[:50]).abs().mean() < 0.15
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataset(image_size=4)


def test_resumable_sampler_skips_and_shards():
    ds = DigitsDataset(image_size=8)
    s = ResumableSampler(ds, num_replicas=1, rank=0, seed=5)
    s.set_position(2, 0)
    full = list(s)
    assert sorted(full) == list(range(len(ds)))
    s.set_position(2, 100)
    assert list(s) == full[100:] and len(s) == len(ds) - 100
    s.set_position(3, 0)
    assert list(s) != full                            # reshuffled per epoch
    r0, r1 = (ResumableSampler(ds, 2, r, seed=5) for r in (0, 1))
    for r in (r0, r1):
        r.set_position(0, 0)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == 899 and set(a) | set(b) == set(range(len(ds)))
    with pytest.raises(ValueError, match="outside"):
        s.set_position(0, len(ds) + 1)
