"""Input pipelines returning numpy arrays: image and text datasets, and minibatches.

Every source is offline and deterministic: a missing, unreadable or corrupt source raises
:class:`DataSourceError` saying how to get it, never a silent fallback.
"""

from rotjax.data._batches import (
    IGNORE_LABEL,
    batch_indices,
    batches,
    check_labels,
    concat,
    epoch_order,
    num_batches,
    steps_per_epoch,
    train_batches,
    trim_padding,
)
from rotjax.data._common import DataSourceError, Splits
from rotjax.data._images import (
    DIGIT_LABELS,
    DIGITS_TEST_SIZE,
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    MNIST_SAMPLE_TEST_SIZE,
    ImageDataset,
    digits,
    fashion_mnist,
    mnist_sample,
)
from rotjax.data._supersense import SUPERSENSE_DOMAINS, supersense_tags, wordnet_supersense
from rotjax.data._text import (
    SPLIT_PERCENT,
    WORDNET_LABELS,
    TextDataset,
    wordnet_examples,
    wordnet_glosses,
)
from rotjax.data._tfds import TFDS_IMAGE_DATASETS, tfds_images
from rotjax.data._tokenize import default_cache_dir, minilm_dir, tokenize
from rotjax.data._wordnet import LEXNAMES, WORDNET_DIR, Synset, read_synsets

__all__ = [
    "DIGITS_TEST_SIZE",
    "DIGIT_LABELS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "IGNORE_LABEL",
    "LEXNAMES",
    "MNIST_SAMPLE_TEST_SIZE",
    "SPLIT_PERCENT",
    "SUPERSENSE_DOMAINS",
    "TFDS_IMAGE_DATASETS",
    "WORDNET_DIR",
    "WORDNET_LABELS",
    "DataSourceError",
    "ImageDataset",
    "Splits",
    "Synset",
    "TextDataset",
    "batch_indices",
    "batches",
    "check_labels",
    "concat",
    "default_cache_dir",
    "digits",
    "epoch_order",
    "fashion_mnist",
    "minilm_dir",
    "mnist_sample",
    "num_batches",
    "read_synsets",
    "steps_per_epoch",
    "supersense_tags",
    "tfds_images",
    "tokenize",
    "train_batches",
    "trim_padding",
    "wordnet_examples",
    "wordnet_glosses",
    "wordnet_supersense",
]
