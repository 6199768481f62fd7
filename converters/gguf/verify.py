"""Run a written GGUF in llama.cpp (``llama-cpp-python``) and compare it with our HF modeling.

Three checks, on the same prompt: the prompt's logits at every position (max abs difference
over the largest reference logit), the greedy continuation token by token, and the tokenization
of a few probe texts. The KV cache is float32 here (llama.cpp's default is f16), so an f32 file
differs from PyTorch by accumulation order only; ``BOUNDS`` is what each outtype is held to.
Quantized outtypes are measured (logit error, greedy agreement) but not held to a bound: their
error is the quantization's, not the conversion's.
"""

from __future__ import annotations

import os

import numpy as np
import torch

# outtype -> max |logit difference| / max(1, max |reference logit|)
BOUNDS = {"f32": 1e-4, "f16": 2e-2, "bf16": 6e-2}
PROBES = ("The capital of France is Paris.", "To be, or not to be: 'tis the question",
          "x = [1, 22, 333]  # 4444 ok?",
          "  leading spaces\tand\ttabs\n\nnew lines", "Ünïcödé — “quotes” 日本語")
GGML_TYPE_F32 = 0


def open_llama(path: str, n_ctx: int):
    """llama-cpp-python on the file, loaded into plain CPU buffers: by default llama.cpp
    repacks weights into "extra" buffer types (AMX and other CPU-specific layouts), and on a CPU
    with AMX its q8_0 path crashed the process (segfault) on our small shapes. The check is of
    the file, so it runs the reference CPU path on every machine."""
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as low

    default = low.llama_model_default_params

    def plain_buffers():
        params = default()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    low.llama_model_default_params = plain_buffers
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                     verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                     n_threads=min(4, os.cpu_count() or 1))
    finally:
        low.llama_model_default_params = default


@torch.no_grad()
def _ours_greedy(model, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    seq = list(ids)
    logits0 = None
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0].float()
        if logits0 is None:
            logits0 = logits.numpy()
        seq.append(int(logits[-1].argmax()))
    return logits0, seq[len(ids):]


def _theirs_greedy(llm, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    llm.reset()
    llm.eval(ids)
    logits0 = np.array(llm.scores[:len(ids)], dtype=np.float32)
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return logits0, out


def verify_gguf(path: str, model, tokenizer, outtype: str, prompt_ids: list[int] | None = None,
                steps: int = 8) -> dict:
    """``{logit_err, bound, greedy_equal, ours, theirs, tokenizer_equal, ok}`` for ``path``."""
    if prompt_ids is None:
        prompt_ids = tokenizer(PROBES[0], add_special_tokens=False)["input_ids"]
    model = model.float().eval()
    llm = open_llama(path, n_ctx=len(prompt_ids) + steps + 8)
    ref, ours = _ours_greedy(model, prompt_ids, steps)
    got, theirs = _theirs_greedy(llm, prompt_ids, steps)
    err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
    # probes our tokenizer spells losslessly (a toy vocabulary may drop characters it lacks)
    probes = [t for t in PROBES
              if tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"]) == t]
    tok_equal = bool(probes) and all(
        llm.tokenize(t.encode(), add_bos=False, special=True)
        == tokenizer(t, add_special_tokens=False)["input_ids"] for t in probes)
    bound = BOUNDS.get(outtype)
    ties = _within(model, prompt_ids, theirs, bound or 0.0)
    # f32 must give our very tokens; a half type may flip a near-tie, so there each of
    # llama.cpp's tokens must be within the bound of our best logit at its position
    greedy_ok = ours == theirs if outtype == "f32" else ties
    ok = tok_equal and (bound is None or (err <= bound and greedy_ok))
    return {"logit_err": err, "bound": bound, "greedy_equal": ours == theirs,
            "greedy_within_bound": ties, "ours": ours, "theirs": theirs,
            "tokenizer_equal": tok_equal, "probes": len(probes), "ok": ok}


@torch.no_grad()
def _within(model, ids: list[int], theirs: list[int], bound: float) -> bool:
    """Whether each of ``theirs`` (teacher-forced) is within ``bound`` (relative to the largest
    logit) of our model's best logit at its position."""
    logits = model(torch.tensor([ids + theirs])).logits[0, len(ids) - 1:-1].float()
    best = logits.max(-1).values
    mine = logits[torch.arange(len(theirs)), torch.tensor(theirs)]
    tol = bound * max(1.0, float(logits.abs().max()))
    return bool((best - mine <= tol).all())
