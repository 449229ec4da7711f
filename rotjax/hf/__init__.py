"""Hugging Face interop: load BERT, RoBERTa, ViT, DeBERTa-v2/v3 and LLaMA-style (Llama, Mistral,
Qwen2) checkpoints into rotjax, and save them back.

`load` reads a checkpoint directory (or an in-memory ``transformers`` PyTorch model) into a
rotjax config and Flax params; `save` writes a directory that ``transformers``'
``from_pretrained`` loads with no missing or unexpected keys. Both go through one table
(``_mapping``) of ``(rotjax path, Hugging Face name, layout conversion)`` rows.
`transformers_config` gives the ``transformers`` config of a rotjax config,
`vit_image_processor` the image processor of a ViT trained on `rotjax.models.vit.image_pixels`;
`stack_layers` / `unstack_layers` are aliases of `rotjax.models.stack_layers` /
`unstack_layers`, which go between the unscanned and scanned params layouts.
"""

from rotjax.hf._files import TOKENIZER_FILES
from rotjax.hf._load import DroppedHeadWarning, load, load_for_task
from rotjax.hf._save import (
    NotCopiedWarning,
    module_weights,
    save,
    transformers_config,
    vit_image_processor,
)
from rotjax.models import stack_layers, unstack_layers  # aliases (README); home: rotjax.models

__all__ = [
    "TOKENIZER_FILES",
    "DroppedHeadWarning",
    "NotCopiedWarning",
    "load",
    "load_for_task",
    "module_weights",
    "save",
    "stack_layers",
    "transformers_config",
    "unstack_layers",
    "vit_image_processor",
]
