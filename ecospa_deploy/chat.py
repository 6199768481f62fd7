"""User prompts as one left-padded batch through the tokenizer's chat template.

Shared by the question quiz (``questions``) and the self-generated calibration text
(``prune.selftext``): both ask a chat model things the way its users do, and batched
generation needs left padding so every row's next token sits in the last column.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ecospa_deploy.errors import EcospaError

END_OF_TURN = "<|im_end|>"   # ChatML's turn end; a chat model's answer ends there


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id when it has none."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EcospaError("the tokenizer has neither a pad nor an eos token; expected one of them "
                          "to pad a batch")
    return pad


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that end an answer: eos, and ``<|im_end|>`` when the vocabulary has it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn = tokenizer.get_vocab().get(END_OF_TURN)
    if turn is not None and turn not in ids:
        ids.append(turn)
    return ids


def encode_chat(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [len(prompts), longest], left-padded: each prompt
    as one user turn with the generation prompt added."""
    if not getattr(tokenizer, "chat_template", None):
        raise EcospaError("the tokenizer has no chat template; expected a chat (instruct) "
                          "model's tokenizer")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


__all__ = ["END_OF_TURN", "pad_id", "end_of_turn_ids", "encode_chat"]
