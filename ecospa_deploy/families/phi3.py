"""The Phi-3 family: a Llama decoder (RMSNorm, RoPE, SiLU-gated MLP) whose checkpoints fuse the
projections: ``self_attn.qkv_proj`` (rows q = heads x d, then k, then v = KV heads x d each) and
``mlp.gate_up_proj`` (rows gate, then up). Our model is ``ecospa_llama`` with the projections
split (splitting is exact); every stock -> ours path converts through ``to_ours``, and the
provenance keeps ``base_model_type`` ``"phi3"``.

RoPE: ``default`` and ``longrope`` (HF's rotary module computes both); a partial rotary factor
below 1 (Phi-4-mini) is refused: our rotary layout pairs ``(j, j + d/2)`` over the whole head.
Dropouts (``resid_pdrop``...) are not modelled: they act in training mode only.
"""

from __future__ import annotations

from typing import Any

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.families.base import heads_in, matrix_shape
from ecospa_deploy.families.llama import LlamaFamily, whole_head_layer
from ecospa_deploy.spec import ModelSpec, SpecError

_QKV = "self_attn.qkv_proj."
_GATE_UP = "mlp.gate_up_proj."


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


class Phi3Family(LlamaFamily):
    name = "phi3"
    stock = {"phi3": "transformers:Phi3ForCausalLM"}
    # GQA, a sliding window on every layer, a non-default rope_theta (longrope has its own test:
    # its factor lists are sized by the head dim, which tests override)
    tiny = {"phi3": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=7,
                         rope_parameters={"rope_type": "default", "rope_theta": 250000.0})}
    qkv_bias_types = ()
    converts_checkpoint = True

    def dense_spec(self, config: Any) -> ModelSpec:
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if factor is not None and factor != 1.0:
            raise SpecError(f"partial_rotary_factor={factor!r} is not supported (partial RoPE, "
                            "Phi-4-mini style: our rotary layout rotates every q/k dim); "
                            "expected 1.0")
        return super().dense_spec(config)

    def infer_spec(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> ModelSpec:
        dense = self.dense_spec(config)
        d = dense.dense.head_dim
        layers = []
        for i, base in enumerate(dense.layers):
            p = f"model.layers.{i}."
            qkv = matrix_shape(shapes, p + _QKV + "weight", i)
            o = matrix_shape(shapes, p + "self_attn.o_proj.weight", i)
            gate_up = matrix_shape(shapes, p + _GATE_UP + "weight", i)
            n_q = heads_in(o[1], d, "input columns", i, p + "self_attn.o_proj.weight")
            if n_q == 0:
                raise SpecError(f"layer {i}: {p}self_attn has no heads left (o_proj {list(o)}); "
                                "expected at least one")
            kv_rows = qkv[0] - n_q * d
            if kv_rows <= 0 or kv_rows % (2 * d):
                raise CheckpointError(
                    f"layer {i}: {p}{_QKV}weight has {qkv[0]} rows; expected {n_q} query heads "
                    f"x {d} (from o_proj's {o[1]} input columns) = {n_q * d}, then K and V of "
                    f"n KV heads x {d} rows each (n >= 1)")
            if gate_up[0] % 2:
                raise CheckpointError(f"layer {i}: {p}{_GATE_UP}weight has {gate_up[0]} rows; "
                                      "expected an even number (gate rows, then as many up rows)")
            n_kv = kv_rows // (2 * d)
            layers.append(whole_head_layer(base, shapes, p, n_q, n_kv, d, gate_up[0] // 2, d,
                                           qkv=_QKV, gate_up=_GATE_UP))
        return dense.replace_layers(layers)

    # -- fused stock tensors <-> our split ones -------------------------------------------
    def to_ours(self, tensors: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, t in tensors.items():
            i = _layer_index(name)
            head, _, kind = name.rpartition(".")
            if i is None or not (head.endswith(_QKV[:-1]) or head.endswith(_GATE_UP[:-1])):
                out[name] = t
                continue
            if i >= spec.num_layers:
                raise CheckpointError(f"tensor {name!r}: layer {i} does not exist; the spec has "
                                      f"{spec.num_layers} layers")
            layer = spec.layers[i]
            stem = head.rpartition(".")[0] + "."
            if head.endswith(_QKV[:-1]):
                names = ("q_proj", "k_proj", "v_proj")
                widths = (layer.q_width, layer.k_width, layer.v_width)
            else:
                names = ("gate_proj", "up_proj")
                widths = (layer.intermediate_size,) * 2
            if t.shape[0] != sum(widths):
                raise CheckpointError(f"layer {i}: tensor {name!r} has {t.shape[0]} rows; the "
                                      f"spec expects {' + '.join(map(str, widths))} = "
                                      f"{sum(widths)} ({', '.join(names)})")
            for part, piece in zip(names, t.split(list(widths), dim=0)):
                out[f"{stem}{part}.{kind}"] = piece
        return out

    def to_stock(self, tensors: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
        import torch

        fused = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                 "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj"))}
        parts = {p for _, group in fused.values() for p in group}
        out: dict[str, Any] = {}
        for name, t in tensors.items():
            head, _, kind = name.rpartition(".")
            stem, _, proj = head.rpartition(".")
            if _layer_index(name) is None or proj not in parts:
                out[name] = t
            elif proj in fused:
                target, group = fused[proj]
                out[f"{stem}.{target}.{kind}"] = torch.cat(
                    [tensors[f"{stem}.{p}.{kind}"] for p in group], dim=0)
        return out

    def canonical(self, layer: Any):
        """Our layer's projections, or a stock Phi-3 layer's as row views of its fused ones."""
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj"):
            return super().canonical(layer)
        q_rows = attn.config.num_attention_heads * attn.head_dim
        kv_rows = attn.num_key_value_heads * attn.head_dim

        def split(t, widths):
            return (None,) * len(widths) if t is None else t.split(list(widths), dim=0)

        qkv = attn.qkv_proj
        (qw, kw, vw), (qb, kb, vb) = (split(qkv.weight, (q_rows, kv_rows, kv_rows)),
                                      split(qkv.bias, (q_rows, kv_rows, kv_rows)))
        n = mlp.gate_up_proj.weight.shape[0] // 2
        (gw, uw), (gb, ub) = (split(mlp.gate_up_proj.weight, (n, n)),
                              split(mlp.gate_up_proj.bias, (n, n)))
        return {"q": (qw, qb), "k": (kw, kb), "v": (vw, vb),
                "o": (attn.o_proj.weight, attn.o_proj.bias),
                "gate": (gw, gb), "up": (uw, ub),
                "down": (mlp.down_proj.weight, mlp.down_proj.bias)}


FAMILY = Phi3Family()
