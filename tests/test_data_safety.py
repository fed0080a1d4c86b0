"""Data files are data, never code, and never silently inconsistent; encoders refuse bad arguments.

Every file here is written by the test in its real format (IDX: big-endian header + bytes; CIFAR:
a pickled dict of a uint8 (N, 3072) array and a label list), so the expected values are the ones
written, and a malformed file differs from a good one in exactly one stated way.
"""
import gzip
import os
import pickle
import shlex
import struct

import numpy as np
import pytest
import torch

from stablespike.data import (augment_cifar, datasets, direct, encode, latency, load_dataset, rate, read_idx,
                              sequence)


# --- file writers (the formats as published) -----------------------------------------------------------

def write_idx(path, array, dtype_code=0x08):
    """IDX: 0, 0, type code, ndim, each dim as a big-endian uint32, then the values (gzipped)."""
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(str(path) + ".gz", "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_idx_set(folder, n_train=20, n_train_labels=None, max_label=9, seed=0):
    """The four MNIST files; ``n_train_labels`` and ``max_label`` make the training labels disagree."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n, n_labels in (("train", n_train, n_train_labels or n_train), ("t10k", 5, 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n_labels, dtype=np.uint8)
        if split == "train":
            labels[-1] = max_label
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
        written[split] = (images, labels)
    return written


CIFAR10 = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar10_batch(n=4, n_labels=None, max_label=9, seed=0):
    """A batch as the CIFAR-10 python files hold it (batch_label, labels as Python ints, data, filenames)."""
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, 10, n if n_labels is None else n_labels)]
    labels[-1] = max_label
    return {b"batch_label": b"training batch 1 of 5", b"labels": labels,
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def write_cifar10(root, first, protocol=2):
    """``cifar-10-batches-py`` with ``first`` as data_batch_1 (any object) and valid other batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate(CIFAR10):
        obj = first if name == "data_batch_1" else cifar10_batch(seed=i)
        (folder / name).write_bytes(first if isinstance(first, bytes) and name == "data_batch_1"
                                    else pickle.dumps(obj, protocol=protocol))
    return folder


def as_images(data):
    """CIFAR rows (N, 3072) as float pixel values (N, 3, 32, 32) in 0..255 (x * 255 is exact for
    x = k / 255 in float32, k = 0..255)."""
    return torch.tensor(data.reshape(-1, 3, 32, 32), dtype=torch.float32)


# --- pickles that run code -------------------------------------------------------------------------------

class _Shell:
    """Unpickles as ``os.system("touch MARKER")`` -- the payload the issue verified."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _Exec:
    """Unpickles as ``exec("open(MARKER, 'w').close()")``: no shell needed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload, refused", [(_Shell, "system"), (_Exec, "exec")])
@pytest.mark.parametrize("where", ["whole file", "inside the labels"])
def test_a_cifar_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, payload, refused, where):
    marker = tmp_path / "marker"
    evil = payload(marker)
    if where == "inside the labels":
        batch = cifar10_batch()
        batch[b"labels"] = [0, 1, evil, 3]
        evil = batch
    folder = write_cifar10(tmp_path / "data", evil)
    with pytest.raises(ValueError, match=refused) as err:
        load_dataset("cifar10", data_dir=str(tmp_path / "data"))
    assert str(folder / "data_batch_1") in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_real_format_cifar_batch_loads_through_the_restricted_unpickler(tmp_path, protocol):
    folder = write_cifar10(tmp_path, cifar10_batch(n=6, seed=42), protocol=protocol)
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    assert d.x_train.shape == (6 + 4 * 4, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert torch.equal(d.x_train[:6] * 255, as_images(first[b"data"]))
    assert d.y_train[:6].tolist() == first[b"labels"] and d.y_train.dtype == torch.long


def test_a_cifar_pickle_written_by_numpy_1_loads(tmp_path):
    # numpy < 2 names its array rebuilder numpy.core.multiarray._reconstruct (numpy 2: numpy._core);
    # the published CIFAR files were written so. Protocol 2 spells globals as text, so rename in place.
    batch = cifar10_batch(n=3, seed=7)
    raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    write_cifar10(tmp_path, raw)
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    assert torch.equal(d.x_train[:3] * 255, as_images(batch[b"data"]))


def test_cifar100_refuses_code_and_loads_data(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(3)
    train = {b"fine_labels": [0, 99, 50], b"coarse_labels": [0, 19, 10],
             b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}
    (folder / "train").write_bytes(pickle.dumps(train, protocol=2))
    (folder / "test").write_bytes(pickle.dumps(_Exec(tmp_path / "marker"), protocol=2))
    with pytest.raises(ValueError, match="test"):
        load_dataset("cifar100", data_dir=str(tmp_path))
    assert not (tmp_path / "marker").exists()
    (folder / "test").write_bytes(pickle.dumps(train, protocol=2))
    d = load_dataset("cifar100", data_dir=str(tmp_path))
    assert d.y_train.tolist() == [0, 99, 50] and d.num_classes == 100


# --- contents that disagree ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_labels", [15, 25])
def test_cifar_images_and_labels_must_agree_in_number(tmp_path, n_labels):
    folder = write_cifar10(tmp_path, cifar10_batch(n=20, n_labels=n_labels))
    with pytest.raises(ValueError, match=f"20 images.*{n_labels} labels") as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(folder / "data_batch_1") in str(err.value)


@pytest.mark.parametrize("label", [200, 10, -1])
def test_cifar_labels_must_lie_in_the_class_range(tmp_path, label):
    folder = write_cifar10(tmp_path, cifar10_batch(n=20, max_label=label))
    with pytest.raises(ValueError, match=r"\[0, 9\]") as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(folder / "data_batch_1") in str(err.value)


@pytest.mark.parametrize("batch, word", [
    ([1, 2, 3], "dict"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "labels"),
    ({b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]}, "3072"),
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, "uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.0, 1.0]}, "integer"),
])
def test_a_cifar_batch_of_the_wrong_shape_names_the_file(tmp_path, batch, word):
    folder = write_cifar10(tmp_path, batch)
    with pytest.raises(ValueError, match=word) as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(folder / "data_batch_1") in str(err.value)


def test_a_truncated_cifar_pickle_names_the_file(tmp_path):
    folder = write_cifar10(tmp_path, pickle.dumps(cifar10_batch(), protocol=2)[:500])
    with pytest.raises(ValueError, match="not a readable CIFAR") as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(folder / "data_batch_1") in str(err.value)


@pytest.mark.parametrize("n_labels", [15, 25])
def test_idx_images_and_labels_must_agree_in_number(tmp_path, n_labels):
    write_idx_set(tmp_path, n_train=20, n_train_labels=n_labels)
    with pytest.raises(ValueError, match=f"20 images.*{n_labels} labels") as err:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert "train-labels-idx1-ubyte" in str(err.value)


def test_idx_labels_must_lie_in_the_class_range(tmp_path):
    write_idx_set(tmp_path, max_label=200)
    with pytest.raises(ValueError, match=r"\[0, 9\].*200") as err:
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert "train-labels-idx1-ubyte" in str(err.value)


def test_idx_header_must_match_the_data(tmp_path):
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4)
    cases = {"short": header + good.tobytes()[:-1], "long": header + good.tobytes() + b"\0",
             "code": bytes([0, 0, 0x07, 3]) + header[4:] + good.tobytes(), "header": header[:9]}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=name if name != "short" else "shape") as err:
            read_idx(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value)
    (tmp_path / "ok").write_bytes(header + good.tobytes())
    assert np.array_equal(read_idx(str(tmp_path / "ok")), good)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(header + good.tobytes())[:-6])
    for name in ("bad.gz", "cut.gz"):
        with pytest.raises(ValueError, match=name):
            read_idx(str(tmp_path / name))


def test_a_gzip_bomb_is_not_inflated_past_its_header(tmp_path):
    """A small .gz whose data inflates far beyond the size its header declares (or whose header
    declares more than max_bytes) is refused after reading at most the declared size + 1 byte."""
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10)
    (tmp_path / "bomb.gz").write_bytes(gzip.compress(header + bytes(100_000_000), compresslevel=9))
    assert (tmp_path / "bomb.gz").stat().st_size < 1_000_000
    with pytest.raises(ValueError, match="more than that"):
        read_idx(str(tmp_path / "bomb.gz"))
    big = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 60_000, 1_000_000)  # 60 GB declared
    (tmp_path / "big.gz").write_bytes(gzip.compress(big + bytes(1000)))
    with pytest.raises(ValueError, match="more than max_bytes"):
        read_idx(str(tmp_path / "big.gz"))
    (tmp_path / "small").write_bytes(header + bytes(10))
    with pytest.raises(ValueError, match="max_bytes=5"):
        read_idx(str(tmp_path / "small"), max_bytes=5)


def test_idx_files_must_have_the_format_rank_and_type(tmp_path):
    write_idx_set(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((20, 1), np.uint8))  # labels 2-D
    with pytest.raises(ValueError, match="1-D") as err:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert "train-labels-idx1-ubyte" in str(err.value)
    write_idx_set(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.int32), dtype_code=0x0C)
    with pytest.raises(ValueError, match="unsigned bytes") as err:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert "t10k-images-idx3-ubyte" in str(err.value)


# --- hermetic: what a machine has installed does not change what a data_dir means -------------------------

def test_a_given_data_dir_is_the_only_place_looked_at(tmp_path, monkeypatch):
    """With Debian's dataset-fashion-mnist installed (here: a stand-in directory holding valid IDX
    files), an explicit data_dir without the files is still "not found", and no data_dir uses it."""
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    written = write_idx_set(system)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION", str(system))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion_mnist", data_dir=str(empty))
    assert str(empty) in str(err.value)
    d = load_dataset("fashion_mnist")
    assert torch.equal(d.x_train[:, 0] * 255, torch.tensor(written["train"][0], dtype=torch.float32))
    assert d.y_test.tolist() == written["t10k"][1].tolist()


def test_without_a_data_dir_a_missing_system_copy_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist")


# --- bad arguments ----------------------------------------------------------------------------------------

X = torch.tensor([[0.0, 0.25, 1.0]])
LONG, BYTES = torch.ones(2, 3, dtype=torch.long), torch.full((2, 3), 200, dtype=torch.uint8)


def bad(call, exc, word, name):
    return pytest.param(call, exc, word, id=name)


@pytest.mark.parametrize("call, exc, word", [
    bad(lambda tmp: load_dataset(5), ValueError, "dataset", "name=5"),
    bad(lambda tmp: load_dataset(["mnist"]), ValueError, "dataset", "name=list"),
    bad(lambda tmp: load_dataset("mnist", data_dir=3), TypeError, "data_dir", "data_dir=3"),
    bad(lambda tmp: load_dataset("mnist", str(tmp / "no")), FileNotFoundError, "data_dir", "data_dir missing"),
    bad(lambda tmp: load_dataset("digits", seed=-1), ValueError, "seed", "seed=-1"),
    bad(lambda tmp: load_dataset("digits", seed="0"), ValueError, "seed", "seed='0'"),
    bad(lambda tmp: load_dataset("digits", seed=1.5), ValueError, "seed", "seed=1.5"),
    bad(lambda tmp: direct(X, 0), ValueError, "T", "direct T=0"),
    bad(lambda tmp: direct(X, 2.5), ValueError, "T", "direct T=2.5"),
    bad(lambda tmp: direct(X, True), ValueError, "T", "direct T=True"),
    bad(lambda tmp: direct(X, "4"), ValueError, "T", "direct T='4'"),
    bad(lambda tmp: direct(X, None), ValueError, "T", "direct T=None"),
    bad(lambda tmp: rate(X, -3), ValueError, "T", "rate T=-3"),
    bad(lambda tmp: latency(X, 0.5), ValueError, "T", "latency T=0.5"),
    bad(lambda tmp: encode(X, "rate", 3.0), ValueError, "T", "encode T=3.0"),
    bad(lambda tmp: rate(LONG, 3), TypeError, "x", "rate int64 x"),
    bad(lambda tmp: latency(BYTES, 3), TypeError, "x", "latency uint8 x"),
    bad(lambda tmp: direct(LONG.bool(), 3), TypeError, "x", "direct bool x"),
    bad(lambda tmp: sequence(LONG.int()), TypeError, "x", "sequence int32 x"),
    bad(lambda tmp: direct(X.numpy(), 3), TypeError, "x", "direct numpy x"),
    bad(lambda tmp: rate(torch.tensor([[0.5, float("nan")]]), 3), ValueError, "x", "rate NaN x"),
    bad(lambda tmp: latency(torch.tensor(0.5), 3), ValueError, "x", "latency 0-d x"),
    bad(lambda tmp: sequence(torch.rand(2, 3, 4, 4)), ValueError, "x", "sequence 3 channels"),
    bad(lambda tmp: rate(X, 3, generator="g"), TypeError, "generator", "rate generator='g'"),
    bad(lambda tmp: encode(X, "poisson", 4), ValueError, "encoder", "encoder='poisson'"),
    bad(lambda tmp: encode(X, None, 4), ValueError, "encoder", "encoder=None"),
    bad(lambda tmp: augment_cifar(torch.rand(3, 32, 32)), ValueError, "x", "augment_cifar 3-D x"),
])
def test_bad_arguments_name_the_argument(tmp_path, call, exc, word):
    with pytest.raises(exc) as err:
        call(tmp_path)
    assert str(err.value).startswith(word + ":")


def test_integers_of_any_integer_type_are_accepted(tmp_path):
    assert direct(X, np.int64(4)).shape == (4, 1, 3)
    assert latency(X, torch.tensor(5)).sum(0).tolist() == [[0.0, 1.0, 1.0]]  # one spike per input > 0
    write_idx_set(tmp_path)
    assert load_dataset("mnist", data_dir=tmp_path, seed=np.int32(5)).x_train.shape == (20, 1, 28, 28)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rate_with_a_cpu_generator_on_cuda_inputs_draws_the_cpu_spikes():
    # Training seeds a CPU generator per epoch and moves batches to the device: the spikes must be
    # the ones the same generator draws for the same probabilities on the CPU.
    x = torch.rand(64, 20)
    cpu = rate(x, 8, torch.Generator().manual_seed(3))
    gpu = rate(x.cuda(), 8, torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
