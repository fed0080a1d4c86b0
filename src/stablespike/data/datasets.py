"""Data sets that need no network: generated or bundled ones, and standard files already on disk.

``load_dataset(name, data_dir=None, seed=0)`` returns a :class:`Dataset` of float tensors:
images ``(N, C, H, W)`` in [0, 1] or sequences ``(N, L)``, labels ``(N,)`` long.

* ``digits``: scikit-learn's bundled 8x8 digits (1797), a seeded stratified 80/20 split.
* ``mnist1d``: generated locally by the ``mnist1d`` package with its standard arguments (the fixed
  4000/1000 split of 40-step sequences), never downloaded.
* ``fashion_mnist``, ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]`` ...) in ``data_dir``,
  its ``raw``/``FashionMNIST/raw``/``MNIST/raw`` subfolders (torchvision's layout) or, for
  Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist``.
* ``cifar10``, ``cifar100``: the python pickles (``cifar-10-batches-py``, ``cifar-100-python``).

A missing file raises FileNotFoundError naming every place looked at and how to get the data.
Nothing here downloads anything.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

DATASETS = ("digits", "mnist1d", "fashion_mnist", "mnist", "cifar10", "cifar100")
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


@dataclass
class Dataset:
    """``x_train``/``x_test``: float tensors; ``y_train``/``y_test``: long tensors; ``kind``:
    ``"image"`` (N, C, H, W) or ``"sequence"`` (N, L)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    kind: str

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, data_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`); ``seed`` fixes the split where one is made."""
    loaders = {"digits": _digits, "mnist1d": _mnist1d, "fashion_mnist": _fashion_mnist,
               "mnist": _mnist, "cifar10": _cifar10, "cifar100": _cifar100}
    if name not in loaders:
        raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    return loaders[name](data_dir, seed)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with each class split in the same proportion, seeded."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _optional(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"{module} is needed for this data set: pip install 'stablespike[{extra}]'") from None


def _digits(data_dir, seed) -> Dataset:
    datasets = _optional("sklearn.datasets", "datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = stratified_split(d.target, 0.2, seed)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, "image")


def _mnist1d(data_dir, seed) -> Dataset:
    data = _optional("mnist1d.data", "datasets")
    d = data.make_dataset(data.get_dataset_args())  # the standard set, generated; never downloaded
    f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return Dataset("mnist1d", f(d["x"]), g(d["y"]), f(d["x_test"]), g(d["y_test"]), 10, "sequence")


# --- IDX (MNIST / Fashion-MNIST) -------------------------------------------------------------------

def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian magic, dims, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[raw[2]]
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {tuple(dims)}, got {data.size}")
    return data.reshape(tuple(int(d) for d in dims))


def _find(names: Sequence[str], dirs: List[str], what: str, how: str) -> List[str]:
    looked = []
    for d in dirs:
        paths = []
        for name in names:
            for candidate in (os.path.join(d, name), os.path.join(d, name + ".gz")):
                looked.append(candidate)
                if os.path.exists(candidate):
                    paths.append(candidate)
                    break
        if len(paths) == len(names):
            return paths
    raise FileNotFoundError(f"{what}: files not found; looked for {', '.join(names)} (.gz or not) "
                            f"in {', '.join(dirs) or '(no directory)'}. {how}")


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte")


def _idx_dataset(name: str, dirs: List[str], how: str) -> Dataset:
    paths = _find(_IDX, dirs, name, how)
    xs = [torch.tensor(read_idx(p).astype(np.float32) / 255.0).unsqueeze(1) for p in paths[0::2]]
    ys = [torch.tensor(read_idx(p).astype(np.int64)) for p in paths[1::2]]
    return Dataset(name, xs[0], ys[0], xs[1], ys[1], 10, "image")


def _dirs(data_dir: Optional[str], *subdirs: str) -> List[str]:
    if data_dir is None:
        return []
    return [data_dir] + [os.path.join(data_dir, s) for s in subdirs]


def _fashion_mnist(data_dir, seed) -> Dataset:
    dirs = _dirs(data_dir, "raw", "FashionMNIST/raw", "fashion-mnist") + [DEBIAN_FASHION]
    return _idx_dataset("fashion_mnist", dirs, "Install Debian's package (apt-get install "
                        "dataset-fashion-mnist) or put the four IDX files in --data_dir.")


def _mnist(data_dir, seed) -> Dataset:
    return _idx_dataset("mnist", _dirs(data_dir, "raw", "MNIST/raw"),
                        "Put the four MNIST IDX files (from a copy you already have) in --data_dir.")


# --- CIFAR python pickles ------------------------------------------------------------------------------

def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar(name: str, folder: str, train_files, test_files, label_key: bytes, classes: int,
           data_dir) -> Dataset:
    dirs = _dirs(data_dir, folder)
    for d in dirs:
        if all(os.path.exists(os.path.join(d, f)) for f in train_files + test_files):
            def load(files):
                parts = [_unpickle(os.path.join(d, f)) for f in files]
                x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
                y = np.concatenate([np.asarray(p[label_key]) for p in parts])
                return torch.tensor(x.astype(np.float32) / 255.0), torch.tensor(y.astype(np.int64))
            (xtr, ytr), (xte, yte) = load(train_files), load(test_files)
            return Dataset(name, xtr, ytr, xte, yte, classes, "image")
    raise FileNotFoundError(f"{name}: the python-pickle files {train_files + test_files} were not found in "
                            f"{', '.join(dirs) or '(no --data_dir given)'}. Put the extracted '{folder}' "
                            "folder (from a copy you already have) in --data_dir; nothing is downloaded.")


def _cifar10(data_dir, seed) -> Dataset:
    return _cifar("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                  ["test_batch"], b"labels", 10, data_dir)


def _cifar100(data_dir, seed) -> Dataset:
    return _cifar("cifar100", "cifar-100-python", ["train"], ["test"], b"fine_labels", 100, data_dir)


def augment_cifar(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Seed 002's training augmentation on a batch ``(B, C, H, W)``: random crop with 4-pixel zero
    padding, then a random horizontal flip, per image (no torchvision)."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (B,), generator=generator)
    dx = torch.randint(0, 9, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    out = torch.empty_like(x)
    for b in range(B):
        crop = padded[b, :, dy[b]: dy[b] + H, dx[b]: dx[b] + W]
        out[b] = crop.flip(-1) if flip[b] else crop
    return out
