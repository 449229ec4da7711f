"""Hugging Face interop: load BERT, RoBERTa and ViT checkpoints into rotjax, and save them back.

`load` reads a checkpoint directory (or an in-memory ``transformers`` PyTorch model) into a
rotjax config and Flax params; `save` writes a directory that ``transformers``'
``from_pretrained`` loads with no missing or unexpected keys. Both go through one table
(``_mapping``) of ``(rotjax path, Hugging Face name, layout conversion)`` rows.
`transformers_config` gives the ``transformers`` config of a rotjax config;
`stack_layers` / `unstack_layers` go between the unscanned and scanned params layouts.
"""

from rotjax.hf._io import TOKENIZER_FILES, load, save, transformers_config
from rotjax.hf._layout import stack_layers, unstack_layers

__all__ = [
    "TOKENIZER_FILES",
    "load",
    "save",
    "stack_layers",
    "transformers_config",
    "unstack_layers",
]
