"""Calibration data: token windows cut from a text file with the model's own tokenizer.

The whole file is tokenized once (no special tokens added) and ``samples`` windows of
``seq_len`` tokens start at seeded random offsets, as GPTQ/SparseGPT/Wanda draw their
calibration windows; windows may overlap when the text is short. The SHA-256 of the file goes
into the checkpoint's provenance so a result can be traced to its calibration text.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ecospa_deploy.errors import EcospaError


@dataclass
class Calibration:
    windows: torch.Tensor          # [samples, seq_len] token ids
    sha256: str
    source: str
    num_tokens: int                # tokens in the whole file


def read_text(path: str | os.PathLike) -> tuple[str, str]:
    """(text, sha256 of the bytes); clear errors for a missing or undecodable file."""
    path = Path(path)
    if not path.is_file():
        raise EcospaError(f"calibration text {path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EcospaError(f"calibration text {path}: not UTF-8 ({exc})") from None
    return text, hashlib.sha256(data).hexdigest()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` (no BOS/EOS added), as a 1-D long tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, path: str | os.PathLike, samples: int, seq_len: int,
                        seed: int = 0) -> Calibration:
    """``samples`` windows of ``seq_len`` tokens from the text file at ``path``."""
    if samples < 1 or seq_len < 2:
        raise EcospaError(f"samples={samples}, seq_len={seq_len}; expected samples >= 1 and "
                          "seq_len >= 2")
    text, digest = read_text(path)
    ids = tokenize(tokenizer, text)
    if ids.numel() < seq_len:
        raise EcospaError(f"calibration text {path} has {ids.numel()} tokens, shorter than one "
                          f"window of seq_len={seq_len}; give more text or a smaller --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return Calibration(windows=windows, sha256=digest, source=str(path), num_tokens=ids.numel())


def batches(windows: torch.Tensor, batch_size: int):
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size]


def backward_passes(model, windows: torch.Tensor, batch_size: int, params,
                    desc: str = "gradients", show: bool = False):
    """One LM-loss backward per batch of ``windows``, yielding after each with the gradients
    set: only ``params`` require a gradient (what is scored; embeddings and the LM head cost
    memory and time for nothing), the model is in eval mode; flags and mode are restored and
    gradients cleared afterwards. The weights are not changed."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    every = list(model.parameters())
    flags = [p.requires_grad for p in every]
    scored = {id(p) for p in params}
    was_training = model.training
    model.eval()
    for p in every:
        p.requires_grad_(id(p) in scored)
    try:
        for batch in tqdm(list(batches(windows, batch_size)), desc=desc, leave=False,
                          disable=not show):
            batch = batch.to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            yield
        model.zero_grad(set_to_none=True)
    finally:
        for p, f in zip(every, flags):
            p.requires_grad_(f)
        model.train(was_training)


__all__ = ["Calibration", "read_text", "tokenize", "calibration_windows", "batches",
           "backward_passes"]
