"""Generation with onnxruntime over an ``ecospa convert onnx`` directory (CPU, or CUDA EP).

``OrtGenerator`` left-pads a batch of prompts, runs one prefill (past of length 0), then one
decode step per token, feeding each layer's ``present`` back as its ``past``; an export made
with ``--no-past`` recomputes the whole sequence each step instead. Sampling follows
``SamplingParams`` (greedy at temperature 0; temperature, top-k, top-p otherwise). Prompts are
token-id lists, or strings encoded with the tokenizer saved in the export directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ecospa_deploy import dtypes
from ecospa_deploy.engine.sampling import SamplingParams
from ecospa_deploy.errors import CheckpointError

from .metadata import read_export



def default_providers() -> list[str]:
    """CUDA EP first when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def make_session(model_path: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), sess_options=options,
                                providers=list(providers or default_providers()))


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding: cumulative count of real tokens minus one (>= 0)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of ``logits [batch, vocab]``."""
    if params.greedy:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = np.partition(scores, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= params.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


class OrtGenerator:
    """Greedy/sampled generation with onnxruntime over any ``ecospa convert onnx`` target.

    ``path``: the export directory. ``providers``: onnxruntime execution providers, default
    CUDA EP (when this onnxruntime has it) then CPU. ``threads``: ORT's intra-op thread count
    (``None``: ORT's default). ``generate(prompts, params)`` takes token-id lists (returns the
    new ids per prompt) or strings (encoded with the export's tokenizer; returns the decoded new
    text per prompt, and stops at the tokenizer's EOS unless ``params.stop_token_ids`` is set).
    Also a ``bench`` backend.
    """

    name = "onnx"

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        self.path = Path(path)
        meta = read_export(self.path)
        self.meta = meta["genai"]
        block = meta["ecospa"]
        self.target = block["target"]
        self.layers = block["layers"]
        self.cache = block["cache"]
        self.use_past = bool(block["use_past"])
        self.dtype = np.dtype(dtypes.canonical(block["dtype"]))   # numpy spells them alike
        self.pad_token_id = int(block["pad_token_id"])
        self._tokenizer = None
        self.session = make_session(self.path / self.meta["model"]["decoder"]["filename"],
                                    providers, threads)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.timing: list[float] | None = None   # set to [] to record a time per forward (bench)

    # -- one forward ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer saved with the export (loaded on first use)."""
        if self._tokenizer is None:
            if not (self.path / "tokenizer.json").is_file():
                raise CheckpointError(f"{self.path}: no tokenizer.json; text prompts need the "
                                      "tokenizer `ecospa convert onnx` saves when the source "
                                      "has one (or pass token-id lists)")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        return self._tokenizer

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past of every layer's cache shape in the graph (a prefill)."""
        past = []
        for layer in self.cache:
            for size in (layer["key_head_size"], layer["value_head_size"]):
                past.append(np.zeros((batch, layer["num_key_value_heads"], 0, size), self.dtype))
        return past

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                positions: np.ndarray, past: Sequence[np.ndarray] = ()
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(logits [batch, seq, vocab], present)`` for one call of the exported graph."""
        feeds = {"input_ids": input_ids.astype(np.int64),
                 "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64)}
        feeds.update(zip(self.input_names[3:], past))
        logits, *present = self.session.run(None, feeds)
        if self.timing is not None:
            self.timing.append(time.perf_counter())
        return logits, present

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str],
                 params: SamplingParams | None = None) -> list[list[int]] | list[str]:
        """New tokens per prompt (a stop token, when hit, is the last one returned); for string
        prompts, the decoded new text (see the class docstring)."""
        params = params or SamplingParams()
        if prompts and all(isinstance(p, str) for p in prompts):
            return self._generate_text(list(prompts), params)
        if any(isinstance(p, str) for p in prompts):
            raise ValueError("generate() takes either all strings or all token-id lists")
        return self._generate_ids(prompts, params)

    def _generate_text(self, prompts: list[str], params: SamplingParams) -> list[str]:
        import dataclasses

        tok = self.tokenizer
        ids = [tok(p)["input_ids"] for p in prompts]
        if not params.stop_token_ids and tok.eos_token_id is not None:
            params = dataclasses.replace(params, stop_token_ids=(tok.eos_token_id,))
        out = self._generate_ids(ids, params)
        return [tok.decode(row, skip_special_tokens=True) for row in out]

    def _generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                      ) -> list[list[int]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one prompt and no empty prompt")
        rng = np.random.default_rng(params.seed)
        batch, longest = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = prompt
            mask[row, longest - len(prompt):] = 1
        stops = set(params.stop_token_ids)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, dtype=bool)
        past = self.empty_past(batch) if self.use_past else []
        step_ids, step_pos = ids, position_ids(mask)
        for _ in range(params.max_new_tokens):
            logits, present = self.forward(step_ids, mask, step_pos, past)
            nxt = sample(logits[:, -1, :].astype(np.float32), params, rng)
            for row in np.flatnonzero(~done):
                out[row].append(int(nxt[row]))
                done[row] = int(nxt[row]) in stops
            if done.all():
                break
            nxt = np.where(done, self.pad_token_id, nxt).astype(np.int64)[:, None]
            mask = np.concatenate([mask, (~done).astype(np.int64)[:, None]], axis=1)
            if self.use_past:
                past = present
                step_ids = nxt
                step_pos = position_ids(mask)[:, -1:]
            else:
                ids = np.concatenate([ids, nxt], axis=1)
                step_ids, step_pos = ids, position_ids(mask)
        return out


__all__ = ["OrtGenerator", "default_providers", "make_session", "position_ids", "sample"]
