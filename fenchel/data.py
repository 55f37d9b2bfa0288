"""Offline datasets: MNIST (bundled), Fashion-MNIST, CIFAR-10.

Nothing is downloaded. Arrays are returned as numpy: images float32 in [0, 1]
(NHWC, or flattened to (N, H·W·C) for MLPs), labels int32.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = PROJECT_ROOT / "data" / "mnist"
FASHION_MNIST_DEBIAN_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/fashion-mnist"))
DATASETS = ("mnist", "fashion_mnist", "cifar10")

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# sha256 of the uncompressed IDX files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


class DataError(Exception):
    """A dataset is missing or corrupted; the message says how to fix it."""


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


# ------------------------------------------------------------------ IDX
def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an (uncompressed) IDX file: magic 0x0000 08 ndim, big-endian dims, uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic)")
    if raw[2] != 0x08:
        raise DataError(f"{name}: only unsigned-byte IDX files are supported (type code {raw[2]:#x})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"{name}: expected {count} bytes of data for shape {dims}, found {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_idx_file(directory: Path, stem: str, sha256: Optional[str]) -> np.ndarray:
    for candidate in (directory / (stem + ".gz"), directory / stem):
        if candidate.exists():
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError) as err:
                    raise DataError(f"{candidate}: corrupted gzip file ({err})") from None
            if sha256 is not None:
                got = hashlib.sha256(raw).hexdigest()
                if got != sha256:
                    raise DataError(
                        f"{candidate}: sha256 mismatch (expected {sha256}, got {got}); "
                        "the file is corrupted: restore it with `git checkout -- data/mnist`"
                    )
            return parse_idx(raw, str(candidate))
    raise FileNotFoundError(stem)


def load_idx_dataset(directory, sha256: Optional[dict] = None, what: str = "dataset", how: str = ""):
    """Load the four IDX files (gzipped or not) from `directory`.

    Returns (train_images, train_labels, test_images, test_labels) as uint8.
    """
    directory = Path(directory)
    out = []
    for stem in IDX_FILES.values():
        try:
            out.append(_read_idx_file(directory, stem, None if sha256 is None else sha256[stem]))
        except FileNotFoundError:
            raise DataError(f"{what}: {stem}[.gz] not found in {directory}. {how}") from None
    tr_x, tr_y, te_x, te_y = out
    for imgs, labels, split in ((tr_x, tr_y, "train"), (te_x, te_y, "test")):
        if imgs.ndim != 3 or labels.ndim != 1 or imgs.shape[0] != labels.shape[0]:
            raise DataError(f"{what}: inconsistent {split} shapes {imgs.shape} and {labels.shape}")
        if labels.max() > 9:
            raise DataError(f"{what}: {split} label {labels.max()} out of range 0..9")
    return tr_x, tr_y, te_x, te_y


# ------------------------------------------------------------------ CIFAR-10
def load_cifar10_batches(directory) -> tuple:
    """Read the standard `cifar-10-batches-py` pickles: data_batch_1..5 and test_batch.

    Returns (train_images, train_labels, test_images, test_labels), images uint8 NHWC.
    """
    directory = Path(directory)
    how = (
        "CIFAR-10 is not bundled and cannot be downloaded at run time: get "
        "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html), unpack it, "
        "and set config.data_dir to the cifar-10-batches-py folder."
    )
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise DataError(f"CIFAR-10: {', '.join(missing)} not found in {directory}. {how}")
    parts = []
    for n in names:
        with open(directory / n, "rb") as f:
            try:
                d = pickle.load(f, encoding="bytes")
            except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file
                raise DataError(f"CIFAR-10: cannot read {directory / n}: {err}") from None
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        if "data" not in d or "labels" not in d:
            raise DataError(f"CIFAR-10: {directory / n} lacks 'data' or 'labels'")
        data = np.asarray(d["data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"CIFAR-10: {directory / n} data has shape {data.shape}, expected (N, 3072)")
        imgs = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        parts.append((imgs, np.asarray(d["labels"], np.int64)))
    tr_x = np.concatenate([p[0] for p in parts[:5]])
    tr_y = np.concatenate([p[1] for p in parts[:5]])
    te_x, te_y = parts[5]
    if tr_y.min() < 0 or tr_y.max() > 9 or te_y.min() < 0 or te_y.max() > 9:
        raise DataError("CIFAR-10: labels out of range 0..9")
    return tr_x, tr_y, te_x, te_y


# ------------------------------------------------------------------ public
def _raw(name: str, data_dir: Optional[str]):
    if name == "mnist":
        directory = Path(data_dir) if data_dir else MNIST_DIR
        sha = MNIST_SHA256 if directory.resolve() == MNIST_DIR.resolve() else None
        how = "The project bundles MNIST in data/mnist; restore it with `git checkout -- data/mnist`."
        return load_idx_dataset(directory, sha, "MNIST", how)
    if name == "fashion_mnist":
        how = (
            "Install it with `apt-get install dataset-fashion-mnist` (Debian), or set "
            "config.data_dir to a folder holding the four Fashion-MNIST IDX files."
        )
        if data_dir:
            return load_idx_dataset(data_dir, None, "Fashion-MNIST", how)
        for d in FASHION_MNIST_DEBIAN_DIRS:
            if d.exists():
                return load_idx_dataset(d, None, "Fashion-MNIST", how)
        raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, FASHION_MNIST_DEBIAN_DIRS))}. {how}")
    if name == "cifar10":
        if not data_dir:
            raise DataError(
                "CIFAR-10 needs config.data_dir: the cifar-10-batches-py folder of the "
                "standard Python pickles (not bundled; download cifar-10-python.tar.gz and unpack it)."
            )
        return load_cifar10_batches(data_dir)
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def load_dataset(
    name: str,
    data_dir: Optional[str] = None,
    flatten: bool = True,
    normalize: bool = False,
    val_size: int = 0,
    seed: int = 0,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
) -> Dataset:
    """Load a dataset scaled to [0, 1] and split off a seeded validation set.

    flatten: (N, H·W·C) for MLPs, else NHWC. normalize: per-channel
    standardisation with training-set statistics. train_size/test_size keep
    the first examples (after the seeded shuffle of the training set).
    """
    tr_x, tr_y, te_x, te_y = _raw(name, data_dir)
    if tr_x.ndim == 3:
        tr_x, te_x = tr_x[..., None], te_x[..., None]
    tr_x = tr_x.astype(np.float32) / 255.0
    te_x = te_x.astype(np.float32) / 255.0
    if normalize:
        mean = tr_x.mean(axis=(0, 1, 2))
        std = tr_x.std(axis=(0, 1, 2))
        tr_x, te_x = (tr_x - mean) / std, (te_x - mean) / std
    perm = np.random.default_rng(seed).permutation(tr_x.shape[0])
    tr_x, tr_y = tr_x[perm], tr_y[perm]
    if not 0 <= val_size < tr_x.shape[0]:
        raise ValueError(f"val_size must be in [0, {tr_x.shape[0]}), got {val_size}")
    va_x, va_y = tr_x[:val_size], tr_y[:val_size]
    tr_x, tr_y = tr_x[val_size:], tr_y[val_size:]
    if train_size is not None:
        tr_x, tr_y = tr_x[:train_size], tr_y[:train_size]
    if test_size is not None:
        te_x, te_y = te_x[:test_size], te_y[:test_size]
    if flatten:
        tr_x, va_x, te_x = (a.reshape(a.shape[0], int(np.prod(a.shape[1:]))) for a in (tr_x, va_x, te_x))
    cast = lambda a: np.ascontiguousarray(a)  # noqa: E731
    return Dataset(cast(tr_x), tr_y.astype(np.int32), cast(va_x), va_y.astype(np.int32),
                   cast(te_x), te_y.astype(np.int32), 10)


def epoch_batches(key, n: int, batch_size: int):
    """Index arrays of one epoch's minibatches: a seeded permutation of range(n),
    cut into n // batch_size batches (the last partial batch is dropped)."""
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    import jax  # local: the loaders themselves need only numpy

    perm = jax.random.permutation(key, n)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n // batch_size)]


def check_finite(*arrays, names=None):
    """Raise ValueError naming the first array that holds NaN or inf."""
    for i, a in enumerate(arrays):
        if not np.all(np.isfinite(a)):
            label = names[i] if names else f"array {i}"
            raise ValueError(f"{label} contains NaN or inf")


