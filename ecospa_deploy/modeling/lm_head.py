"""The causal-LM head shared by every family: logits of the kept positions, optional loss."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .kv_cache import cache_kwargs, output_cache


def causal_lm_output(model: Any, out: BaseModelOutputWithPast, labels: torch.Tensor | None,
                     logits_to_keep: int | torch.Tensor, **kwargs: Any) -> CausalLMOutputWithPast:
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = model.lm_head(out.last_hidden_state[:, keep, :])
    loss = None
    if labels is not None:
        loss = model.loss_function(logits=logits, labels=labels,
                                   vocab_size=model.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_kwargs(output_cache(out)))
