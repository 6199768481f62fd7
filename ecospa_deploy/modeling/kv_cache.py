"""KV-cache plumbing shared by every family, across the transformers versions we support.

transformers 5.24 renamed ``past_key_values`` to ``cache``: the models' argument, the argument of
``create_causal_mask`` and the field of the output classes. ``generate`` passes the installed
version's spelling, so a model that knows only one of them silently runs without its cache on the
other (every step recomputes from the last token alone). Our models accept both spellings and
speak the installed version's spelling back to transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask

CACHE_KWARG = ("cache" if "cache" in inspect.signature(create_causal_mask).parameters
               else "past_key_values")


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` under the installed transformers' spelling, for any HF call or output."""
    return {CACHE_KWARG: cache}


def output_cache(out: Any) -> Cache | None:
    """The cache a model output carries, under either spelling."""
    return getattr(out, CACHE_KWARG)


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once: as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def start_decode(config: Any, inputs_embeds: torch.Tensor, cache: Cache | None,
                 position_ids: torch.Tensor | None, use_cache: bool | None
                 ) -> tuple[Cache | None, torch.Tensor, bool]:
    """The prologue of every family's ``Model.forward``: the cache to fill and the positions."""
    use_cache = config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
                        + past).unsqueeze(0)
    return cache, position_ids, use_cache
