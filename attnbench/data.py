"""Datasets as whole uint8 tensors on the training device, with batched augmentation there.

A CIFAR split is small enough (150 MB for 50,000 images) to live on the GPU as one tensor, so
batches are cut, cropped, flipped and normalised where the model runs, with no worker
processes and no PIL. Batch order and augmentation come from a generator seeded by
(seed, epoch) alone, so a run resumed at any epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attnbench.errors import UserError, first_line

DATASETS = ("cifar10", "cifar100", "synthetic")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
_PAD = 4  # the papers' RandomCrop(32, padding=4)
SYNTHETIC_MAX = 50_000  # training images the synthetic set makes at most: CIFAR's count


@dataclass(frozen=True)
class _Release:
    """The official python release of a CIFAR dataset, with torchvision's md5 sums."""

    title: str
    folder: str
    url: str
    archive_md5: str
    train: dict[str, str]  # file name -> md5
    test: dict[str, str]
    label_key: bytes
    num_classes: int


_RELEASES = {
    "cifar10": _Release(
        "CIFAR-10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"},
        {"test_batch": "40351d587109b95175f43aff81a1287e"}, b"labels", 10),
    "cifar100": _Release(
        "CIFAR-100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        {"train": "16019d7e3df5f24257cddd939b257f8d"}, {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        b"fine_labels", 100),
}


@dataclass
class Splits:
    name: str
    num_classes: int
    train_images: Tensor  # uint8 (N, 3, 32, 32) on the device
    train_labels: Tensor  # int64 (N,)
    eval_images: Tensor  # the test set, or the held-out part of the training set when eval_name is "val"
    eval_labels: Tensor
    eval_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches without letting a planted file run code: a pickle can import and
    call any function, so only the names that rebuild a numpy array are allowed."""

    _reconstruct = np.ndarray.__reduce__(np.empty(0))[0]  # lives in numpy.core or numpy._core
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data), encoding="bytes")  # python 2 pickles of latin1 str
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise UserError(f"refusing to load {self.path}: it imports {module}.{name}, "
                            "which a CIFAR file never needs")
        return self.ALLOWED[(module, name)]


def load_dataset(name: str, data_dir: str | Path, *, download: bool = False, val_split: int = 0,
                 seed: int = 0, device: str | torch.device = "cpu", size: int | None = None) -> Splits:
    """Load a dataset onto `device`. `size` keeps the first `size` training images (for
    synthetic: generates that many); `val_split` then holds out that many of them, chosen by
    `seed`, as the evaluation set, so tuning never looks at the test set."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; available: {', '.join(DATASETS)}")
    if size is not None and size < 1:
        raise UserError(f"--train-size must be at least 1, got {size}")
    if name == "synthetic":
        if size is not None and size > SYNTHETIC_MAX:
            raise UserError(f"--train-size {size}: the synthetic set makes at most {SYNTHETIC_MAX:,} training "
                            "images, as many as CIFAR's")
        (train_x, train_y), test = _synthetic(size or 5000, stream=0), _synthetic(1000, stream=1)
        num_classes = 10
    else:
        release = _RELEASES[name]
        (train_x, train_y), test = _read_release(release, Path(data_dir).expanduser(), download)
        num_classes = release.num_classes
        if size is not None:
            if size > len(train_x):
                raise UserError(f"--train-size {size} is more than the {len(train_x)} training images of {name}")
            train_x, train_y = train_x[:size], train_y[:size]
    eval_name, (eval_x, eval_y) = "test", test
    if val_split:
        if not 0 < val_split < len(train_x):
            raise UserError(f"--val-split must be between 1 and {len(train_x) - 1} "
                            f"(there are {len(train_x)} training images), got {val_split}")
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        held, kept = order[:val_split], order[val_split:].sort().values
        eval_name, eval_x, eval_y = "val", train_x[held], train_y[held]
        train_x, train_y = train_x[kept], train_y[kept]
    if name == "synthetic":
        pixels = train_x.transpose(0, 1).reshape(3, -1).double() / 255
        mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
    else:
        mean, std = CIFAR_MEAN, CIFAR_STD
    return Splits(name, num_classes, train_x.to(device), train_y.to(device), eval_x.to(device),
                  eval_y.to(device), eval_name, mean, std)


def _read_release(release: _Release, data_dir: Path, download: bool) -> tuple[tuple[Tensor, Tensor], ...]:
    folder = data_dir / release.folder
    files = {**release.train, **release.test}
    complete = all((folder / f).is_file() for f in files)
    if not complete and data_dir.resolve().name == release.folder and any((data_dir / f).is_file() for f in files):
        raise UserError(f"--data-dir {data_dir} is the {release.folder}/ folder itself; pass the folder holding it, "
                        f"--data-dir {data_dir.resolve().parent}")
    if download and not complete:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(release.url, str(data_dir), md5=release.archive_md5)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"downloading {release.url} into {data_dir} failed: {first_line(exc)}") from exc
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"no {release.title} data at {folder} (missing {', '.join(missing)}); "
                        f"pass --download to fetch it, or --data-dir to the folder holding {release.folder}/")
    differing: list[str] = []
    splits = []
    for part in (release.train, release.test):
        batches = [_read_batch(folder / f, md5, release, differing) for f, md5 in part.items()]
        splits.append((torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])))
    if differing:
        print(f"notice: {folder} is not the official {release.title} release ({', '.join(differing)} "
              "differ from it); loading it as a custom subset", file=sys.stderr)
    return tuple(splits)


def _read_batch(path: Path, md5: str, release: _Release, differing: list[str]) -> tuple[Tensor, Tensor]:
    """Read one pickled batch, noting in `differing` when it is not the official file."""
    raw = path.read_bytes()
    if hashlib.md5(raw).hexdigest() != md5:
        differing.append(path.name)
    try:
        batch = _NumpyOnlyUnpickler(raw, path).load()
    except UserError:
        raise
    except Exception as exc:  # pickle signals damage with many types: EOFError, UnpicklingError, ...
        raise UserError(f"{path} is truncated or corrupt ({first_line(exc)}); "
                        "delete it and pass --download, or fix --data-dir") from exc
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = np.asarray(batch.get(release.label_key) if isinstance(batch, dict) else None)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32 and labels.ndim == 1 and labels.dtype.kind in "iu"
            and len(labels) == len(data)):
        raise UserError(f"{path} is not a {release.title} batch: expected a dict with b'data' (uint8, "
                        f"N x 3072) and {release.label_key!r} (N integer labels)")
    if len(labels) and not 0 <= labels.min() <= labels.max() < release.num_classes:
        raise UserError(f"{path} has labels outside 0..{release.num_classes - 1}")
    labels = torch.from_numpy(labels.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32), labels


_SYNTHETIC_CYCLES = (1.5, 2.5, 4.0, 6.5, 10.0)  # grating cycles per 32 pixels, one per class pair


def _synthetic(n: int, stream: int) -> tuple[Tensor, Tensor]:
    """Gratings whose class is (horizontal or vertical) x frequency: a crop only shifts their
    phase and a flip keeps both, so the labels survive augmentation. Every class draws its
    background colour, grating colour, contrast and noise from the same distributions and the
    grating is zero-mean, so an image's mean colour says nothing about its class."""
    g = torch.Generator().manual_seed(20240601 + stream)  # fixed: the dataset never varies
    labels = torch.randperm(n, generator=g) % 10
    cycles = torch.tensor(_SYNTHETIC_CYCLES)[labels % 5]
    phase = torch.rand(n, generator=g) * 2 * math.pi
    coord = torch.arange(32, dtype=torch.float32)
    wave = torch.sin(2 * math.pi * cycles[:, None] * coord / 32 + phase[:, None])  # (n, 32)
    wave = wave - wave.mean(1, keepdim=True)
    vertical = (labels >= 5)[:, None, None]
    pattern = torch.where(vertical, wave[:, None, :], wave[:, :, None])  # (n, 32, 32)
    background = 60 + 136 * torch.rand(n, 3, generator=g)
    tint = F.normalize(torch.randn(n, 3, generator=g), dim=1) * (20 + 40 * torch.rand(n, 1, generator=g))
    images = background[:, :, None, None] + tint[:, :, None, None] * pattern[:, None]
    images += 12 * torch.randn(n, 3, 32, 32, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


def _normaliser(splits: Splits, device: torch.device) -> tuple[Tensor, Tensor]:
    """Scale and shift turning uint8 pixels into (x/255 - mean)/std with one multiply-add."""
    std = torch.tensor(splits.std).view(1, 3, 1, 1)
    mean = torch.tensor(splits.mean).view(1, 3, 1, 1)
    return (1 / (255 * std)).to(device), (-mean / std).to(device)


def _normalise(x: Tensor, scale: Tensor, shift: Tensor, channels_last: bool) -> Tensor:
    out = x.float().mul_(scale).add_(shift)  # reordering after the float math measured faster than before
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _crop_and_flip(x: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
    """Crop every image of the batch at its own offset in the zero-padded image, mirrored where
    asked, with one gather: measured faster on CPU than indexing rows and columns, unfold or
    grouping images by offset."""
    n, size = len(x), x.shape[-1]
    wide = size + 2 * _PAD
    padded = F.pad(x, (_PAD, _PAD, _PAD, _PAD)).view(n, 3, wide * wide)
    ar = torch.arange(size, device=x.device)
    rows = offsets[:, :1] + ar
    cols = offsets[:, 1:] + torch.where(flips[:, None], size - 1 - ar, ar)
    index = (rows[:, :, None] * wide + cols[:, None, :]).view(n, 1, size * size).expand(n, 3, -1)
    return padded.gather(2, index).view(n, 3, size, size)


def train_batches(splits: Splits, batch_size: int, epoch: int, seed: int, *, augment: bool = True,
                  channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled, augmented, normalised batches, the last one possibly smaller.
    Everything random is drawn up front on the CPU from (seed, epoch), so the batches are the
    same on any device and for a run resumed at this epoch."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()  # unrelated streams for nearby pairs
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    n, device = len(splits.train_images), splits.train_images.device
    scale, shift = _normaliser(splits, device)
    order = torch.randperm(n, generator=g).to(device)
    if augment:
        offsets = torch.randint(0, 2 * _PAD + 1, (n, 2), generator=g).to(device)
        flips = torch.randint(0, 2, (n,), generator=g).bool().to(device)
    for start in range(0, n, batch_size):
        picked = order[start:start + batch_size]
        images = splits.train_images[picked]
        if augment:
            images = _crop_and_flip(images, offsets[start:start + batch_size], flips[start:start + batch_size])
        yield _normalise(images, scale, shift, channels_last), splits.train_labels[picked]


def eval_batches(splits: Splits, batch_size: int, *, channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """The evaluation set in order, normalised like training batches but never augmented."""
    scale, shift = _normaliser(splits, splits.eval_images.device)
    for start in range(0, len(splits.eval_images), batch_size):
        images = splits.eval_images[start:start + batch_size]
        yield _normalise(images, scale, shift, channels_last), splits.eval_labels[start:start + batch_size]
