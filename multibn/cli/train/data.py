"""The data of ``multibn train``: Fashion-MNIST IDX files, the shipped default digits, the synthetic regressions.

Nothing is downloaded. :func:`load_fashion_mnist` reads the four standard IDX files from a directory (gzipped or
raw) and validates them; :func:`load_digits28` is the offline default: the 8x8 UCI digits that ship with
scikit-learn, resized to 28x28, with a fixed stratified split.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: IDX type code -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: split -> (images file, labels file), without the optional ``.gz``
FASHION_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist"


@dataclass(frozen=True)
class Dataset:
    """Arrays of one experiment: inputs float32, targets int64 (classes) or float32 (regression, shape (n, 1))."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def subset(self, n_train: int, n_test: int) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (the splits are already shuffled)."""
        return Dataset(f"{self.name} (subset {min(n_train, len(self.x_train))}/{min(n_test, len(self.x_test))})",
                       self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test], self.y_test[:n_test])


# ---- IDX ----------------------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":  # not gzip: a raw IDX file, whatever its name
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a truncated stream is an EOFError
        raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """The array stored in the IDX bytes ``data``; ValueError naming ``name`` if they are malformed."""
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES:
        raise ValueError(
            f"{name}: not an IDX file: magic number {data[:4].hex()} (expected 0000 followed by a type code in "
            f"{', '.join(f'{c:02x}' for c in IDX_DTYPES)} and the number of dimensions)"
        )
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header: {len(data)} bytes, the {ndim} dimensions need {header}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{name}: {what}: {len(data)} bytes, but its header (shape {shape}, {dtype.str[1:]}) needs {expected}"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array in an IDX file (gzipped or raw); ValueError on a corrupt, truncated or malformed file."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory}: neither {stem}.gz nor {stem} is there. multibn train downloads nothing: put the four "
        f"Fashion-MNIST IDX files ({', '.join(f for pair in FASHION_FILES.values() for f in pair)}, gzipped or "
        f"not) in one directory (they are at {FASHION_URL}), or leave out --data to use the shipped digits"
    )


def load_idx_pair(directory: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (n, 28, 28), labels int64 (n,))`` of one Fashion-MNIST split, validated."""
    directory = Path(directory)
    img_stem, lbl_stem = FASHION_FILES[split]
    img_path, lbl_path = _find(directory, img_stem), _find(directory, lbl_stem)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected uint8 images of shape (n, 28, 28), got {images.dtype} "
                         f"{images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{lbl_path}: expected a uint8 vector of labels, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{lbl_path}: labels must be 0..9, found {int(labels.max())}")
    return images, labels.astype(np.int64)


def load_fashion_mnist(directory: str | os.PathLike[str]) -> Dataset:
    """Fashion-MNIST (or MNIST: same files) from ``directory``: NCHW float32 in [0, 1], int64 labels."""
    splits = {s: load_idx_pair(directory, s) for s in FASHION_FILES}
    arrays = [a for s in ("train", "test") for a in (splits[s][0][:, None].astype(np.float32) / 255, splits[s][1])]
    return Dataset(f"IDX files in {directory}", *arrays)


# ---- the shipped default: scikit-learn's 8x8 digits at 28x28 -----------------------------------------------------
def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) matrix of 1-D linear interpolation with pixel centres aligned (half-pixel offsets)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    a = np.zeros((n_out, n_in))
    np.add.at(a, (np.arange(n_out), lo), 1 - (pos - lo))
    np.add.at(a, (np.arange(n_out), hi), pos - lo)
    return a


def resize_digits(images: np.ndarray, box: int = 20, size: int = 28) -> np.ndarray:
    """8x8 images (values 0..16) -> (n, 1, size, size) float32 in [0, 1]: bilinear to ``box`` x ``box``, centred
    in a ``size`` x ``size`` frame (the layout of MNIST: a 20x20 digit in a 28x28 image)."""
    a = _bilinear(images.shape[-1], box)
    scaled = np.einsum("ij,njk,lk->nil", a, images.astype(np.float64) / 16.0, a)
    out = np.zeros((len(images), 1, size, size), np.float32)
    off = (size - box) // 2
    out[:, 0, off:off + box, off:off + box] = scaled
    return out


def load_digits28(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 UCI digits resized to 28x28: a stratified split (``test_fraction`` of every class to
    the test set) and a shuffled order, both fixed by ``seed``. Needs scikit-learn (``pip install
    'multibn[train]'``); reads only the copy installed with it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the default data of multibn train (the 8x8 digits shipped with scikit-learn) needs scikit-learn: "
            "pip install 'multibn[train]', or give Fashion-MNIST IDX files with --data DIR"
        ) from e
    digits = load_digits()
    x, y = resize_digits(digits.images), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(test_fraction * len(idx))]] = True
    tr, te = rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))
    return Dataset("scikit-learn digits, 8x8 resized to 28x28", x[tr], y[tr], x[te], y[te])


# ---- synthetic regressions -----------------------------------------------------------------------------------------
def square_regression(seed: int, n_train: int = 1000, n_test: int = 100) -> Dataset:
    """The textbook's ``y = x^2 + N(0, 1)`` on ``x ~ U[-5, 5]`` (float32, shapes (n, 1))."""
    rng = np.random.default_rng([seed, 2])
    x = rng.uniform(-5.0, 5.0, size=(n_train + n_test, 1))
    y = x**2 + rng.normal(size=x.shape)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return Dataset("y = x^2 + N(0, 1), x ~ U[-5, 5]", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def placement_regression(seed: int, n_train: int = 2000, n_test: int = 500, features: int = 8) -> Dataset:
    """A smooth nonlinear regression on 8 correlated, unnormalised inputs (float32): ``y = sin(u) + 0.5 v^2 +
    0.1 N(0, 1)`` with ``u, v`` two fixed projections of ``x``."""
    rng = np.random.default_rng([seed, 3])
    mix = rng.normal(size=(features, features)) / np.sqrt(features)
    x = 2.0 * rng.normal(size=(n_train + n_test, features)) @ mix + 1.0
    w = rng.normal(size=(features, 2)) / np.sqrt(features)
    u, v = (x @ w).T
    y = (np.sin(u) + 0.5 * v**2 + 0.1 * rng.normal(size=u.shape))[:, None]
    x, y = x.astype(np.float32), y.astype(np.float32)
    return Dataset("y = sin(u) + v^2/2 + noise on 8 inputs", x[:n_train], y[:n_train], x[n_train:], y[n_train:])
