"""Offline datasets: MNIST (bundled), Fashion-MNIST, CIFAR-10, and a user's own `.npz` file.

Nothing is downloaded. Arrays are returned as numpy: features float32 (uint8
sources scaled to [0, 1]; NHWC images, or flattened to (N, H·W·C) for MLPs;
flat (N, D) features stay 2-D), labels int32 in 0..num_classes-1.
Every dataset is validated by `load_dataset` before it is returned: a bad
shape, label or NaN/inf is a `DataError` naming the file and the array.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = PROJECT_ROOT / "data" / "mnist"
FASHION_MNIST_DEBIAN_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/fashion-mnist"))
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")

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


class DataError(Exception):
    """A dataset is missing or corrupted; the message says how to fix it."""


class Dataset(NamedTuple):
    """What `load_dataset` returns: float32 features, int32 labels in 0..num_classes-1."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    fingerprint: str = ""  # `fingerprint` of the arrays as loaded (before any split, scaling or subset)


class RawData(NamedTuple):
    """A loader's output, before validation: arrays as stored, and what error messages name."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: Optional[int]  # None: max label + 1 over train and test
    source: str  # the file or folder the arrays came from


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


def _read_idx_file(directory: Path, stem: str, sha256: Optional[str], how: str = "") -> np.ndarray:
    """One IDX file, `stem.gz` or `stem`, decompressed, sha256-checked (when given) and parsed."""
    for candidate in (directory / (stem + ".gz"), directory / stem):
        if candidate.exists():
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    raw = gzip.decompress(raw)
                except (zlib.error, gzip.BadGzipFile, EOFError, OSError) as err:
                    raise DataError(f"{candidate}: corrupted gzip file ({type(err).__name__}: {err}). {how}") from None
            if sha256 is not None:
                got = hashlib.sha256(raw).hexdigest()
                if got != sha256:
                    raise DataError(f"{candidate}: sha256 mismatch (expected {sha256}, got {got}); "
                                    f"the file is corrupted. {how}")
            return parse_idx(raw, str(candidate))
    raise FileNotFoundError(stem)


def load_idx_dataset(directory, sha256: Optional[dict] = None, what: str = "dataset", how: str = ""):
    """Load the four IDX files (gzipped or not) from `directory`.

    Returns (train_images, train_labels, test_images, test_labels) as uint8;
    label ranges are checked by `load_dataset`.
    """
    directory = Path(directory)
    out = []
    for stem in IDX_FILES.values():
        try:
            out.append(_read_idx_file(directory, stem, None if sha256 is None else sha256[stem], how))
        except FileNotFoundError:
            raise DataError(f"{what}: {stem}[.gz] not found in {directory}. {how}") from None
    tr_x, tr_y, te_x, te_y = out
    for imgs, labels, split in ((tr_x, tr_y, "train"), (te_x, te_y, "test")):
        if imgs.ndim != 3 or labels.ndim != 1 or imgs.shape[0] != labels.shape[0]:
            raise DataError(f"{what}: inconsistent {split} shapes {imgs.shape} and {labels.shape}")
    return tr_x, tr_y, te_x, te_y


# ------------------------------------------------------------------ CIFAR-10
def load_cifar10_batches(directory) -> tuple:
    """Read the standard `cifar-10-batches-py` pickles: data_batch_1..5 and test_batch.

    Returns (train_images, train_labels, test_images, test_labels), images uint8
    NHWC; label ranges are checked by `load_dataset`.
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
    return tr_x, tr_y, te_x, te_y


# ------------------------------------------------------------------ npz
def load_npz(path) -> RawData:
    """Read a user's `.npz`: arrays x_train, y_train, x_test, y_test and an optional scalar num_classes.

    Pickled (object) arrays are refused; shapes, labels and values are checked by `load_dataset`.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; the 'npz' dataset reads data_file, an .npz file holding "
                        f"{', '.join(NPZ_ARRAYS)}")
    if not path.is_file():
        raise DataError(f"{path}: not found (the 'npz' dataset reads data_file, an .npz holding "
                        f"{', '.join(NPZ_ARRAYS)})")
    how = f"write it with np.savez(path, {', '.join(f'{n}=...' for n in NPZ_ARRAYS)})"
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError) as err:
        why = "an .npz is a zip file of .npy arrays" if not zipfile.is_zipfile(path) else f"{type(err).__name__}: {err}"
        raise DataError(f"{path}: not an .npz archive ({why}); {how}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, not an .npz archive; {how}")
    with archive:
        missing = [n for n in NPZ_ARRAYS if n not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)}; required: {', '.join(NPZ_ARRAYS)} "
                            f"(optional: num_classes); found: {', '.join(archive.files) or 'none'}")
        arrays = {}
        for name in NPZ_ARRAYS + (("num_classes",) if "num_classes" in archive.files else ()):
            try:
                arrays[name] = archive[name]
            except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError) as err:
                raise DataError(f"{path}: cannot read array {name} ({type(err).__name__}: {err}); "
                                "only numeric arrays are accepted, no pickled objects") from None
    num_classes = None
    if "num_classes" in arrays:
        k = arrays["num_classes"]
        if k.size != 1 or k.dtype.kind not in "iuf" or not float(k.item()).is_integer() or k.item() < 1:
            raise DataError(f"{path}: num_classes must be a positive integer scalar, got {k!r}")
        num_classes = int(k.item())
    return RawData(*(arrays[n] for n in NPZ_ARRAYS), num_classes=num_classes, source=str(path))


# ------------------------------------------------------------------ registry
def _folder(what: str, data_dir: Optional[str], data_file: Optional[str]) -> Optional[Path]:
    """The folder a folder-based dataset reads (None: its default); a data_file is an error."""
    if data_file:
        raise DataError(f"{what} reads a folder (data_dir), not data_file={data_file!r}; "
                        "data_file is for the 'npz' dataset")
    return Path(data_dir) if data_dir else None


def _load_mnist(data_dir: Optional[str], data_file: Optional[str]) -> RawData:
    """MNIST from data_dir, or the bundled data/mnist (sha256-checked); 10 classes."""
    directory = _folder("MNIST", data_dir, data_file) or MNIST_DIR
    if directory.resolve() == MNIST_DIR.resolve():
        sha = MNIST_SHA256
        how = "The project bundles MNIST in data/mnist; restore it with `git checkout -- data/mnist`."
    else:
        sha, how = None, "Point data_dir at a folder with good copies of the four MNIST IDX files, or leave it empty."
    return RawData(*load_idx_dataset(directory, sha, "MNIST", how), num_classes=10, source=f"MNIST ({directory})")


def _load_fashion_mnist(data_dir: Optional[str], data_file: Optional[str]) -> RawData:
    """Fashion-MNIST from data_dir, or from Debian's dataset-fashion-mnist package; 10 classes."""
    how = (
        "Install it with `apt-get install dataset-fashion-mnist` (Debian), or set "
        "config.data_dir to a folder holding the four Fashion-MNIST IDX files."
    )
    directory = _folder("Fashion-MNIST", data_dir, data_file)
    if directory is None:
        directory = next((d for d in FASHION_MNIST_DEBIAN_DIRS if d.exists()), None)
        if directory is None:
            raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, FASHION_MNIST_DEBIAN_DIRS))}. {how}")
    return RawData(*load_idx_dataset(directory, None, "Fashion-MNIST", how), num_classes=10,
                   source=f"Fashion-MNIST ({directory})")


def _load_cifar10(data_dir: Optional[str], data_file: Optional[str]) -> RawData:
    """CIFAR-10 from the cifar-10-batches-py folder data_dir; 10 classes."""
    directory = _folder("CIFAR-10", data_dir, data_file)
    if directory is None:
        raise DataError(
            "CIFAR-10 needs config.data_dir: the cifar-10-batches-py folder of the "
            "standard Python pickles (not bundled; download cifar-10-python.tar.gz and unpack it)."
        )
    return RawData(*load_cifar10_batches(directory), num_classes=10, source=f"CIFAR-10 ({directory})")


def _load_npz_file(data_dir: Optional[str], data_file: Optional[str]) -> RawData:
    """A user's .npz file data_file (see `load_npz`); classes from its num_classes or its labels."""
    if not data_file:
        raise DataError(f"the 'npz' dataset needs data_file: the path of an .npz holding {', '.join(NPZ_ARRAYS)}")
    if data_dir:
        raise DataError(f"the 'npz' dataset reads data_file={data_file!r} only; data_dir={data_dir!r} must be empty")
    return load_npz(data_file)


# Every dataset: its name and its loader (data_dir, data_file) -> RawData.
LOADERS = {
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "npz": _load_npz_file,
}
DATASETS = tuple(LOADERS)


# ------------------------------------------------------------------ validation
def _features(a: np.ndarray) -> np.ndarray:
    """float32 features: uint8 scaled by 1/255, any other numeric dtype converted as is."""
    with np.errstate(over="ignore"):  # an overflow to inf is reported by _validated
        out = a.astype(np.float32)
    if a.dtype == np.uint8:
        out /= 255.0
    return out


def _validated(raw: RawData) -> RawData:
    """Check a loader's arrays; return float32 features, int32 labels and the number of classes.

    Raises DataError naming `raw.source` and the array for non-numeric dtypes,
    bad or empty shapes, x/y length or train/test feature-shape mismatches,
    labels that are not integers in 0..num_classes-1, and NaN/inf features.
    """
    src = raw.source
    arrays = {n: getattr(raw, n) for n in NPZ_ARRAYS}
    for name, a in arrays.items():
        if a.dtype.kind not in "iuf":
            raise DataError(f"{src}: {name} has non-numeric dtype {a.dtype}; integer or float arrays are required")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if not 2 <= x.ndim <= 4:
            raise DataError(f"{src}: x_{split} has shape {x.shape}; expected flat features (N, D) "
                            "or images (N, H, W) / (N, H, W, C)")
        if y.ndim != 1:
            raise DataError(f"{src}: y_{split} has shape {y.shape}; expected class indices of shape (N,)")
        if x.size == 0:
            raise DataError(f"{src}: x_{split} is empty (shape {x.shape})")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{src}: x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]} labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{src}: x_train examples have shape {arrays['x_train'].shape[1:]} but x_test examples "
                        f"have shape {arrays['x_test'].shape[1:]}")
    for name in ("y_train", "y_test"):
        y = arrays[name]
        if y.dtype.kind == "f":
            bad = ~np.isfinite(y) | (y != np.round(y))
            if bad.any():
                raise DataError(f"{src}: {name} holds non-integer label {y[bad][0]}; labels must be class indices")
        if y.min() < 0:
            raise DataError(f"{src}: {name} has negative label {y.min():g}")
    num_classes = raw.num_classes
    inferred = num_classes is None
    if inferred:
        num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    if num_classes > np.iinfo(np.int32).max:
        raise DataError(f"{src}: {num_classes} classes do not fit int32 labels")
    present = np.unique(arrays["y_train"])
    if inferred and present.size < num_classes:
        absent = np.setdiff1d(np.arange(min(num_classes, int(present.size) + 10)), present)[:10]
        shown = ", ".join(f"{k:g}" for k in absent) + (", …" if num_classes - present.size > absent.size else "")
        raise DataError(f"{src}: the labels imply {num_classes} classes (0..{num_classes - 1}), but "
                        f"{num_classes - present.size} of them have no training example ({shown}); relabel the "
                        "classes 0..K−1, or store a num_classes array to keep classes without examples")
    for name in ("y_train", "y_test"):
        if arrays[name].max() >= num_classes:
            raise DataError(f"{src}: {name} has label {arrays[name].max():g} out of range 0..{num_classes - 1}")
    features = {}
    for name in ("x_train", "x_test"):
        features[name] = _features(arrays[name])
        if arrays[name].dtype.kind != "f":
            continue  # integers are finite, and so are they as float32
        finite = np.isfinite(features[name]).reshape(len(features[name]), -1).all(axis=1)
        if not finite.all():
            raise DataError(f"{src}: {name} holds NaN or inf (as float32), first in example {np.argmin(finite)}")
    return RawData(features["x_train"], arrays["y_train"].astype(np.int32), features["x_test"],
                   arrays["y_test"].astype(np.int32), num_classes, src)


def fingerprint(raw: RawData) -> str:
    """sha256 of a loader's arrays (dtype, shape and bytes of x_train, y_train, x_test, y_test) and class count:
    what a run's checkpoint and summary record, so a result is never reused for other data."""
    h = hashlib.sha256()
    for name in NPZ_ARRAYS:
        a = np.ascontiguousarray(getattr(raw, name))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    h.update(f"num_classes:{raw.num_classes}".encode())
    return h.hexdigest()


def _load_checked(name: str, data_dir: Optional[str], data_file: Optional[str]) -> tuple[RawData, RawData]:
    """(the loader's arrays as stored, `_validated` of them) of dataset `name`."""
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    raw = LOADERS[name](data_dir, data_file)
    return raw, _validated(raw)


# ------------------------------------------------------------------ public
def load_dataset(
    name: str,
    data_dir: Optional[str] = None,
    flatten: bool = True,
    normalize: bool = False,
    val_size: int = 0,
    seed: int = 0,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
    data_file: Optional[str] = None,
) -> Dataset:
    """Load and validate a dataset, and split off a seeded validation set.

    name: one of DATASETS; "npz" reads `data_file` (see `load_npz`), the others
    `data_dir` (empty: the bundled or installed copy). Features are float32:
    uint8 sources are scaled by 1/255 to [0, 1], float (or other integer)
    features are kept as given. num_classes is the dataset's (10 for MNIST,
    Fashion-MNIST and CIFAR-10), an npz's `num_classes` array, or else its
    max label + 1. flatten: (N, H·W·C) for MLPs, else NHWC images; flat
    (N, D) features stay (N, D). normalize: per-channel (per-feature for flat
    features) standardisation with training-set statistics; a constant
    channel is only centred. train_size/test_size keep the first examples
    (after the seeded shuffle of the training set).
    """
    for key, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and size < 1:
            raise ValueError(f"{key} must be at least 1 (or None for all examples), got {size}")
    raw, checked = _load_checked(name, data_dir, data_file)
    tr_x, tr_y, te_x, te_y, num_classes, _ = checked
    sha = fingerprint(raw)
    if tr_x.ndim == 3:
        tr_x, te_x = tr_x[..., None], te_x[..., None]
    if normalize:
        axes = tuple(range(tr_x.ndim - 1))
        mean = tr_x.mean(axis=axes)
        std = tr_x.std(axis=axes)
        std = np.where(std > 0, std, np.float32(1.0))
        tr_x, te_x = (tr_x - mean) / std, (te_x - mean) / std
    perm = np.random.default_rng(seed).permutation(tr_x.shape[0])
    tr_x, tr_y = tr_x[perm], tr_y[perm]
    if not 0 <= val_size < tr_x.shape[0]:
        raise ValueError(f"val_size must be in [0, {tr_x.shape[0]}), got {val_size}")
    va_x, va_y = tr_x[:val_size], tr_y[:val_size]
    tr_x, tr_y = tr_x[val_size:], tr_y[val_size:]
    for key, size, available in (("train_size", train_size, tr_x.shape[0]), ("test_size", test_size, te_x.shape[0])):
        if size is not None and size > available:
            raise ValueError(f"{key}={size} exceeds the {available} {key[:-5]} examples of {raw.source}"
                             + (f" left after val_size={val_size}" if key == "train_size" and val_size else ""))
    if train_size is not None:
        tr_x, tr_y = tr_x[:train_size], tr_y[:train_size]
    if test_size is not None:
        te_x, te_y = te_x[:test_size], te_y[:test_size]
    if flatten:
        tr_x, va_x, te_x = (a.reshape(a.shape[0], int(np.prod(a.shape[1:]))) for a in (tr_x, va_x, te_x))
    cast = np.ascontiguousarray
    return Dataset(cast(tr_x), cast(tr_y), cast(va_x), cast(va_y), cast(te_x), cast(te_y), num_classes, sha)


def dataset_fingerprint(name: str, data_dir: Optional[str] = None, data_file: Optional[str] = None) -> str:
    """`fingerprint` of a dataset's arrays, after the same checks as `load_dataset` (a bad file is the same
    `DataError`): what a finished run recorded, to compare before its result is reused."""
    return fingerprint(_load_checked(name, data_dir, data_file)[0])
