"""Data sets that need no network: generated or bundled ones, and standard files already on disk.

``load_dataset(name, data_dir=None, seed=0)`` returns a :class:`Dataset` of float tensors:
images ``(N, C, H, W)`` in [0, 1] or sequences ``(N, L)``, labels ``(N,)`` long.

* ``digits``: scikit-learn's bundled 8x8 digits (1797), a seeded stratified 80/20 split.
* ``mnist1d``: generated locally by the ``mnist1d`` package with its standard arguments (the fixed
  4000/1000 split of 40-step sequences), never downloaded.
* ``fashion_mnist``, ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]`` ...) in ``data_dir`` or
  its ``raw``/``FashionMNIST/raw``/``MNIST/raw`` subfolders (torchvision's layout).
* ``cifar10``, ``cifar100``: the python pickles (``cifar-10-batches-py``, ``cifar-100-python``).

Where the files are looked for: a ``data_dir`` that is given is the only place looked at (with its
subfolders), so the data used is always the copy the user pointed at. Only when ``data_dir`` is
``None`` does Fashion-MNIST come from Debian's package (``apt-get install dataset-fashion-mnist``,
directory :data:`DEBIAN_FASHION`).

Files are data, never code: CIFAR pickles go through an unpickler that builds only numpy arrays,
dicts, lists, bytes, strings and numbers, and every file's contents are checked against its format
(IDX header vs. size, image and label counts, label range). A missing file raises FileNotFoundError
naming every place looked at and how to get the data; a malformed one raises ValueError naming the
file. Nothing here downloads anything.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import operator
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._checks import check_tensor

DATASETS = ("digits", "mnist1d", "fashion_mnist", "mnist", "cifar10", "cifar100")
# Read at call time, so tests can point it elsewhere (they must not depend on what a machine has).
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

    def subset(self, train: Optional[int] = None, test: Optional[int] = None, seed: int = 0) -> "Dataset":
        """The data set with at most ``train`` training and ``test`` test samples, each drawn by
        :func:`stratified_subset` (class proportions kept; the same seed, the same samples)."""
        out = self
        for part, n in (("train", train), ("test", test)):
            if n is None:
                continue
            y = getattr(out, f"y_{part}")
            keep = torch.from_numpy(stratified_subset(y.numpy(), n, seed, name=f"{part}_subset"))
            out = dataclasses.replace(out, **{f"x_{part}": getattr(out, f"x_{part}")[keep], f"y_{part}": y[keep]})
        return out


def load_dataset(name: str, data_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`); ``seed`` (an integer >= 0) fixes the split where one
    is made. ``data_dir``, when given, must be an existing directory and is the only place looked at."""
    loaders = {"digits": _digits, "mnist1d": _mnist1d, "fashion_mnist": _fashion_mnist,
               "mnist": _mnist, "cifar10": _cifar10, "cifar100": _cifar100}
    if not isinstance(name, str) or name not in loaders:
        raise ValueError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir: expected a directory path (str), got {type(data_dir).__name__} "
                            f"{data_dir!r}")
        data_dir = os.fspath(data_dir)
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data_dir: expected an existing directory, got {data_dir!r} "
                                    f"({'a file' if os.path.exists(data_dir) else 'does not exist'})")
    return loaders[name](data_dir, _check_seed(seed))


def _check_seed(seed) -> int:
    """An integer >= 0 (numpy's generators refuse negative seeds); bools are refused."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {type(seed).__name__} {seed!r}")
    return value


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


def stratified_subset(y: np.ndarray, n: int, seed: int, name: str = "n") -> np.ndarray:
    """Indices of ``n`` samples of labels ``y`` ``(N,)`` drawn without replacement, each class in
    its proportion (largest remainders for the rounding), seeded; all ``N`` when ``n >= N``.
    ``name`` is the argument named in errors."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {n!r}")
    if n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1  # largest remainders
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return rng.permutation(np.concatenate(picked))


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


def _check_labels(labels, n: int, classes: int, path: str) -> np.ndarray:
    """``labels`` as int64 ``(n,)``: integers in [0, classes), one per image; else ValueError naming
    ``path`` (a label outside the range would index past the classifier's outputs or, worse, train a
    wrong class silently)."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: expected a 1-D list of integer labels, got an array of shape "
                         f"{y.shape} and dtype {y.dtype}")
    if y.size != n:
        raise ValueError(f"{path}: expected one label per image ({n} images), got {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{path}: expected labels in [0, {classes - 1}] for {classes} classes, got "
                         f"labels from {int(y.min())} to {int(y.max())}")
    return y.astype(np.int64)


# --- IDX (MNIST / Fashion-MNIST) -------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# no IDX data set a user trains on comes near this (MNIST's training images: 47 MB); a header
# declaring more is a crafted or corrupt file, and a .gz would be inflated that far before the
# size check could fail
IDX_MAX_BYTES = 1 << 32


def read_idx(path: str, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): two zero bytes, a type code, the number of dimensions,
    each dimension as a big-endian uint32, then exactly prod(dims) values. Returns the array with
    those dimensions; any disagreement raises ValueError naming ``path``. Only the bytes the header
    declares (plus one, to detect more) are read or inflated, and at most ``max_bytes``: a
    gzip bomb stops at its header's size."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise ValueError(f"{path}: not an IDX file (bad magic number)")
            if head[2] not in _IDX_TYPES:
                raise ValueError(f"{path}: not an IDX file (unknown data type code 0x{head[2]:02X}; expected "
                                 f"one of {', '.join(f'0x{c:02X}' for c in _IDX_TYPES)})")
            dtype, ndim = np.dtype(_IDX_TYPES[head[2]]), head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {4 + 4 * ndim} "
                                 f"bytes, the file has {4 + len(raw_dims)}")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow on crafted dimensions
            if expected > max_bytes:
                raise ValueError(f"{path}: the header says shape {dims} of {dtype.name} ({expected} bytes "
                                 f"of data), more than max_bytes={max_bytes}")
            data = f.read(expected + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a corrupt or truncated .gz
        raise ValueError(f"{path}: not a readable IDX file ({e})") from None
    if len(data) != expected:
        more = "more than" if len(data) > expected else f"{len(data)} bytes of data,"
        raise ValueError(f"{path}: the header says shape {dims} of {dtype.name} ({expected} bytes of "
                         f"data), the file holds {more} that")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _find(names: Sequence[str], dirs: List[str], what: str, how: str) -> List[str]:
    looked = []
    for d in dirs:
        paths = []
        for name in names:
            for candidate in (os.path.join(d, name), os.path.join(d, name + ".gz")):
                looked.append(candidate)
                if os.path.isfile(candidate):
                    paths.append(candidate)
                    break
        if len(paths) == len(names):
            return paths
    raise FileNotFoundError(f"{what}: files not found; looked for {', '.join(names)} (.gz or not) "
                            f"in {', '.join(dirs) or '(no directory)'}. {how}")


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte")


def _idx_split(images_path: str, labels_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """One split: images uint8 ``(N, H, W)`` and labels int64 ``(N,)`` in [0, 10), checked."""
    x, y = read_idx(images_path), read_idx(labels_path)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"{images_path}: expected images as unsigned bytes of shape (N >= 1, H, W) "
                         f"(idx3-ubyte), got shape {x.shape} of {x.dtype}")
    return x, _check_labels(y, x.shape[0], 10, labels_path)


def _idx_dataset(name: str, dirs: List[str], how: str) -> Dataset:
    paths = _find(_IDX, dirs, name, how)
    (xtr, ytr), (xte, yte) = _idx_split(*paths[0:2]), _idx_split(*paths[2:4])
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{paths[2]}: expected test images of the training images' size "
                         f"{xtr.shape[1:]} ({paths[0]}), got {xte.shape[1:]}")
    x = lambda a: torch.tensor(a.astype(np.float32) / 255.0).unsqueeze(1)  # noqa: E731  (N, 1, H, W)
    return Dataset(name, x(xtr), torch.tensor(ytr), x(xte), torch.tensor(yte), 10, "image")


def _dirs(data_dir: Optional[str], *subdirs: str) -> List[str]:
    if data_dir is None:
        return []
    return [data_dir] + [os.path.join(data_dir, s) for s in subdirs]


def _fashion_mnist(data_dir, seed) -> Dataset:
    if data_dir is None:
        return _idx_dataset("fashion_mnist", [DEBIAN_FASHION], "Install Debian's package (apt-get "
                            "install dataset-fashion-mnist) or put the four IDX files in --data_dir.")
    return _idx_dataset("fashion_mnist", _dirs(data_dir, "raw", "FashionMNIST/raw", "fashion-mnist"),
                        "Put the four IDX files there, or leave --data_dir unset to use Debian's "
                        f"package (apt-get install dataset-fashion-mnist, {DEBIAN_FASHION}).")


def _mnist(data_dir, seed) -> Dataset:
    return _idx_dataset("mnist", _dirs(data_dir, "raw", "MNIST/raw"),
                        "Put the four MNIST IDX files (from a copy you already have) in --data_dir.")


# --- CIFAR python pickles ------------------------------------------------------------------------------

def _latin1(text, encoding):
    """Protocol 0-2 pickles store bytes as ``_codecs.encode(text, 'latin1')``; nothing else is allowed."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({text!r:.40}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


def _numpy_globals() -> dict:
    """What pickled numpy arrays and scalars need, under the module names numpy 1.x (``numpy.core``)
    and numpy 2.x (``numpy._core``) write. The functions are taken from numpy's own ``__reduce__``
    so that no private module is imported here."""
    reconstruct = np.zeros(1).__reduce__()[0]
    from_buffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = from_buffer
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :class:`_DataUnpickler`'s list; the message names the file."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that builds data only: numpy arrays and scalars, and what pickle builds without
    a global (dicts, lists, tuples, bytes, strings, numbers). Any other global -- ``os.system``,
    ``builtins.eval``, a class with a ``__setstate__`` -- is refused before it is looked up, so a
    crafted file cannot run code."""

    _ALLOWED = {**_numpy_globals(), ("_codecs", "encode"): _latin1}

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")  # CIFAR was pickled by Python 2: str -> bytes
        self.path = path

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"{self.path}: refused to load '{module}.{name}': a CIFAR data file holds only numpy "
                "arrays, dicts, lists, bytes, strings and numbers, never code") from None


def _unpickle(path: str) -> dict:
    """Read one CIFAR python pickle with :class:`_DataUnpickler`; any failure is a ValueError naming
    ``path`` (the original error chained)."""
    with open(path, "rb") as f:
        try:
            return _DataUnpickler(f, path).load()
        except _RefusedGlobal as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # a corrupt pickle fails in many ways (EOFError, KeyError, struct.error ...)
            raise ValueError(f"{path}: not a readable CIFAR python pickle ({type(e).__name__}: {e})") from e


def _cifar_batch(path: str, label_key: bytes, classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch: images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)`` in [0, classes)."""
    part = _unpickle(path)
    if not isinstance(part, dict) or b"data" not in part or label_key not in part:
        got = sorted(part) if isinstance(part, dict) else type(part).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and {label_key!r}, got {got}")
    x = part[b"data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 \
            or x.shape[0] == 0:
        got = f"shape {x.shape} of {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{path}: expected b'data' as a uint8 array of shape (N >= 1, 3072) "
                         f"(3 x 32 x 32 per image), got {got}")
    return x.reshape(-1, 3, 32, 32), _check_labels(part[label_key], x.shape[0], classes, path)


def _cifar(name: str, folder: str, train_files, test_files, label_key: bytes, classes: int,
           data_dir) -> Dataset:
    dirs = _dirs(data_dir, folder)
    for d in dirs:
        if all(os.path.isfile(os.path.join(d, f)) for f in train_files + test_files):
            def load(files):
                parts = [_cifar_batch(os.path.join(d, f), label_key, classes) for f in files]
                x = np.concatenate([p[0] for p in parts])
                y = np.concatenate([p[1] for p in parts])
                return torch.tensor(x.astype(np.float32) / 255.0), torch.tensor(y)
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
    """Seed 002's training augmentation on a float batch ``(B, C, H, W)``: random crop with 4-pixel
    zero padding, then a random horizontal flip, per image (no torchvision)."""
    check_tensor(x, "x", ndims=(4,), layout="(B, C, H, W)")
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
