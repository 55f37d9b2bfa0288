"""Datasets: sha256 and gzip checks, IDX parsing, CIFAR-10 pickles, user .npz files, validation errors."""

import gzip
import hashlib
import pickle
import shutil
import struct
import zlib

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
    assert set(np.unique(d.y_train)) == set(range(10)) and d.num_classes == 10
    nhwc = load_dataset("mnist", flatten=False, test_size=5)
    assert nhwc.x_test.shape == (5, 28, 28, 1)


def fingerprints(images, labels) -> list:
    """One digest per example: its uint8 pixels and its label."""
    pixels = np.round(np.asarray(images, np.float64).reshape(len(images), -1) * 255).astype(np.uint8)
    return [hashlib.sha1(p.tobytes() + int(y).to_bytes(1, "little")).digest() for p, y in zip(pixels, labels)]


def test_validation_split_is_seeded_disjoint_and_covers_the_training_set():
    a = load_dataset("mnist", val_size=1000, seed=3)
    b = load_dataset("mnist", val_size=1000, seed=3, train_size=2000)
    c = load_dataset("mnist", val_size=1000, seed=4, train_size=2000)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.x_train[:2000], b.x_train)
    assert not np.array_equal(a.x_val, c.x_val)
    assert a.x_val.shape == (1000, 784) and b.x_train.shape == (2000, 784) and a.x_train.shape == (59000, 784)
    # every (image, label) of the original training set lands in exactly one of the two sets
    raw_x, raw_y, _, _ = data.load_idx_dataset(data.MNIST_DIR)
    original = fingerprints(raw_x / 255.0, raw_y)
    assert len(set(original)) == 60000  # MNIST's training images are all distinct
    val, train = fingerprints(a.x_val, a.y_val), fingerprints(a.x_train, a.y_train)
    assert not set(val) & set(train)
    assert len(set(val)) + len(set(train)) == 60000 and set(val) | set(train) == set(original)


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


def corrupted_gzip(raw: bytes, error: type) -> bytes:
    """`raw` with one byte flipped, the first from the middle on for which gzip.decompress raises `error`."""
    for offset in range(len(raw) // 2, len(raw)):
        bad = bytearray(raw)
        bad[offset] ^= 0xFF
        try:
            gzip.decompress(bytes(bad))
        except Exception as err:  # noqa: BLE001 - looking for one exact type
            if type(err) is error:
                return bytes(bad)
    raise AssertionError(f"no single flipped byte gives {error.__name__}")


@pytest.mark.parametrize("damage", ["deflate stream (zlib.error)", "crc (BadGzipFile)", "truncated (EOFError)"])
def test_a_damaged_gzip_is_a_data_error_saying_how_to_restore_it(tmp_path, monkeypatch, damage):
    for f in data.MNIST_DIR.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = target.read_bytes()
    if damage.startswith("truncated"):
        bad = raw[:len(raw) // 2]
    else:
        bad = corrupted_gzip(raw, zlib.error if damage.startswith("deflate") else gzip.BadGzipFile)
    with pytest.raises(zlib.error if damage.startswith("deflate") else (gzip.BadGzipFile, EOFError)):
        gzip.decompress(bad)  # the damage is of the intended kind
    target.write_bytes(bad)
    monkeypatch.setattr(data, "MNIST_DIR", tmp_path)  # treated as the bundled copy
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: corrupted gzip file.*git checkout -- data/mnist"):
        load_dataset("mnist")


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


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; known: mnist, fashion_mnist, cifar10, npz"):
        load_dataset("imagenet")


def test_one_registry_entry_adds_a_dataset(monkeypatch):
    assert data.DATASETS == tuple(data.LOADERS) == ("mnist", "fashion_mnist", "cifar10", "npz")
    x = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)
    toy = data.RawData(x, np.array([0, 1, 2, 3]), x[:2], np.array([3, 0]), None, "toy")
    monkeypatch.setitem(data.LOADERS, "toy", lambda data_dir, data_file: toy)
    d = load_dataset("toy", flatten=False)
    assert d.num_classes == 4 and d.x_train.shape == (4, 3, 2, 1)


def write_npz(path, **arrays):
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a str path
        np.savez(f, **arrays)
    return str(path)


def test_npz_flat_float_features_three_classes(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(50, 20)) * 7.0
    x_train[:, 0] = np.arange(50)  # row id, to undo the shuffle
    x_train[:, 1] = 2.5  # a constant feature
    y_train = rng.integers(0, 3, 50)
    y_train[:3] = [0, 1, 2]
    x_test, y_test = rng.normal(size=(9, 20)), rng.integers(0, 3, 9)
    path = write_npz(tmp_path / "mine.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    d = load_dataset("npz", data_file=path, flatten=False, val_size=10, seed=1, test_size=4)
    assert d.num_classes == 3
    assert d.x_train.shape == (40, 20) and d.x_val.shape == (10, 20) and d.x_test.shape == (4, 20)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    rows = np.concatenate([d.x_val[:, 0], d.x_train[:, 0]]).astype(int)
    assert sorted(rows) == list(range(50))
    # float features are kept as given (not scaled), with their labels
    np.testing.assert_array_equal(np.concatenate([d.x_val, d.x_train]), x_train[rows].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([d.y_val, d.y_train]), y_train[rows])
    np.testing.assert_array_equal(d.x_test, x_test[:4].astype(np.float32))
    n = load_dataset("npz", data_file=path, normalize=True)
    assert n.x_train.shape == (50, 20) and np.all(np.isfinite(n.x_train)) and np.all(np.isfinite(n.x_test))
    np.testing.assert_allclose(n.x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(n.x_train.std(0)[2:], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(n.x_train[:, 1], 0.0)  # the constant feature is only centred


def test_npz_uint8_images_explicit_classes_and_float_labels(tmp_path):
    rng = np.random.default_rng(1)
    x_train, x_test = rng.integers(0, 256, (12, 6, 5), dtype=np.uint8), rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    y_train, y_test = np.arange(12) % 4, np.array([0.0, 1.0, 3.0])  # integral float labels are accepted
    path = write_npz(tmp_path / "imgs.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     num_classes=np.array(7))
    d = load_dataset("npz", data_file=path)
    assert d.num_classes == 7 and d.x_train.shape == (12, 30) and d.x_test.shape == (3, 30)
    np.testing.assert_allclose(d.x_test, x_test.reshape(3, 30) / 255.0, rtol=1e-6)
    assert d.y_test.dtype == np.int32 and d.y_test.tolist() == [0, 1, 3]
    assert load_dataset("npz", data_file=path, flatten=False).x_train.shape == (12, 6, 5, 1)
    rgb = write_npz(tmp_path / "rgb.npz", x_train=rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8),
                    y_train=np.arange(8) % 2, x_test=rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), y_test=[1, 0])
    d = load_dataset("npz", data_file=rgb, flatten=False, normalize=True)
    assert d.num_classes == 2 and d.x_train.shape == (8, 4, 4, 3)
    np.testing.assert_allclose(d.x_train.reshape(-1, 3).mean(0), 0.0, atol=1e-5)


def good_arrays():
    rng = np.random.default_rng(2)
    return dict(x_train=rng.normal(size=(10, 20)), y_train=np.arange(10) % 3,
                x_test=rng.normal(size=(4, 20)), y_test=np.array([0, 1, 2, 0]))


def with_(**changes):
    arrays = good_arrays()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


NPZ_ERRORS = {
    "missing file": (None, "not found"),
    "not a zip": (b"x_train,y_train\n1,2\n", "not an .npz archive"),
    "broken zip": (b"PK\x03\x04" + bytes(60), "not an .npz archive"),
    "single npy": ("npy", "a single .npy array, not an .npz archive"),
    "missing arrays": (with_(x_test=None, y_test=None),
                       "missing array.s. x_test, y_test; required: x_train, y_train, x_test, y_test"),
    "object array": (with_(x_train=np.array([[1.0], "a"] * 5, dtype=object)), "cannot read array x_train"),
    "string labels": (with_(y_train=np.array(list("abcabcabca"))), "y_train has non-numeric dtype"),
    "1-D features": (with_(x_train=np.zeros(10)), r"x_train has shape \(10,\)"),
    "one-hot labels": (with_(y_test=np.eye(3)[[0, 1, 2, 0]]), r"y_test has shape \(4, 3\)"),
    "empty": (with_(x_test=np.zeros((0, 20)), y_test=np.zeros(0, int)), "x_test is empty"),
    "length mismatch": (with_(y_train=np.arange(9) % 3), "x_train has 10 examples but y_train has 9 labels"),
    "feature shapes": (with_(x_test=np.zeros((4, 21))),
                       r"x_train examples have shape \(20,\) but x_test examples have shape \(21,\)"),
    "non-integral labels": (with_(y_test=np.array([0.0, 1.5, 2.0, 0.0])), "y_test holds non-integer label 1.5"),
    "negative label": (with_(y_train=np.arange(10) % 3 - 1), "y_train has negative label -1"),
    "label >= num_classes": (with_(y_test=np.array([0, 1, 3, 0]), num_classes=np.array(3)),
                             r"y_test has label 3 out of range 0\.\.2"),
    "bad num_classes": (with_(num_classes=np.array(2.5)), "num_classes must be a positive integer"),
    "inf": (with_(x_test=np.full((4, 20), np.inf)), "x_test holds NaN or inf"),
    "float32 overflow": (with_(x_train=np.full((10, 20), 1e300)), "x_train holds NaN or inf"),
}


@pytest.mark.parametrize("case", list(NPZ_ERRORS))
def test_npz_validation_errors_name_the_file_and_the_array(tmp_path, case):
    content, message = NPZ_ERRORS[case]
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif content is not None:
        write_npz(path, **content)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("npz", data_file=str(path))
    assert str(err.value).startswith(str(path))


def test_nan_in_an_npz_is_a_data_error_from_load_dataset(tmp_path):
    arrays = good_arrays()
    arrays["x_train"][7, 3] = np.nan
    path = write_npz(tmp_path / "nan.npz", **arrays)
    with pytest.raises(DataError, match=r"nan.npz: x_train holds NaN or inf \(as float32\), first in example 7"):
        load_dataset("npz", data_file=path)


def test_data_file_and_data_dir_go_to_the_right_datasets(tmp_path):
    with pytest.raises(DataError, match="'npz' dataset needs data_file"):
        load_dataset("npz")
    path = write_npz(tmp_path / "ok.npz", **good_arrays())
    with pytest.raises(DataError, match="data_dir='somewhere' must be empty"):
        load_dataset("npz", data_dir="somewhere", data_file=path)
    with pytest.raises(DataError, match="MNIST reads a folder"):
        load_dataset("mnist", data_file=path)
    with pytest.raises(ValueError, match="train_size must be at least 1"):
        load_dataset("npz", data_file=path, train_size=-2)


def _save(path, y_train, y_test=None, x=None, **extra):
    x = np.random.default_rng(0).normal(size=(len(y_train), 3)).astype(np.float32) if x is None else x
    y_test = y_train if y_test is None else y_test
    np.savez(path, x_train=x, y_train=np.asarray(y_train), x_test=x[:len(y_test)], y_test=np.asarray(y_test), **extra)


def test_the_fingerprint_follows_the_content_not_the_path(tmp_path):
    _save(tmp_path / "a.npz", [0, 1, 2, 1])
    _save(tmp_path / "b.npz", [0, 1, 2, 1])
    _save(tmp_path / "c.npz", [0, 1, 2, 2])  # one label differs
    sha = {k: data.dataset_fingerprint("npz", data_file=str(tmp_path / f"{k}.npz")) for k in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]
    assert len(sha["a"]) == 64
    d = load_dataset("npz", data_file=str(tmp_path / "a.npz"), train_size=2, normalize=True, seed=3)
    assert d.fingerprint == sha["a"], "the fingerprint is of the file's arrays, before subsets and scaling"
    x = np.zeros((4, 3), np.float32)
    _save(tmp_path / "d.npz", [0, 1, 2, 1], x=x)
    _save(tmp_path / "e.npz", [0, 1, 2, 1], x=x.astype(np.float64))  # equal values, another dtype
    assert data.dataset_fingerprint("npz", data_file=str(tmp_path / "d.npz")) != \
        data.dataset_fingerprint("npz", data_file=str(tmp_path / "e.npz"))
    assert load_dataset("mnist", test_size=5).fingerprint == data.dataset_fingerprint("mnist")


def test_classes_without_training_examples_and_oversized_subsets_are_errors(tmp_path):
    _save(tmp_path / "gaps.npz", [0, 10, 20, 0], y_test=[0, 10, 20, 0])
    with pytest.raises(DataError, match=r"labels imply 21 classes \(0..20\), but 18 of them have no training "
                                         r"example \(1, 2, 3, .*relabel"):
        load_dataset("npz", data_file=str(tmp_path / "gaps.npz"))
    _save(tmp_path / "test_only.npz", [0, 1, 1, 0], y_test=[0, 2, 1, 0])
    with pytest.raises(DataError, match=r"3 classes \(0..2\), but 1 of them have no training example \(2\)"):
        load_dataset("npz", data_file=str(tmp_path / "test_only.npz"))
    _save(tmp_path / "huge.npz", np.array([0.0, 1.0, 3e10, 0.0]))  # refused before anything is allocated per class
    with pytest.raises(DataError, match="30000000001 classes do not fit int32 labels"):
        load_dataset("npz", data_file=str(tmp_path / "huge.npz"))
    _save(tmp_path / "declared.npz", [0, 10, 20, 0], num_classes=np.array(21))  # declared: kept as given
    assert load_dataset("npz", data_file=str(tmp_path / "declared.npz")).num_classes == 21
    _save(tmp_path / "ok.npz", [0, 1, 2, 1, 0, 2])
    with pytest.raises(ValueError, match="train_size=6 exceeds the 5 train examples of .*ok.npz left after "
                                         "val_size=1"):
        load_dataset("npz", data_file=str(tmp_path / "ok.npz"), val_size=1, train_size=6)
    with pytest.raises(ValueError, match="test_size=7 exceeds the 6 test examples"):
        load_dataset("npz", data_file=str(tmp_path / "ok.npz"), test_size=7)
    assert load_dataset("npz", data_file=str(tmp_path / "ok.npz"), val_size=1, train_size=5).x_train.shape == (5, 3)


def test_a_folder_or_a_text_file_as_data_file_gets_a_plain_message(tmp_path):
    with pytest.raises(DataError, match="is a folder; the 'npz' dataset reads data_file, an .npz file"):
        load_dataset("npz", data_file=str(tmp_path))
    (tmp_path / "notes.npz").write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"not an .npz archive \(an .npz is a zip file of .npy arrays\)") as err:
        load_dataset("npz", data_file=str(tmp_path / "notes.npz"))
    assert "allow_pickle" not in str(err.value)


def test_the_fingerprint_format_is_pinned(tmp_path):
    """Every recorded run is compared with this hash: a silent change of its format would refuse (or, worse,
    match) old runs. sha256 over 'name:dtype:shape;' + bytes for x_train, y_train, x_test, y_test, then
    'num_classes:K', written out by hand here."""
    x = np.arange(6, dtype=np.uint8).reshape(2, 3)
    y = np.array([0, 1], dtype=np.int64)
    np.savez(tmp_path / "pin.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    h = hashlib.sha256()
    for name, a in (("x_train", x), ("y_train", y), ("x_test", x), ("y_test", y)):
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode() + a.tobytes())
    h.update(b"num_classes:None")
    assert data.dataset_fingerprint("npz", data_file=str(tmp_path / "pin.npz")) == h.hexdigest()
    # a declared class count is part of the data: the same arrays with 3 or 4 classes train other networks
    for k in (3, 4):
        np.savez(tmp_path / f"k{k}.npz", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=np.array(k))
    h4 = hashlib.sha256()
    for name, a in (("x_train", x), ("y_train", y), ("x_test", x), ("y_test", y)):
        h4.update(f"{name}:{a.dtype.str}:{a.shape};".encode() + a.tobytes())
    h4.update(b"num_classes:4")
    assert data.dataset_fingerprint("npz", data_file=str(tmp_path / "k4.npz")) == h4.hexdigest()
    assert data.dataset_fingerprint("npz", data_file=str(tmp_path / "k3.npz")) != h4.hexdigest()
