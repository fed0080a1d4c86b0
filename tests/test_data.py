"""Offline data sets (on small files written here in their real formats) and encoders."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from stablespike.data import (augment_cifar, direct, encode, latency, load_dataset, rate, read_idx,
                              sequence)


def write_idx(path, array, gz=True):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(header + body)


def write_mnist_like(folder, n_train=12, n_test=5, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    imgs = {k: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for k, n in (("train", n_train), ("t10k", n_test))}
    labels = {k: rng.integers(0, 10, n, dtype=np.uint8) for k, n in (("train", n_train), ("t10k", n_test))}
    for k in ("train", "t10k"):
        write_idx(folder / f"{k}-images-idx3-ubyte", imgs[k], gz)
        write_idx(folder / f"{k}-labels-idx1-ubyte", labels[k], gz)
    return imgs, labels


def test_idx_reader_round_trip(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    write_idx(tmp_path / "a", a, gz=False)
    assert np.array_equal(read_idx(str(tmp_path / "a")), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))


@pytest.mark.parametrize("name, sub", [("fashion_mnist", "FashionMNIST/raw"), ("mnist", "MNIST/raw"),
                                       ("mnist", "")])
def test_idx_data_sets_load_from_the_torchvision_layout_or_a_plain_folder(tmp_path, name, sub):
    imgs, labels = write_mnist_like(tmp_path / sub if sub else tmp_path, gz=(sub != ""))
    d = load_dataset(name, data_dir=str(tmp_path))
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.allclose(d.x_train[3, 0], torch.tensor(imgs["train"][3] / 255.0, dtype=torch.float32))
    assert d.y_test.tolist() == labels["t10k"].tolist() and d.num_classes == 10


def write_cifar(folder, name):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else ["train", "test"]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    written = {}
    for f in files:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, 4))
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels}, fh)
        written[f] = (data, labels)
    return written


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_pickles(tmp_path, name, folder):
    written = write_cifar(tmp_path / folder, name)
    d = load_dataset(name, data_dir=str(tmp_path))
    first = "data_batch_1" if name == "cifar10" else "train"
    assert d.x_train.shape == ((20, 3, 32, 32) if name == "cifar10" else (4, 3, 32, 32))
    assert torch.allclose(d.x_train[0], torch.tensor(written[first][0][0].reshape(3, 32, 32) / 255.0, dtype=torch.float32))
    assert d.y_train[:4].tolist() == [int(v) for v in written[first][1]]
    assert d.num_classes == (10 if name == "cifar10" else 100)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="digits, mnist1d"):
        load_dataset("imagenet")


def test_digits_split_is_seeded_and_stratified():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.y_test, b.y_test) and not torch.equal(a.y_test, c.y_test)
    assert len(a.y_train) + len(a.y_test) == 1797 and a.x_train.max() <= 1.0
    counts = torch.bincount(a.y_test, minlength=10).float()
    assert counts.min() >= 34 and counts.max() <= 38  # 20 % of each class (174-183 per class)


def test_mnist1d_is_generated_locally():
    d = load_dataset("mnist1d")
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40) and d.kind == "sequence"


def test_encoders():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[0.0, 0.25, 1.0]])
    assert direct(x, 4).shape == (4, 1, 3) and torch.equal(direct(x, 4)[2], x)
    r = rate(x.expand(2000, 3), 10, generator=g)
    assert torch.allclose(r.mean(dim=(0, 1)), torch.tensor([0.0, 0.25, 1.0]), atol=0.01)
    lat = latency(x, 5)
    assert lat.sum(0).tolist() == [[0.0, 1.0, 1.0]] and lat[0, 0, 2] == 1 and lat[3, 0, 1] == 1
    seq = sequence(torch.arange(6.0).view(2, 3))
    assert seq.shape == (3, 2, 1) and seq[:, 1, 0].tolist() == [3.0, 4.0, 5.0]
    img = torch.rand(2, 1, 4, 5)
    assert torch.equal(sequence(img)[2], img[:, 0, 2])
    with pytest.raises(ValueError, match="encoder"):
        encode(x, "poisson", 4)
    with pytest.raises(ValueError, match="T"):
        direct(x, 0)


def test_cifar_augmentation_crops_and_flips():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment_cifar(x, g)
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # every output row is a (possibly flipped, shifted) piece of the input or zero padding
    values = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= values
