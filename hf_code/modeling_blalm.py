"""
An exported BLaLM as a transformers model, from_pretrained(folder, trust_remote_code=True) with
  AutoModelForCausalLM                -> BLaLMForCausalLM: logits (and the loss of labels)
  AutoModel                           -> BLaLMModel: last_hidden_state, hidden_states when asked
  AutoModelForSequenceClassification  -> BLaLMForSequenceClassification: a linear head on the last real token
A thin wrapper: the model is blalm.BLaLM (copied beside this file), its weights under the prefix "blalm.".
Copied into every folder that export.py writes.

Padding goes on the right (every mixer is causal: padding after the real tokens cannot change their
states). attention_mask may be (B, S), 1 = real token, or (B, S, S), a causal mask over the same tokens
(mask[b, i, j] = real[b, j] for j <= i, else 0: what the BabyLM pipeline's fine-tuning passes with --causal);
anything else is refused with an error. With a mask, the states at the padded positions are set to the
last real token's, so position -1 holds every row's last real state.
"""

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput

from .blalm import BLaLM
from .configuration_blalm import BLaLMHFConfig

if TYPE_CHECKING:  # never run: transformers < 5 copies out of a local folder only the files that this file
    # imports relatively, and blalm.py imports these (the Triton kernels only where they run: they need triton)
    from .conv_triton import short_conv
    from .decode import StaticCache
    from .hedgehog import linear_attention_chunkwise
    from .mlstm_triton import mlstm_chunkwise_triton


def real_lengths(attention_mask, input_ids):
    """attention_mask (B, S) or (B, S, S) -> (B,) number of real tokens per row, or None without a mask.
    Refuses left padding, a row without real tokens and a 3-D mask that is not causal over right padding."""
    if attention_mask is None:
        return None
    B, S = input_ids.shape
    mask = attention_mask.bool()
    if mask.dim() == 3 and mask.shape == (B, S, S):
        real = mask[:, -1, :]  # the last query row sees every real token
        causal = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        if not torch.equal(mask, real[:, None, :] & causal):
            raise ValueError("a (B, S, S) attention_mask must be causal over right-padded tokens: mask[b, i, j] = "
                             "real[b, j] for j <= i, else 0; BLaLM is causal itself, so pass the (B, S) mask")
        mask = real
    if mask.shape != (B, S):
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}; expected (B, S) = {(B, S)} or "
                         f"(B, S, S) for input_ids of shape {(B, S)}")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("attention_mask has padding before real tokens; BLaLM takes right padding only "
                         "(tokenizer.padding_side = 'right')")
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"attention_mask row(s) {(lengths == 0).nonzero()[:, 0].tolist()} have no real token")
    return lengths


class BLaLMPreTrainedModel(PreTrainedModel):
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

    def _init_weights(self, module):
        pass  # BLaLM initialises itself; from_pretrained then loads every weight (a new head: its own class)

    def get_input_embeddings(self):
        return self.blalm.transformer.wte

    def hidden_states(self, input_ids, lengths=None):
        """input_ids (B, S) -> the residual stream after the embeddings and after each block, the last one
        through the final layer norm (GPT-2's convention: n_layer + 1 states, the last = last_hidden_state).
        lengths: each row's real tokens; the states past them are set to the last real one's."""
        model, (B, S) = self.blalm, input_ids.shape
        states = [model.embed(input_ids)]
        for block in model.transformer.h:
            states.append(block(states[-1]))
        states[-1] = model.transformer.ln_f(states[-1])
        if lengths is not None:
            last = torch.minimum(torch.arange(S, device=input_ids.device), lengths[:, None] - 1)  # (B, S)
            states = [h.gather(1, last[..., None].expand(B, S, h.size(-1))) for h in states]
        return states


class BLaLMModel(BLaLMPreTrainedModel):
    """The base model: forward(input_ids, attention_mask=None, output_hidden_states=False) ->
    BaseModelOutput(last_hidden_state (B, S, n_embd), hidden_states (n_layer + 1 of them) when asked)."""

    def __init__(self, config):
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **kwargs):
        states = self.hidden_states(input_ids, real_lengths(attention_mask, input_ids))
        all_states = tuple(states) if output_hidden_states else None
        if return_dict is False:
            return (states[-1],) + ((all_states,) if all_states else ())
        return BaseModelOutput(last_hidden_state=states[-1], hidden_states=all_states)


class BLaLMForSequenceClassification(BLaLMPreTrainedModel):
    """A linear head (config.num_labels outputs, no bias, as GPT-2's) on the last real token's final state.
    labels (B,): cross-entropy (num_labels > 1) or mean squared error (num_labels == 1)."""

    def __init__(self, config):
        super().__init__(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if module is self.score:  # the one weight a checkpoint of the language model does not hold
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        lengths = real_lengths(attention_mask, input_ids)
        # the states past each row's real tokens are filled in only when they are returned
        states = self.hidden_states(input_ids, lengths if output_hidden_states else None)
        last = states[-1][:, -1] if lengths is None else states[-1][torch.arange(len(lengths)), lengths - 1]
        logits = self.score(last.to(self.score.weight.dtype))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1).float(), labels.float()) if self.config.num_labels == 1 else
                    F.cross_entropy(logits.float(), labels))
        all_states = tuple(states) if output_hidden_states else None
        if return_dict is False:
            out = (logits,) + ((all_states,) if all_states else ())
            return out if loss is None else (loss,) + out
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=all_states)


class BLaLMForCausalLM(BLaLMPreTrainedModel):

    def __init__(self, config):
        super().__init__(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.blalm.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab) in float32 at least; loss when labels (B, T) are given:
        position t predicts labels[:, t + 1] (labels are the inputs, shifted here, as in transformers; -100 =
        ignore). attention_mask may only mark right padding: every mixer is causal, so padding after the real
        tokens cannot change their logits; left padding would, and is refused (real_lengths)."""
        real_lengths(attention_mask, input_ids)
        logits, _ = self.blalm(input_ids)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutput(loss=loss, logits=logits)
