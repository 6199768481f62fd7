"""Post-export check: onnxruntime logits against PyTorch on prefill and cached decode steps.

The reference is the model's own HF forward (2D padding mask, transformers' cache, its own
sliding-window handling), not the export wrapper, so the check also covers the wrapper's mask
and cache plumbing. A batch of two prompts, one left-padded, runs a prefill and ``steps``
decode steps that feed both sides the same tokens; logits are compared at every non-padding
position.

Tolerances, both relative to the logits' scale because ORT and PyTorch accumulate in different
orders: fp32 max abs error <= 1e-4 * max(1, max |logit|) (a real 30-layer model with massive
activations, SmolLM2-135M, differs by 5.7e-4 at logits up to 32 where a tiny model stays under
1e-5; a wrong mask or cache costs O(1)); fp16 <= 2e-2 * max(1, max |logit|) (fp16 has ~3
significant digits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.modeling.kv_cache import cache_kwargs, output_cache

from .runtime import OrtGenerator, position_ids

FP32_RTOL = 1e-4
FP16_RTOL = 2e-2


class VerificationError(EcospaError):
    """The exported graph disagrees with PyTorch beyond the stated tolerance."""


@dataclass
class Verification:
    dtype: str
    tolerance: float
    max_abs_error: list[float] = field(default_factory=list)   # prefill, then each step
    max_abs_logit: float = 0.0

    @property
    def worst(self) -> float:
        return max(self.max_abs_error)

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "tolerance": self.tolerance, "passed": self.passed,
                "max_abs_error": self.max_abs_error, "max_abs_logit": self.max_abs_logit}


def tolerance(dtype: str, max_abs_logit: float) -> float:
    return (FP32_RTOL if dtype == "fp32" else FP16_RTOL) * max(1.0, max_abs_logit)


def _prompts(vocab: int, seed: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    ids = gen.integers(3, vocab, size=(2, length)).astype(np.int64)
    mask = np.ones((2, length), dtype=np.int64)
    mask[1, :2] = 0             # row 1 is left-padded by two tokens
    return ids, mask


@torch.no_grad()
def verify(model: torch.nn.Module, generator: OrtGenerator, dtype: str, *, steps: int = 4,
           prompt_len: int = 7, seed: int = 0) -> Verification:
    """Compare and return the errors; ``raise_if_failed`` turns a miss into an error."""
    device = model.lm_head.weight.device
    ids, mask = _prompts(model.config.vocab_size, seed, prompt_len)
    pos = position_ids(mask)
    result = Verification(dtype=dtype, tolerance=0.0)

    def torch_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    ref = model(input_ids=torch_t(ids), attention_mask=torch_t(mask),
                position_ids=torch_t(pos), use_cache=generator.use_past)
    past = generator.empty_past(2) if generator.use_past else []
    got, present = generator.forward(ids, mask, pos, past)
    errors = []
    ref_logits = ref.logits.float().cpu().numpy()
    keep = mask.astype(bool)
    errors.append(float(np.abs(got.astype(np.float32) - ref_logits)[keep].max()))
    peak = float(np.abs(ref_logits[keep]).max())
    cache = output_cache(ref)
    all_ids = ids
    for _ in range(steps):
        nxt = ref_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        all_ids = np.concatenate([all_ids, nxt], axis=1)
        step_pos = position_ids(mask)[:, -1:]
        if generator.use_past:
            ref = model(input_ids=torch_t(nxt), attention_mask=torch_t(mask),
                        position_ids=torch_t(step_pos), use_cache=True, **cache_kwargs(cache))
            cache = output_cache(ref)
            got, present = generator.forward(nxt, mask, step_pos, present)
            ref_logits = ref.logits.float().cpu().numpy()
            errors.append(float(np.abs(got.astype(np.float32) - ref_logits).max()))
        else:
            full_pos = position_ids(mask)
            ref = model(input_ids=torch_t(all_ids), attention_mask=torch_t(mask),
                        position_ids=torch_t(full_pos), use_cache=False)
            got, _ = generator.forward(all_ids, mask, full_pos)
            ref_logits = ref.logits.float().cpu().numpy()
            keep = mask.astype(bool)
            errors.append(float(np.abs(got.astype(np.float32) - ref_logits)[keep].max()))
        peak = max(peak, float(np.abs(ref_logits).max()))
    result.max_abs_error = errors
    result.max_abs_logit = peak
    result.tolerance = tolerance(dtype, peak)
    return result


def raise_if_failed(result: Verification) -> None:
    if not result.passed:
        where = ["prefill"] + [f"decode step {i + 1}" for i in range(len(result.max_abs_error) - 1)]
        worst = where[int(np.argmax(result.max_abs_error))]
        raise VerificationError(
            f"onnxruntime logits differ from PyTorch by {result.worst:.3g} at {worst} "
            f"(errors per call: {[f'{e:.2g}' for e in result.max_abs_error]}); expected <= "
            f"{result.tolerance:.3g} for {result.dtype}. The export was not written.")


__all__ = ["verify", "raise_if_failed", "Verification", "VerificationError", "FP32_RTOL",
           "FP16_RTOL"]
