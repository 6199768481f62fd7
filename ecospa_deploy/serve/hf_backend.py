"""The reference backend: plain transformers forward passes, one KV cache per slot.

Each slot keeps its own ``DynamicCache`` and ``step`` decodes the occupied slots one after
another, so this backend is simple and obviously right rather than fast; the scheduler still
batches requests for it (they share steps), and the engine backend is the fast path.
Sampling uses transformers' own logits warpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from ecospa_deploy.engine.sampling import SamplingParams
from ecospa_deploy.modeling.kv_cache import cache_kwargs, output_cache


def _warpers(params: SamplingParams) -> LogitsProcessorList:
    out = LogitsProcessorList()
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        out.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(params.top_p))
    return out


@dataclass
class _Slot:
    cache: DynamicCache
    last: int
    params: SamplingParams
    warpers: LogitsProcessorList
    generator: torch.Generator | None
    ids: list[int]


class HFBackend:
    """Slot protocol (see ``backend.py``) over a transformers ``PreTrainedModel``."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_seq_len: int) -> None:
        self.model = model.eval()
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        self._slots: dict[int, _Slot] = {}

    def _sample(self, slot: _Slot, logits: torch.Tensor) -> int:
        logits = logits.float()
        if slot.params.greedy:
            return int(logits.argmax())
        ids = torch.tensor([slot.ids], device=logits.device)
        scores = slot.warpers(ids, logits[None])
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=slot.generator)[0, 0])

    @torch.inference_mode()
    def add(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        if slot in self._slots:
            raise ValueError(f"slot {slot} is occupied; free it first")
        if not 0 <= slot < self.max_batch_size:
            raise ValueError(f"slot {slot} out of range [0, {self.max_batch_size})")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([list(prompt_ids)], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
        state = _Slot(output_cache(out), -1, params, _warpers(params), generator,
                      list(prompt_ids))
        token = self._sample(state, out.logits[0, -1])
        state.last = token
        state.ids.append(token)
        self._slots[slot] = state
        return token

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        tokens = {}
        for slot, state in self._slots.items():
            ids = torch.tensor([[state.last]], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, **cache_kwargs(state.cache))
            state.cache = output_cache(out)
            token = self._sample(state, out.logits[0, -1])
            state.last = token
            state.ids.append(token)
            tokens[slot] = token
        return tokens

    def free(self, slot: int) -> None:
        self._slots.pop(slot, None)
