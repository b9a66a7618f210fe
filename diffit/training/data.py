"""Training data: image folders, pre-encoded latents, scikit-learn's digits; a resumable sampler.

Every dataset yields `(x, label)` with x float32 [C, H, W] (images in [-1, 1], latents as stored)
and label an int (0 when the data has no classes) and exposes `channels`, `image_size`,
`num_classes` (0 = unlabelled) and `set_epoch(epoch)`.

Random horizontal flips are a function of (seed, epoch, index), not of a global generator: the
flip a sample gets does not depend on the number of loader workers, on which worker loads it, or
on whether training was interrupted and resumed, which is what makes `--resume` exact.

    ImageFolderDataset   PIL images under a folder (labels from first-level subfolders)
    LatentDataset        a [N, C, h, w] tensor file (+ labels), e.g. from `python -m diffit encode`
    DigitsDataset        scikit-learn's 1797 8x8 digits (installed with the package, no download)
    ResumableSampler     DistributedSampler that can start in the middle of an epoch
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DATA_KINDS = ("digits", "folder", "latents")


def _flip_bit(seed: int, epoch: int, index: int) -> bool:
    # one draw from a generator seeded by the triple: cheap, and identical in every process
    return random.Random((seed * 1_000_003 + epoch) * 1_000_003 + index).random() < 0.5


class _FlipMixin:
    flip: bool = False
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _maybe_flip(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.flip and _flip_bit(self.seed, self.epoch, index):
            return x.flip(-1)
        return x


# ---- image folders --------------------------------------------------------------------------
def _center_crop_resize(img, size: int):
    """Resize the short side to `size` (bicubic, antialiased), then crop the centre square."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolderDataset(_FlipMixin, Dataset):
    """Images under `root` (searched recursively), centre-cropped and resized to image_size.

    Labels: when every image lies inside a first-level subfolder, the sorted subfolder names are
    the classes (torchvision's ImageFolder layout); otherwise the data is unlabelled.
    channels: 3 reads RGB, 1 reads grayscale ("L"). flip: random horizontal flips.
    """

    def __init__(self, root: Union[str, os.PathLike], image_size: int, channels: int = 3,
                 flip: bool = True, seed: int = 0):
        try:
            import PIL  # noqa: F401
        except ImportError as e:
            raise ImportError("the image-folder dataset needs pillow (pip install pillow)") from e
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data_path {str(root)!r} is not a directory of images")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        files = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        rel = [p.relative_to(root) for p in files]
        if all(len(r.parts) > 1 for r in rel):
            self.classes = sorted({r.parts[0] for r in rel})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[r.parts[0]] for r in rel]
        else:
            self.classes, self.labels = [], [0] * len(files)
        self.files, self.root = files, root
        self.image_size, self.channels = int(image_size), channels
        self.num_classes = len(self.classes)
        self.flip, self.seed = bool(flip), int(seed)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        import numpy as np
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB" if self.channels == 3 else "L")
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        img = _center_crop_resize(img, self.image_size)
        arr = np.asarray(img, dtype=np.uint8).reshape(self.image_size, self.image_size, -1)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # [C, S, S]
        return self._maybe_flip(x, index), self.labels[index]


# ---- latents --------------------------------------------------------------------------------
def _load_latent_file(path: Path):
    """(latents [N, C, h, w], labels [N] or None) from .pt / .pth / .npz / .npy / .safetensors."""
    suffix = path.suffix.lower()
    labels = None
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"latent file {path} is not a readable torch file: {e}") from e
        if isinstance(obj, dict):
            if "latents" not in obj:
                raise ValueError(f"latent file {path} holds a dict without a 'latents' entry "
                                 f"(entries: {sorted(obj)})")
            lat, labels = obj["latents"], obj.get("labels")
        else:
            lat = obj
    elif suffix == ".npz":
        import numpy as np

        with np.load(path) as d:
            key = "latents" if "latents" in d.files else "arr_0"
            if key not in d.files:
                raise ValueError(f"latent file {path} has neither 'latents' nor 'arr_0' "
                                 f"(arrays: {d.files})")
            lat = torch.from_numpy(d[key])
            lab_key = "labels" if "labels" in d.files else ("arr_1" if "arr_1" in d.files
                                                             else None)
            labels = torch.from_numpy(d[lab_key]) if lab_key else None
    elif suffix == ".npy":
        import numpy as np

        lat = torch.from_numpy(np.load(path, mmap_mode="r").copy())
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(path))
        if "latents" not in d:
            raise ValueError(f"latent file {path} has no 'latents' tensor (has {sorted(d)})")
        lat, labels = d["latents"], d.get("labels")
    else:
        raise ValueError(f"latent file {path}: unknown suffix {suffix!r}; use .pt, .npz, .npy "
                         "or .safetensors")
    return lat, labels


class LatentDataset(_FlipMixin, Dataset):
    """Pre-encoded latents [N, C, h, w] (VAE latents already multiplied by the VAE's scale,
    0.18215 for SD's) with optional integer labels [N]. Negative labels (the `sample` command's
    unconditional marker) mean unlabelled. Flips are off by default: a flipped latent is only
    approximately the latent of the flipped image."""

    def __init__(self, path: Union[str, os.PathLike], flip: bool = False, seed: int = 0):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"latent file {str(path)!r} does not exist")
        lat, labels = _load_latent_file(path)
        if not isinstance(lat, torch.Tensor) or lat.dim() != 4 or not lat.is_floating_point():
            raise ValueError(f"latent file {path}: latents must be a float tensor [N, C, h, w], "
                             f"got {getattr(lat, 'dtype', type(lat))} of shape "
                             f"{tuple(getattr(lat, 'shape', ()))}")
        if lat.shape[-1] != lat.shape[-2]:
            raise ValueError(f"latent file {path}: latents must be square, got shape "
                             f"{tuple(lat.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.dim() != 1 or labels.shape[0] != lat.shape[0] or labels.is_floating_point():
                raise ValueError(f"latent file {path}: labels must be an integer tensor "
                                 f"[N={lat.shape[0]}], got {labels.dtype} of shape "
                                 f"{tuple(labels.shape)}")
            if bool((labels < 0).all()):
                labels = None
            elif bool((labels < 0).any()):
                raise ValueError(f"latent file {path}: some labels are negative")
        self.latents, self.path = lat, path
        self.labels = labels.long() if labels is not None else None
        self.channels, self.image_size = lat.shape[1], lat.shape[-1]
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else 0
        self.flip, self.seed = bool(flip), int(seed)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = self.latents[index].float()                                 # [C, h, w]
        y = int(self.labels[index]) if self.labels is not None else 0
        return self._maybe_flip(x, index), y


# ---- scikit-learn digits --------------------------------------------------------------------
class DigitsDataset(_FlipMixin, Dataset):
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels), 10 classes, scaled to
    [-1, 1] (ink bright on a -1 background) and bilinearly upsampled to image_size.

    Ships inside scikit-learn, so the demo and the tests need no download. Flips are off by
    default because a mirrored digit is not a digit.
    """

    def __init__(self, image_size: int = 16, flip: bool = False, seed: int = 0):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn)"
                              ) from e
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 for the 8x8 digits, got {image_size!r}")
        d = load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # [N,1,8,8]
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=False).clamp(-1, 1)
        self.images = x.contiguous()
        self.labels = torch.as_tensor(d.target, dtype=torch.long)
        self.channels, self.image_size, self.num_classes = 1, int(image_size), 10
        self.flip, self.seed = bool(flip), int(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self._maybe_flip(self.images[index], index), int(self.labels[index])


def build_dataset(kind: str, path: Optional[str] = None, *, image_size: Optional[int] = None,
                  channels: int = 3, flip: Optional[bool] = None, seed: int = 0) -> Dataset:
    """One of DATA_KINDS. image_size / channels apply to images (latents define their own);
    flip None = the kind's default (folders: on, digits and latents: off)."""
    if kind == "digits":
        return DigitsDataset(image_size or 16, flip=bool(flip), seed=seed)
    if kind == "folder":
        if not path:
            raise ValueError("data 'folder' needs data_path (a directory of images)")
        if not image_size:
            raise ValueError("data 'folder' needs image_size")
        return ImageFolderDataset(path, image_size, channels, flip=True if flip is None else flip,
                                  seed=seed)
    if kind == "latents":
        if not path:
            raise ValueError("data 'latents' needs data_path (a [N, C, h, w] tensor file, e.g. "
                             "written by `python -m diffit encode`)")
        return LatentDataset(path, flip=bool(flip), seed=seed)
    raise ValueError(f"data must be one of {DATA_KINDS}, got {kind!r}")


# ---- sampling order -------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (same shuffling from seed + epoch, same per-rank shards) that
    can skip the first `start` indices of its epoch, so a resumed run sees exactly the batches an
    uninterrupted run would have seen next."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"sampler start {start} outside this rank's epoch of "
                             f"{self.num_samples} samples")
        self.set_epoch(epoch)
        self.start = int(start)

    def __iter__(self):
        indices: List[int] = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def describe(ds: Dataset) -> str:
    labels = f"{ds.num_classes} classes" if ds.num_classes else "unlabelled"
    return (f"{type(ds).__name__}: {len(ds)} items of {ds.channels}x{ds.image_size}x"
            f"{ds.image_size}, {labels}")


__all__: Sequence[str] = ["DATA_KINDS", "DigitsDataset", "ImageFolderDataset", "LatentDataset",
                          "ResumableSampler", "build_dataset", "describe"]
