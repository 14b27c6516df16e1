"""
An exported BLaLM as a transformers model: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
A thin wrapper: the model is blalm.BLaLM (copied beside this file), its weights under the prefix "blalm.".
Copied into every folder that export.py writes.
"""

from typing import TYPE_CHECKING

import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .blalm import BLaLM
from .configuration_blalm import BLaLMHFConfig

if TYPE_CHECKING:  # never run: transformers < 5 copies out of a local folder only the files that this file
    # imports relatively, and blalm.py imports these (the Triton kernels only where they run: they need triton)
    from .conv_triton import short_conv
    from .decode import StaticCache
    from .hedgehog import linear_attention_chunkwise
    from .mlstm_triton import mlstm_chunkwise_triton


class BLaLMForCausalLM(PreTrainedModel):
    config_class = BLaLMHFConfig
    base_model_prefix = "blalm"
    # lm_head.weight is the embedding matrix: stored once, tied on load. A {target: source} dict is what
    # transformers >= 5 reads; earlier versions iterate its keys (the names that may be missing) and tie
    # through get_input_embeddings / get_output_embeddings
    _tied_weights_keys = {"blalm.lm_head.weight": "blalm.transformer.wte.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.blalm = BLaLM(config.blalm_config())
        self.post_init()

    def _init_weights(self, module):
        pass  # BLaLM initialises itself; from_pretrained then loads every weight

    def get_input_embeddings(self):
        return self.blalm.transformer.wte

    def get_output_embeddings(self):
        return self.blalm.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab) in float32 at least; loss when labels (B, T) are given:
        position t predicts labels[:, t + 1] (labels are the inputs, shifted here, as in transformers; -100 =
        ignore). attention_mask may only mark right padding: every mixer is causal, so padding after the real
        tokens cannot change their logits; left padding would, and is refused."""
        if attention_mask is not None:
            real = attention_mask.bool()
            if (real[:, 1:] & ~real[:, :-1]).any():
                raise ValueError("attention_mask has padding before real tokens; BLaLM takes right padding only "
                                 "(tokenizer.padding_side = 'right')")
        logits, _ = self.blalm(input_ids)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutput(loss=loss, logits=logits)
