"""Facts about a checkpoint from its config and safetensors headers alone (no weight is read).

Per layer: head counts, q/k and v head dims, FFN width, parameters and % of the dense layer;
totals: parameters, bytes at each dtype, KV-cache bytes per token against the dense model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ecospa_deploy import dtypes
from ecospa_deploy.loading import check_directory
from ecospa_deploy.spec import LayerSpec, ModelSpec

DTYPE_BYTES = {**{dtypes.short_name(n): dtypes.element_size(n) for n in dtypes.NAMES}, "int8": 1}


def dense_layer(spec: ModelSpec, layer: LayerSpec) -> LayerSpec:
    """The layer before pruning: dense heads/dims/FFN, same bias flags."""
    return spec.dense.layer(softmax_scale=layer.softmax_scale, rope=spec.rope,
                            qkv_bias=layer.qkv_bias, o_bias=layer.o_bias,
                            gate_up_bias=layer.gate_up_bias, down_bias=layer.down_bias)


def describe_spec(spec: ModelSpec, total_params: int | None = None) -> dict[str, Any]:
    layers, layer_total, dense_total = [], 0, 0
    for i, layer in enumerate(spec.layers):
        params = spec.layer_params(layer)
        dense = spec.layer_params(dense_layer(spec, layer))
        layer_total += params
        dense_total += dense
        layers.append({
            "layer": i, "num_attention_heads": layer.num_attention_heads,
            "num_key_value_heads": layer.num_key_value_heads, "qk_head_dim": layer.qk_head_dim,
            "v_head_dim": layer.v_head_dim, "intermediate_size": layer.intermediate_size,
            "params": params, "dense_params": dense, "percent_of_dense": 100.0 * params / dense,
            "kv_elements_per_token": layer.kv_cache_width,
        })
    d = spec.dense
    kv = sum(layer.kv_cache_width for layer in spec.layers)
    kv_dense = spec.num_layers * 2 * d.num_key_value_heads * d.head_dim
    other = (total_params - layer_total) if total_params is not None else None
    total = total_params if total_params is not None else layer_total
    dense_model = dense_total + (other or 0)
    return {
        "layers": layers,
        "totals": {
            "params": total, "layer_params": layer_total, "non_layer_params": other,
            "dense_params": dense_model, "percent_of_dense": 100.0 * total / dense_model,
            "bytes": {k: total * v for k, v in DTYPE_BYTES.items()},
            "kv_cache_bytes_per_token": {k: kv * v for k, v in DTYPE_BYTES.items()
                                         if k != "int8"},
            "dense_kv_cache_bytes_per_token": {k: kv_dense * v for k, v in DTYPE_BYTES.items()
                                               if k != "int8"},
            "kv_percent_of_dense": 100.0 * kv / kv_dense,
        },
        "dense": {"num_attention_heads": d.num_attention_heads,
                  "num_key_value_heads": d.num_key_value_heads, "head_dim": d.head_dim,
                  "intermediate_size": d.intermediate_size},
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "provenance": spec.provenance,
    }


def describe_gguf(path: Path) -> dict[str, Any]:
    """Describe a GGUF file from its metadata and tensor table (a dense model)."""
    from ecospa_deploy.families import family_of
    from ecospa_deploy.gguf_input import read_config, tensor_types

    config, header = read_config(path)
    fam = family_of(config.model_type, str(path))
    total = sum(math.prod(t.shape) for t in header.tensors.values())
    out = describe_spec(fam.dense_spec(config), total)
    out.update(path=str(path), model_type=config.model_type,
               architecture=fam.load("model_class").__name__,
               format=f"gguf (architecture {header.architecture!r}; dequantized to float32 on "
                      "load)",
               checkpoint_dtypes=tensor_types(header))
    return out


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a checkpoint directory (ours or foreign) or a GGUF file without loading its
    weights."""
    from ecospa_deploy.gguf_input import is_gguf

    path = Path(path)
    if is_gguf(path):
        return describe_gguf(path)
    config, model_cls, foreign, _, tensors, _, _ = check_directory(path)
    total = sum(math.prod(t.shape) for t in tensors.values())  # a tied head is stored once
    out = describe_spec(config.ecospa_spec, total)
    out.update(path=str(path), model_type=config.model_type, architecture=model_cls.__name__,
               format="foreign (shapes inferred from tensors)" if foreign else "ecospa",
               checkpoint_dtypes=sorted({t.dtype for t in tensors.values()}))
    return out


def format_table(info: dict[str, Any]) -> str:
    """Human-readable per-layer table and totals."""
    head = f"{'layer':>5} {'q_heads':>7} {'kv_heads':>8} {'qk_dim':>6} {'v_dim':>5} " \
           f"{'ffn':>7} {'params':>12} {'% dense':>8}"
    rows = [f"{info['path']}  ({info['architecture']}, {info['format']})", head, "-" * len(head)]
    for r in info["layers"]:
        rows.append(f"{r['layer']:>5} {r['num_attention_heads']:>7} "
                    f"{r['num_key_value_heads']:>8} {r['qk_head_dim']:>6} {r['v_head_dim']:>5} "
                    f"{r['intermediate_size']:>7} {r['params']:>12,} "
                    f"{r['percent_of_dense']:>7.1f}%")
    t = info["totals"]
    d = info["dense"]
    rows += ["-" * len(head),
             f"dense layer: {d['num_attention_heads']} q heads, {d['num_key_value_heads']} kv "
             f"heads, head dim {d['head_dim']}, FFN {d['intermediate_size']}",
             f"params: {t['params']:,} ({t['percent_of_dense']:.1f}% of dense "
             f"{t['dense_params']:,})",
             "bytes: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in t["bytes"].items()),
             "KV cache per token: " + ", ".join(
                 f"{k} {v:,} B" for k, v in t["kv_cache_bytes_per_token"].items())
             + f" ({t['kv_percent_of_dense']:.1f}% of dense)"]
    return "\n".join(rows)
