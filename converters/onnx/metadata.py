"""The JSON files of an ONNX export: what each runtime reads to drive the decoder.

- ``genai_config.json``: onnxruntime-genai's config, with only keys it knows (it rejects any
  other). ``model.type`` is ``llama``, genai's plain decoder-only type: the architecture (GPT-2,
  Llama, sliding windows, biases) lives inside the graph, genai only feeds ids, mask, positions
  and the cache. Global head counts/sizes are the cache's maxima; genai reads each layer's own
  cache shape from the graph's inputs.
- ``config.json`` (target ``optimum`` only): a stock ``llama`` config that transformers 4.x can
  read, whose ``num_key_value_heads`` and ``hidden_size // num_attention_heads`` are the export's
  one cache shape (what optimum's ``ORTModelForCausalLM`` sizes its empty cache from). Its
  architecture keys describe that I/O, not the pruned model.
- ``ecospa_export.json``: our block (format version, target, dtype, every layer's own shape and
  its cache shape in the graph); ``OrtGenerator`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecospa_deploy import dtypes
from ecospa_deploy.errors import CheckpointError

from .layout import KVLayout

CONFIG_NAME = "genai_config.json"
EXPORT_NAME = "ecospa_export.json"
HF_CONFIG_NAME = "config.json"
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
FORMAT_VERSION = 2
# The decoder-only model type both onnxruntime-genai and optimum drive with our graph's I/O.
RUNTIME_MODEL_TYPE = "llama"


def _token_ids(config: Any) -> tuple[Any, Any, int]:
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    return config.bos_token_id, eos, pad if pad is not None else 0


def _context(model: Any) -> int:
    from ecospa_deploy.families import family_of_model

    return family_of_model(model).max_positions(model.config)


def build_genai_config(model: Any, layout: KVLayout, *, use_past: bool) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for ``model`` exported with ``layout``."""
    config = model.config
    spec = config.ecospa_spec
    bos, eos, pad = _token_ids(config)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "position_ids": "position_ids"}
    outputs = {"logits": "logits"}
    if use_past:
        inputs.update(past_key_names="past_key_values.%d.key",
                      past_value_names="past_key_values.%d.value")
        outputs.update(present_key_names="present.%d.key", present_value_names="present.%d.value")
    return {
        "model": {
            "type": RUNTIME_MODEL_TYPE,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": config.vocab_size,
            "context_length": _context(model),
            "decoder": {
                "filename": MODEL_NAME,
                "hidden_size": spec.hidden_size,
                "num_hidden_layers": spec.num_layers,
                "num_attention_heads": spec.maxima()["num_attention_heads"],
                "num_key_value_heads": max(c.num_key_value_heads for c in layout.cache),
                "head_size": max(max(c.qk_head_dim, c.v_head_dim) for c in layout.cache),
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        # The graph concatenates past and new keys, so genai must not share one buffer.
        "search": {"do_sample": False, "max_length": _context(model), "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0},
    }


def build_hf_config(model: Any, layout: KVLayout, *, dtype: str) -> dict[str, Any]:
    """optimum's ``config.json`` (a transformers-4-readable ``llama`` config, see above)."""
    config = model.config
    spec = config.ecospa_spec
    bos, eos, pad = _token_ids(config)
    heads = layout.config_num_attention_heads
    shape = layout.cache[0]
    return {
        "model_type": RUNTIME_MODEL_TYPE,
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.qk_head_dim,
        "intermediate_size": spec.maxima()["intermediate_size"],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": _context(model),
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "torch_dtype": dtypes.canonical(dtype),
        "use_cache": True,
    }


def build_export_block(model: Any, layout: KVLayout, *, dtype: str, opset: int,
                       use_past: bool, exporter: str) -> dict[str, Any]:
    """``ecospa_export.json``: our provenance and the per-layer shapes ``OrtGenerator`` needs."""
    spec = model.config.ecospa_spec
    layers = [{"num_attention_heads": layer.num_attention_heads,
               "num_key_value_heads": layer.num_key_value_heads,
               "key_head_size": layer.qk_head_dim,
               "value_head_size": layer.v_head_dim,
               "sliding_window": layer.sliding_window} for layer in spec.layers]
    return {"format_version": FORMAT_VERSION, "target": layout.target, "dtype": dtype,
            "opset": opset, "exporter": exporter, "use_past": use_past,
            "pad_token_id": _token_ids(model.config)[2],
            "kv_cache_layout": "[batch, num_key_value_heads, sequence, head_size]",
            "kv_elements_per_token": layout.elements_per_token,
            "kv_overhead_pct": round(layout.overhead_pct(spec), 3),
            "layers": layers, "cache": [c.as_dict() for c in layout.cache]}


def write_json(directory: Path, name: str, payload: dict[str, Any]) -> None:
    (directory / name).write_text(json.dumps(payload, indent=2) + "\n")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_export(directory: str | Path) -> dict[str, Any]:
    """``{"genai": genai_config, "ecospa": our block}`` of an export; a clear error otherwise.

    An export of format version 1 (the block inside ``genai_config.json``, caches of each
    layer's own shape) still reads.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected a directory written by "
                              "`ecospa convert onnx`")
    genai = _load(path)
    block = _load(directory / EXPORT_NAME) if (directory / EXPORT_NAME).is_file() else (
        genai.get("ecospa") if isinstance(genai, dict) else None)
    version = block.get("format_version") if isinstance(block, dict) else None
    if version == 1:
        block = {**block, "target": "ort", "pad_token_id": genai["model"]["pad_token_id"],
                 "cache": [{k: layer[k] for k in ("num_key_value_heads", "key_head_size",
                                                  "value_head_size")}
                           for layer in block["layers"]]}
    elif version != FORMAT_VERSION:
        raise CheckpointError(f"{directory / EXPORT_NAME}: missing or not format_version "
                              f"{FORMAT_VERSION}; re-export with `ecospa convert onnx`")
    return {"genai": genai, "ecospa": block}


__all__ = ["CONFIG_NAME", "EXPORT_NAME", "HF_CONFIG_NAME", "MODEL_NAME", "DATA_NAME",
           "FORMAT_VERSION", "build_genai_config", "build_hf_config", "build_export_block",
           "write_json", "read_export"]
