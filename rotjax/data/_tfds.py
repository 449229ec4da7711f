"""Image datasets prepared by TensorFlow Datasets, read without TensorFlow."""

from __future__ import annotations

import os

import numpy as np
from numpy.typing import DTypeLike

from rotjax.data._common import DataSourceError, Splits
from rotjax.data._images import ImageDataset, make_splits

TFDS_IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10")
"""Names :func:`tfds_images` accepts."""


def tfds_images(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    validation_size: int = 0,
    seed: int = 0,
    dtype: DTypeLike = np.uint8,
) -> Splits[ImageDataset]:
    """An image dataset prepared by TensorFlow Datasets, read with ``tfds.data_source``.

    Reading needs no TensorFlow, but the dataset must already be prepared in the
    ``array_record`` format under ``data_dir``; nothing is downloaded.

    Args:
        name: One of ``TFDS_IMAGE_DATASETS``: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``.
        data_dir: TFDS data directory; ``None`` uses TFDS's default (``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).
        validation_size: Training examples to move into a stratified validation split.
        seed: Seed of the validation carve-out.
        dtype: ``np.uint8`` (``[0, 255]``) or ``np.float32`` (``[0, 1]``).

    Returns:
        ``Splits(train, validation, test)`` from TFDS's ``train`` and ``test`` splits.

    Raises:
        ValueError: If ``name`` is not supported.
        DataSourceError: If tensorflow-datasets is missing or the dataset is not prepared.
    """
    if name not in TFDS_IMAGE_DATASETS:
        raise ValueError(f"tfds_images supports {TFDS_IMAGE_DATASETS}, got {name!r}")
    where = "TFDS's default data_dir" if data_dir is None else f"data_dir {data_dir}"
    hint = (
        f"Prepare it once in the array_record format on a machine with network access and "
        f"tensorflow: `tfds build {name} --file_format=array_record --data_dir DIR`, then copy "
        f"DIR here and pass data_dir=DIR (or set TFDS_DATA_DIR)."
    )
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataSourceError(
            f"tfds_images needs tensorflow-datasets ({e}). Install it with "
            "`pip install tensorflow-datasets`."
        ) from e
    try:
        # Explicit split names: under `tfds.testing.mock_data` the split list is unknown.
        sources = tfds.data_source(
            name,
            split={"train": "train", "test": "test"},
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
        )
    except Exception as e:  # tfds raises assorted types (NotImplementedError, ValueError...)
        raise DataSourceError(
            f"TFDS dataset {name!r} is not prepared in the array_record format in {where} "
            f"(tfds says: {e})\n{hint}"
        ) from e
    label_names = tuple(sources["train"].dataset_info.features["label"].names)
    splits = {}
    for split, source in sources.items():
        try:
            # Item by item: the batched `__getitems__` is broken under tfds 4.9's mock_data.
            items = [source[i] for i in range(len(source))]
        except Exception as e:
            raise DataSourceError(
                f"TFDS dataset {name}/{split} in {where} is unreadable: {e}\n{hint}"
            ) from e
        if not items:
            raise DataSourceError(f"TFDS dataset {name}/{split} in {where} is empty.\n{hint}")
        images = np.stack([np.asarray(item["image"], np.uint8) for item in items])
        labels = np.asarray([item["label"] for item in items], np.int32)
        if labels.min() < 0 or labels.max() >= len(label_names):
            raise DataSourceError(
                f"TFDS dataset {name}/{split} in {where} has labels outside "
                f"[0, {len(label_names)}).\n{hint}"
            )
        splits[split] = (images, labels)
    return make_splits(
        name,
        splits["train"],
        splits["test"],
        label_names,
        validation_size=validation_size,
        seed=seed,
        dtype=dtype,
    )
