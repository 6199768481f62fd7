"""``genai_config.json``: what a runtime must know to drive the exported decoder.

The layout follows onnxruntime-genai's config (``model.decoder.inputs/outputs`` name patterns,
``search`` defaults) so the file is familiar, with global head counts/sizes set to the per-layer
maxima. Those globals cannot describe a pruned model, so an ``ecospa`` block adds every layer's
own KV shape; our ``OrtGenerator`` reads it to allocate the empty past of a prefill.
Stock onnxruntime-genai sizes its KV buffers from the globals and therefore cannot run a
heterogeneous export: use ``OrtGenerator``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecospa_deploy.errors import CheckpointError

CONFIG_NAME = "genai_config.json"
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
FORMAT_VERSION = 1


def build_genai_config(model: Any, *, dtype: str, opset: int, use_past: bool,
                       exporter: str) -> dict[str, Any]:
    """The metadata dict for ``model`` (our causal LM) exported with these settings."""
    config = model.config
    spec = config.ecospa_spec
    maxima = spec.maxima()
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions")
    layers = [{"num_attention_heads": layer.num_attention_heads,
               "num_key_value_heads": layer.num_key_value_heads,
               "key_head_size": layer.qk_head_dim,
               "value_head_size": layer.v_head_dim,
               "sliding_window": layer.sliding_window} for layer in spec.layers]
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else 0,
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": MODEL_NAME,
                "hidden_size": spec.hidden_size,
                "num_hidden_layers": spec.num_layers,
                "num_attention_heads": maxima["num_attention_heads"],
                "num_key_value_heads": maxima["num_key_value_heads"],
                "head_size": maxima["head_dim"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key" if use_past else None,
                           "past_value_names": "past_key_values.%d.value" if use_past else None},
                "outputs": {"logits": "logits",
                            "present_key_names": "present.%d.key" if use_past else None,
                            "present_value_names": "present.%d.value" if use_past else None},
            },
        },
        "search": {"do_sample": False, "max_length": context, "num_beams": 1,
                   "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        "ecospa": {"format_version": FORMAT_VERSION, "dtype": dtype, "opset": opset,
                   "exporter": exporter, "use_past": use_past,
                   "kv_cache_layout": "[batch, num_key_value_heads, sequence, head_size]",
                   "layers": layers},
    }


def write_genai_config(directory: Path, meta: dict[str, Any]) -> None:
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def read_genai_config(directory: str | Path) -> dict[str, Any]:
    """The metadata of an export directory; a clear error when it is not one of ours."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a directory written by "
                              "`ecospa convert onnx`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    block = meta.get("ecospa") if isinstance(meta, dict) else None
    if not isinstance(block, dict) or block.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: no 'ecospa' block of format_version {FORMAT_VERSION}; "
                              "re-export with `ecospa convert onnx`")
    return meta


__all__ = ["CONFIG_NAME", "MODEL_NAME", "DATA_NAME", "build_genai_config", "write_genai_config",
           "read_genai_config"]
