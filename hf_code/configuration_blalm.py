"""
The Hugging Face config of an exported BLaLM: the fields of blalm.BLaLMConfig, flat in config.json, beside
transformers' own keys. Copied into every folder that export.py writes (never imported from the repository:
its relative imports need the folder's copy of blalm.py).
"""

from dataclasses import fields
from typing import TYPE_CHECKING

from transformers import PretrainedConfig

from .blalm import BLaLMConfig

if TYPE_CHECKING:  # never run: transformers < 5 copies out of a local folder only the files that this file
    # imports relatively, and blalm.py imports these (the Triton kernels only where they run: they need triton)
    from .conv_triton import short_conv
    from .decode import StaticCache
    from .hedgehog import linear_attention_chunkwise
    from .mlstm_triton import mlstm_chunkwise_triton


class BLaLMHFConfig(PretrainedConfig):
    model_type = "blalm"
    # transformers' names of the sizes (the BabyLM pipeline's fine-tuning reads config.hidden_size)
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}

    def __init__(self, **kwargs):
        ours = {f.name: kwargs.pop(f.name, f.default) for f in fields(BLaLMConfig)}
        kwargs.setdefault("tie_word_embeddings", True)  # lm_head.weight is the embedding matrix
        super().__init__(**kwargs)
        for name, value in ours.items():  # after super(): transformers >= 5 resets its own fields there
            setattr(self, name, value)

    def blalm_config(self):
        return BLaLMConfig(**{f.name: getattr(self, f.name) for f in fields(BLaLMConfig)})
