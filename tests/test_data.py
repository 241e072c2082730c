"""Data loading: the real mini CIFAR-10 set, hostile and damaged files, splits, augmentation, synthetic."""

import os
import pickle
import re
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.utils

from attnbench import data
from attnbench.errors import UserError
from attnbench.models import build_model

BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def layout_like_mini(tmp_path, mini_cifar_dir, replace):
    """A cifar-10-batches-py folder in tmp_path linking to the mini set, with `replace` (file name
    -> bytes) written in place of the real files."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in BATCH_FILES:
        if name in replace:
            (folder / name).write_bytes(replace[name])
        else:
            (folder / name).symlink_to(mini_cifar_dir / "cifar-10-batches-py" / name)
    return tmp_path


@pytest.fixture(scope="module")
def synthetic():
    return data.load_dataset("synthetic", "unused")


def splits_of(images, num_classes=None):
    """Splits around given images whose label is their index, to trace each output to its source."""
    labels = torch.arange(len(images))
    return data.Splits("t", num_classes or len(images), images, labels, images, labels, "test",
                       data.CIFAR_MEAN, data.CIFAR_STD)


def to_pixels(x, splits):
    mean, std = torch.tensor(splits.mean).view(1, 3, 1, 1), torch.tensor(splits.std).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


# --- the real mini set -------------------------------------------------------------------------


def test_mini_cifar_loads_like_the_official_files(mini_cifar_dir, capsys):
    s = data.load_dataset("cifar10", mini_cifar_dir)
    notice = capsys.readouterr().err
    assert "custom subset" in notice and notice.count("\n") == 1
    assert s.name == "cifar10" and s.num_classes == 10 and s.eval_name == "test"
    assert s.train_images.shape == (4000, 3, 32, 32) and s.eval_images.shape == (1000, 3, 32, 32)
    assert s.train_images.dtype == torch.uint8 and s.train_labels.dtype == torch.int64
    assert s.train_labels.shape == (4000,) and s.eval_labels.shape == (1000,)
    for labels in (s.train_labels, s.eval_labels):
        assert labels.min() >= 0 and labels.max() <= 9
    channel_mean = s.train_images.double().mean((0, 2, 3)) / 255
    assert torch.allclose(channel_mean, torch.tensor([0.4916, 0.4818, 0.4447], dtype=torch.float64), atol=1e-3)
    with open(mini_cifar_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        plain = pickle.load(f, encoding="bytes")
    assert s.train_labels[0].item() == plain[b"labels"][0]
    assert torch.equal(s.train_images[0], torch.from_numpy(plain[b"data"][0]).view(3, 32, 32))
    assert s.mean == data.CIFAR_MEAN and s.std == data.CIFAR_STD


def test_size_keeps_the_first_training_images(mini_cifar_dir):
    full = data.load_dataset("cifar10", mini_cifar_dir)
    small = data.load_dataset("cifar10", mini_cifar_dir, size=300)
    assert torch.equal(small.train_images, full.train_images[:300])
    assert torch.equal(small.eval_labels, full.eval_labels)
    with pytest.raises(UserError, match="more than the 4000"):
        data.load_dataset("cifar10", mini_cifar_dir, size=4001)


# --- hostile, damaged and missing files --------------------------------------------------------


class Planted:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, mini_cifar_dir, call):
    marker = tmp_path / "marker"
    command = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    root = layout_like_mini(tmp_path, mini_cifar_dir, {"data_batch_1": pickle.dumps(Planted(call, command))})
    with pytest.raises(UserError, match=r"refusing to load .*data_batch_1: it imports \w+\.(system|eval)"):
        data.load_dataset("cifar10", root)
    assert not marker.exists()


def test_truncated_file_is_named(tmp_path, mini_cifar_dir):
    whole = (mini_cifar_dir / "cifar-10-batches-py" / "data_batch_3").read_bytes()
    root = layout_like_mini(tmp_path, mini_cifar_dir, {"data_batch_3": whole[: len(whole) // 2]})
    with pytest.raises(UserError, match="data_batch_3 is truncated or corrupt"):
        data.load_dataset("cifar10", root)


@pytest.mark.parametrize("content", [
    {b"labels": [0]},
    {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
    [1, 2, 3],
], ids=["no data", "wrong width", "label count", "not a dict"])
def test_wrong_structure_is_refused(tmp_path, mini_cifar_dir, content):
    root = layout_like_mini(tmp_path, mini_cifar_dir, {"test_batch": pickle.dumps(content)})
    with pytest.raises(UserError, match="test_batch is not a CIFAR-10 batch"):
        data.load_dataset("cifar10", root)


def test_labels_out_of_range_are_refused(tmp_path, mini_cifar_dir):
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([0, 10])}  # numpy 2 pickles too
    root = layout_like_mini(tmp_path, mini_cifar_dir, {"test_batch": pickle.dumps(batch)})
    with pytest.raises(UserError, match="labels outside 0..9"):
        data.load_dataset("cifar10", root)


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match="--download") as err:
        data.load_dataset("cifar100", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "cifar-100-python") in str(err.value)


@pytest.mark.parametrize("download", [False, True])
def test_the_release_folder_itself_as_data_dir_names_its_parent(tmp_path, mini_cifar_dir, monkeypatch, download):
    """Checked before any download, which would otherwise fill a second folder inside the first;
    one file is enough to recognise the folder."""
    one_too_deep = tmp_path / "cifar-10-batches-py"
    one_too_deep.mkdir()
    (one_too_deep / "data_batch_1").write_bytes((mini_cifar_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive",
                        lambda *a, **k: pytest.fail("downloaded into the release folder"))
    monkeypatch.chdir(one_too_deep)
    for given in (one_too_deep, Path(".")):
        with pytest.raises(UserError, match=f"pass the folder holding it, --data-dir {re.escape(str(tmp_path))}$"):
            data.load_dataset("cifar10", given, download=download)


def test_download_fetches_the_official_archive_once(tmp_path, mini_cifar_dir, monkeypatch):
    calls = []

    def fake_download(url, root, md5=None, **_):
        calls.append((url, md5))
        layout_like_mini(Path(root), mini_cifar_dir, {})

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    assert len(data.load_dataset("cifar10", tmp_path, download=True).train_images) == 4000
    data.load_dataset("cifar10", tmp_path, download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]


def test_a_failed_download_is_a_user_error(tmp_path, monkeypatch):
    def offline(url, root, **_):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="downloading .*cifar-100-python.tar.gz .*failed"):
        data.load_dataset("cifar100", tmp_path, download=True)


def test_cifar100_layout_with_fine_labels(tmp_path, capsys):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):  # pickled by this numpy: numpy._core names
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": list(range(70, 70 + n)), b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
    s = data.load_dataset("cifar100", tmp_path, val_split=5)
    assert s.num_classes == 100 and len(s.train_images) == 25 and s.eval_name == "val"
    assert sorted(torch.cat([s.train_labels, s.eval_labels]).tolist()) == list(range(70, 100))
    assert "not the official CIFAR-100 release" in capsys.readouterr().err


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UserError, match="cifar10, cifar100, synthetic"):
        data.load_dataset("imagenet", ".")


# --- validation split --------------------------------------------------------------------------


def test_val_split_is_a_seeded_disjoint_hold_out(mini_cifar_dir):
    full = data.load_dataset("cifar10", mini_cifar_dir)
    index = {img.numpy().tobytes(): i for i, img in enumerate(full.train_images)}
    assert len(index) == 4000  # no duplicate images, so bytes identify a training image

    a = data.load_dataset("cifar10", mini_cifar_dir, val_split=500, seed=1)
    assert a.eval_name == "val" and len(a.eval_images) == 500 and len(a.train_images) == 3500
    val = [index[img.numpy().tobytes()] for img in a.eval_images]
    train = [index[img.numpy().tobytes()] for img in a.train_images]
    assert set(val).isdisjoint(train) and len(set(val) | set(train)) == 4000
    assert torch.equal(a.eval_labels, full.train_labels[val])

    again = data.load_dataset("cifar10", mini_cifar_dir, val_split=500, seed=1)
    other = data.load_dataset("cifar10", mini_cifar_dir, val_split=500, seed=2)
    assert torch.equal(again.eval_images, a.eval_images) and torch.equal(again.train_images, a.train_images)
    assert not torch.equal(other.eval_images, a.eval_images)
    with pytest.raises(UserError, match="--val-split"):
        data.load_dataset("cifar10", mini_cifar_dir, val_split=4000)


# --- batches and augmentation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bright():
    """300 images with no zero pixel, so any zero in a crop is padding."""
    return splits_of(torch.randint(1, 256, (300, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))


def test_batches_depend_only_on_seed_and_epoch(bright):
    def epoch(e, seed=0):
        return list(data.train_batches(bright, 128, e, seed))

    first, again = epoch(3), epoch(3)
    assert all(torch.equal(x, y) and torch.equal(a, b) for (x, a), (y, b) in zip(first, again))
    assert not torch.equal(first[0][1], epoch(4)[0][1])
    assert not torch.equal(first[0][1], epoch(3, seed=1)[0][1])


def test_every_image_once_and_the_last_partial_batch_kept(bright):
    batches = list(data.train_batches(bright, 128, 0, 0))
    assert [len(y) for _, y in batches] == [128, 128, 44]
    assert torch.equal(torch.cat([y for _, y in batches]).sort().values, torch.arange(300))
    assert [len(y) for _, y in data.eval_batches(bright, 100)] == [100, 100, 100]


def test_crops_are_translations_of_the_zero_padded_image_maybe_mirrored(bright):
    padded = F.pad(bright.train_images, (4, 4, 4, 4))
    seen, zero_pixels = set(), 0
    for x, labels in data.train_batches(bright, 128, 0, 0):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        pixels = to_pixels(x, bright)
        zero_pixels += int((pixels == 0).sum())
        for img, src in zip(pixels, labels.tolist()):
            matches = [(i, j, flip) for i in range(9) for j in range(9) for flip in (False, True)
                       if torch.equal(img, padded[src, :, i:i + 32, j:j + 32].flip(2) if flip
                                      else padded[src, :, i:i + 32, j:j + 32])]
            assert len(matches) == 1, f"image {src} is no single crop/flip of its source"
            seen.add(matches[0])
    assert zero_pixels > 0
    assert {f for _, _, f in seen} == {False, True}
    assert len({(i, j) for i, j, _ in seen}) > 60  # of 81 offsets, with 300 draws


def test_normalisation_and_no_augmentation(bright):
    mean, std = torch.tensor(data.CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(data.CIFAR_STD).view(1, 3, 1, 1)
    x, labels = next(data.train_batches(bright, 64, 0, 0, augment=False))
    expected = (bright.train_images[labels].float() / 255 - mean) / std
    assert x.dtype == torch.float32 and torch.allclose(x, expected, atol=1e-5)
    x, labels = next(data.eval_batches(bright, 64))
    assert torch.equal(labels, torch.arange(64))
    assert torch.allclose(x, (bright.eval_images[:64].float() / 255 - mean) / std, atol=1e-5)


def test_channels_last_changes_layout_not_values(bright):
    for make in (lambda cl: data.train_batches(bright, 128, 0, 0, channels_last=cl),
                 lambda cl: data.eval_batches(bright, 128, channels_last=cl)):
        plain, last = next(make(False))[0], next(make(True))[0]
        assert last.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(plain, last)


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_fixed_cifar_shaped_and_balanced(synthetic):
    s = synthetic
    assert s.num_classes == 10 and s.eval_name == "test"
    assert s.train_images.shape == (5000, 3, 32, 32) and s.eval_images.shape == (1000, 3, 32, 32)
    assert s.train_images.dtype == torch.uint8 and s.train_labels.dtype == torch.int64
    assert torch.bincount(s.train_labels, minlength=10).min() >= 400
    again = data.load_dataset("synthetic", "unused", seed=7)  # the seed picks batches, not the data
    assert torch.equal(again.train_images, s.train_images) and torch.equal(again.eval_images, s.eval_images)
    assert torch.equal(again.train_labels, s.train_labels)
    pixels = s.train_images.double().mean((0, 2, 3)) / 255
    assert torch.allclose(pixels, torch.tensor(s.mean, dtype=torch.float64), atol=1e-6)
    small = data.load_dataset("synthetic", "unused", size=800)
    assert len(small.train_images) == 800 and torch.equal(small.eval_images, s.eval_images)


def test_synthetic_mean_colour_does_not_give_the_class_away(synthetic):
    s = synthetic
    train_colour, test_colour = s.train_images.float().mean((2, 3)), s.eval_images.float().mean((2, 3))
    centres = torch.stack([train_colour[s.train_labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(test_colour, centres).argmin(1) == s.eval_labels).float().mean().item()
    assert accuracy < 0.25


@pytest.fixture
def one_thread():
    """Train on one thread: on a 2-core machine shared with one other busy process, two spinning
    OpenMP threads made this test 5x slower (114 s against 22 s), one thread does not care."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_small_resnet_learns_synthetic_in_two_epochs(synthetic, one_thread):
    torch.manual_seed(0)
    model = build_model("none", depth=8, num_classes=10, block="basic").to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = time.perf_counter()
    for epoch in range(2):
        for x, y in data.train_batches(synthetic, 128, epoch, seed=0, channels_last=True):
            loss = F.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.eval_batches(synthetic, 500))
    accuracy = correct / len(synthetic.eval_labels)
    print(f"synthetic: {accuracy:.1%} test accuracy after 2 epochs ({time.perf_counter() - start:.1f} s)")
    assert accuracy >= 0.30
