"""Calibration windows from text the dense model writes itself.

No general-domain corpus ships offline, and calibrating on the texts quality is measured on
(``ecospa_deploy.domains``) would grade the pruned model on what it was fitted to. What the
dense chat model says when asked is the distribution it is used on (the "self-generated data"
of LLM-Pruner and of data-free distillation), so it is the calibration text here:

1. ``samples`` prompts are drawn (seeded, without repeats until the list is used up) from
   ``PROMPTS``: topics x task styles (explain, describe, a short story, essay, letter, list,
   pros and cons, news report), comparisons, code and recipes. The topics avoid the
   evaluation domains (plays, licences, Python's documentation) and the quiz's subjects;
2. each prompt is one user turn through the chat template with the generation prompt;
3. the model samples (``SAMPLING``: temperature 0.8, top-p 0.95, no top-k) in left-padded
   batches and does not stop at end-of-turn: it may write ``<|im_end|>`` and go on, which
   keeps chat-format tokens in the data, until the window holds exactly ``seq_len`` tokens,
   the prompt included;
4. on CUDA a float32 model samples under bf16 autocast (a bf16 model in its own dtype).

Sampling is seeded once per call, so the windows depend on the batch size as well: every
input that changes them (a fingerprint of the weights, the tokenizer, samples, seq_len,
seed, batch size, device type, the prompts and the sampling) keys the on-disk cache
``data.cache_dir()/selftext/<key>.pt``, so a second call returns at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ecospa_deploy.errors import EcospaError

_TOPICS = (
    "volcanoes", "rainforests", "the moon", "winter", "trains", "public libraries", "friendship",
    "gardening", "the internet", "electric cars", "a small mountain village", "the weather",
    "museums", "music festivals", "recycling", "deserts", "a busy market", "robots", "rivers",
    "coffee", "the night sky", "learning a new language", "city parks", "lighthouses",
    "bridges", "chess", "a rainy afternoon", "cooking at home", "airports", "bicycles",
)
_STYLES = (
    "Explain {} to a curious teenager.",
    "Describe {} in detail.",
    "Write a short story about {}.",
    "Write a short essay about {}.",
    "Write a friendly letter to a friend about {}.",
    "List some interesting facts about {}.",
    "What are the advantages and disadvantages of {}?",
    "Write a short news report about {}.",
)
_COMPARISONS = (
    ("tea", "coffee"), ("trains", "planes"), ("cities", "the countryside"),
    ("books", "films"), ("summer", "winter"), ("walking", "cycling"), ("email", "letters"),
    ("working from home", "working in an office"), ("solar power", "wind power"),
    ("paper books", "e-readers"),
)
_CODE = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python script that counts the words in a text file.",
    "Write a JavaScript function that returns the largest number in an array.",
    "Write a SQL query that finds the ten customers with the most orders.",
    "Write a C function that reverses a linked list.",
    "Write a bash script that renames every .txt file in a folder to .md.",
    "Explain what a hash table is and show a small example in code.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Explain recursion with a short code example.",
    "Write a function in Rust that sums the even numbers in a vector.",
)
_RECIPES = (
    "Give me a simple recipe for pancakes.",
    "How do I make a vegetable soup? Give the ingredients and steps.",
    "Write a recipe for chocolate chip cookies.",
    "Explain how to bake a loaf of bread at home.",
    "Give me a quick recipe for a tomato pasta sauce.",
    "How do I make a fruit smoothie?",
    "Write a recipe for a simple green salad with a lemon dressing.",
    "Explain how to cook rice on the stove.",
)
_HOWTO = (
    "How can I get better sleep?", "Give me tips for a job interview.",
    "How do I start running as a beginner?", "How can I save money each month?",
    "Plan a three-day trip to the seaside.", "How do I take care of a houseplant?",
    "Give me advice for learning to play the guitar.", "How can I study more effectively?",
)
# The fixed prompt list; its order is part of the cache key.
PROMPTS: tuple[str, ...] = (
    tuple(s.format(t) for t in _TOPICS for s in _STYLES)
    + tuple(f"Compare {a} and {b}." for a, b in _COMPARISONS)
    + _CODE + _RECIPES + _HOWTO
)
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 0, "stop_at_end_of_turn": False}
_FORMAT = 1   # bump when the construction changes: old cache entries are then not reused


@dataclass
class SelfText:
    windows: torch.Tensor      # [samples, seq_len] int64
    sha256: str                # of the windows' int64 bytes
    provenance: dict = field(default_factory=dict)
    path: Path | None = None   # the cache file
    cached: bool = False       # read from the cache rather than generated now


def choose_prompts(samples: int, seed: int = 0) -> list[str]:
    """``samples`` prompts: seeded shuffles of ``PROMPTS``, one after another."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < samples:
        order = list(PROMPTS)
        rng.shuffle(order)
        out += order[:samples - len(out)]
    return out


def model_fingerprint(model) -> str:
    """SHA-256 of every parameter's name, shape and dtype plus up to 4096 evenly strided
    values of it: cheap, and any change to the weights shows."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's serialized model (or vocabulary) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((body + "\0" + str(tokenizer.chat_template)).encode()).hexdigest()


def _ids_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _autocast(device: torch.device, model, bf16: bool):
    if bf16 and device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16), "bf16-autocast"
    return contextlib.nullcontext(), str(next(model.parameters()).dtype).replace("torch.", "")


class _Ticker:
    """A stopping criterion that never stops: it advances a progress bar by one decode step,
    so the bar's ETA is per token, not per batch."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], seq_len: int, seed: int, batch_size: int,
              bf16: bool, progress: bool) -> tuple[torch.Tensor, str]:
    """The windows, in ``prompts`` order, and the dtype they were sampled in."""
    from tqdm.auto import tqdm

    from ecospa_deploy.chat import encode_chat, pad_id

    device = next(model.parameters()).device
    lengths = [int(encode_chat(tokenizer, [p])["attention_mask"].sum()) for p in prompts]
    if max(lengths) >= seq_len:
        raise EcospaError(f"seq_len={seq_len} leaves no room to generate: a prompt takes "
                          f"{max(lengths)} tokens; expected seq_len > {max(lengths)}")
    # batches of similar prompt lengths waste fewer generated tokens
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    windows = torch.empty((len(prompts), seq_len), dtype=torch.long)
    ctx, dtype = _autocast(device, model, bf16)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            starts = range(0, len(order), batch_size)
            steps = [seq_len - min(lengths[i] for i in order[s:s + batch_size]) for s in starts]
            bar = tqdm(total=sum(steps), desc=f"calibration text ({len(prompts)} samples)",
                       unit="step", disable=not progress, leave=False)
            for s, new in zip(starts, steps):
                rows = order[s:s + batch_size]
                batch = {k: v.to(device) for k, v in
                         encode_chat(tokenizer, [prompts[i] for i in rows]).items()}
                width = batch["input_ids"].shape[1]
                with ctx:
                    # eos_token_id=[]: no stop token (None would fall back to the model's eos)
                    out = model.generate(**batch, do_sample=True, max_new_tokens=new,
                                         temperature=SAMPLING["temperature"],
                                         top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"],
                                         eos_token_id=[], pad_token_id=pad_id(tokenizer),
                                         stopping_criteria=[_Ticker(bar)])
                for j, i in enumerate(rows):
                    windows[i] = out[j, width - lengths[i]:][:seq_len].cpu()
            bar.close()
    finally:
        model.train(was_training)
    return windows, dtype


def selftext_windows(model, tokenizer, samples: int = 128, seq_len: int = 256, seed: int = 0,
                     batch_size: int = 8, bf16: bool = True, progress: bool = True,
                     cache: bool = True) -> SelfText:
    """``samples`` windows of ``seq_len`` tokens sampled from ``model`` (module docstring);
    cached on disk unless ``cache`` is False. ``batch_size`` is part of the cache key: the
    default 8 is the main command's, so ``ecospa prune --calib self`` with its samples, length
    and seed reuses the text the main command wrote."""
    from ecospa_deploy.data import cache_dir

    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise EcospaError(f"samples={samples}, seq_len={seq_len}, batch_size={batch_size}; "
                          "expected samples >= 1, seq_len >= 2 and batch_size >= 1")
    device = next(model.parameters()).device
    prompts = choose_prompts(samples, seed)
    inputs = {"format": _FORMAT, "model": model_fingerprint(model),
              "tokenizer": tokenizer_fingerprint(tokenizer), "samples": samples,
              "seq_len": seq_len, "seed": seed, "batch_size": batch_size,
              "device": device.type, "bf16": bool(bf16 and device.type == "cuda"),
              "sampling": SAMPLING,
              "prompt_list": hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "selftext" / f"{key}.pt"
    if cache and path.is_file():
        saved = torch.load(path, weights_only=True)
        return SelfText(saved["windows"], _ids_sha256(saved["windows"]), saved["provenance"],
                        path, cached=True)
    start = time.perf_counter()
    windows, dtype = _generate(model, tokenizer, prompts, seq_len, seed, batch_size, bf16,
                               progress)
    provenance = {"source": "selftext", "key": key, **inputs, "dtype": dtype,
                  "prompts": prompts, "seconds": round(time.perf_counter() - start, 1)}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            torch.save({"windows": windows, "provenance": provenance}, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return SelfText(windows, _ids_sha256(windows), provenance, path if cache else None)


__all__ = ["PROMPTS", "SAMPLING", "SelfText", "choose_prompts", "model_fingerprint",
           "tokenizer_fingerprint", "selftext_windows"]
