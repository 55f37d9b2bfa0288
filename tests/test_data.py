"""Datasets: sha256 checks, IDX parsing, CIFAR-10 pickles, missing-data errors."""

import gzip
import pickle
import shutil
import struct

import numpy as np
import pytest

from fenchel import data
from fenchel.data import DataError, load_dataset, parse_idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_bundled_mnist_shapes_dtypes_and_labels():
    d = load_dataset("mnist")
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert set(np.unique(d.y_train)) == set(range(10))
    nhwc = load_dataset("mnist", flatten=False, test_size=5)
    assert nhwc.x_test.shape == (5, 28, 28, 1)


def test_validation_split_is_seeded_and_disjoint():
    a = load_dataset("mnist", val_size=1000, seed=3, train_size=2000)
    b = load_dataset("mnist", val_size=1000, seed=3, train_size=2000)
    c = load_dataset("mnist", val_size=1000, seed=4, train_size=2000)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    assert a.x_val.shape == (1000, 784) and a.x_train.shape == (2000, 784)


def test_sha256_catches_a_corrupted_file(tmp_path):
    for f in data.MNIST_DIR.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    raw = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one flipped label
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: sha256 mismatch"):
        data.load_idx_dataset(tmp_path, data.MNIST_SHA256, "MNIST")
    shutil.copy(data.MNIST_DIR / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert data.load_idx_dataset(tmp_path, data.MNIST_SHA256, "MNIST")[3].shape == (10000,)


def test_idx_parser():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="expected 24 bytes"):
        parse_idx(idx_bytes(arr)[:-1])


def test_idx_label_range_is_checked(tmp_path):
    imgs = np.zeros((3, 2, 2), np.uint8)
    for stem, a in [("train-images-idx3-ubyte", imgs), ("train-labels-idx1-ubyte", np.array([0, 1, 12])),
                    ("t10k-images-idx3-ubyte", imgs), ("t10k-labels-idx1-ubyte", np.array([0, 1, 2]))]:
        (tmp_path / stem).write_bytes(idx_bytes(a))
    with pytest.raises(DataError, match="label 12 out of range"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(not data.FASHION_MNIST_DEBIAN_DIRS[0].exists(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_from_the_debian_package():
    d = load_dataset("fashion_mnist", test_size=2000)
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (2000, 784)
    assert set(np.unique(d.y_train)) == set(range(10))
    assert not np.allclose(d.x_test[:100], load_dataset("mnist", test_size=100).x_test)


def test_fashion_mnist_from_a_named_folder_and_missing_error(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for stem, a in [("train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28))),
                    ("train-labels-idx1-ubyte", rng.integers(0, 10, 30)),
                    ("t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 28, 28))),
                    ("t10k-labels-idx1-ubyte", rng.integers(0, 10, 7))]:
        (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(idx_bytes(a)))
    d = load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert d.x_train.shape == (30, 784) and d.x_test.shape == (7, 784)
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIRS", (tmp_path / "nowhere",))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist")


def write_cifar(folder, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n_per_batch).tolist(),
             b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        batches[name] = d
    return batches


def test_cifar10_reader_on_written_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(folder)
    d = load_dataset("cifar10", data_dir=str(folder), flatten=False)
    assert d.x_train.shape == (20, 32, 32, 3) and d.x_test.shape == (4, 32, 32, 3)
    # channel-major rows (1024 red, 1024 green, 1024 blue) become NHWC pixels
    raw = batches["test_batch"][b"data"][0]
    np.testing.assert_allclose(d.x_test[0, 0, 0], raw[[0, 1024, 2048]] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(d.x_test[0, 1, 2], raw[[34, 1024 + 34, 2048 + 34]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, batches["test_batch"][b"labels"])
    flat = load_dataset("cifar10", data_dir=str(folder), normalize=True)
    assert flat.x_train.shape == (20, 3072)
    np.testing.assert_allclose(flat.x_train.reshape(-1, 3).mean(0), 0.0, atol=1e-5)


def test_cifar10_missing_errors_say_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="config.data_dir"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="data_batch_1.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_unknown_dataset_and_nan_check():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="test images contains NaN"):
        data.check_finite(np.zeros(3), np.array([0.0, np.nan]), names=["train", "test images"])
