"""Per-layer shape contract of a structurally pruned decoder: the single source of truth.

A pruned model cannot be described by one global config: every decoder layer keeps its own
number of query/KV heads, its own query/key head dim (``qk_head_dim``) and value/output head
dim (``v_head_dim``), its own kept rotary frequencies and its own FFN width. ``LayerSpec``
holds one layer, ``ModelSpec`` the list (validated once, against the layer count) plus the
dense shape it came from and the provenance of the pruning run.

This module imports only the standard library: it is copied verbatim next to the modeling
files when a checkpoint is saved, so ``trust_remote_code`` loading works without the package.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

SPEC_VERSION = 1
POSITIONS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")


class SpecError(ValueError):
    """A per-layer shape that the format cannot represent; the message names layer and field."""


def _fail(layer: int | None, fld: str, value: Any, expected: str) -> SpecError:
    where = f"layer {layer}: " if layer is not None else ""
    shown = value if isinstance(value, str) and value.startswith("<") else repr(value)
    return SpecError(f"{where}{fld}={shown} is invalid; expected {expected}")


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one decoder layer.

    ``rope_kept[g]`` lists, for KV head ``g``, the rotary frequency indices (``0 <= j <
    rope_head_dim/2``) whose dim pair ``(j, j + rope_head_dim/2)`` survives, in the order the
    dims are stored: a pruned head stores ``[x_j for j in kept] + [x_{j+d/2} for j in kept]``,
    which is again HF's rotate-half layout. Query heads use the list of their KV group. An index
    may repeat only on zero-padded pairs (they add nothing to q·k whatever their rotation).
    ``None`` for models without RoPE (GPT-2), where q/k dims need no pairing.

    ``softmax_scale`` stays at the dense model's value so the kept dims compute exactly what
    they computed before pruning.
    """

    num_attention_heads: int
    num_key_value_heads: int
    qk_head_dim: int
    v_head_dim: int
    intermediate_size: int
    softmax_scale: float
    rope_kept: tuple[tuple[int, ...], ...] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    gate_up_bias: bool = False
    down_bias: bool = False
    sliding_window: int | None = None

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.qk_head_dim

    @property
    def k_width(self) -> int:
        return self.num_key_value_heads * self.qk_head_dim

    @property
    def v_width(self) -> int:
        return self.num_key_value_heads * self.v_head_dim

    @property
    def o_width(self) -> int:
        return self.num_attention_heads * self.v_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Elements of K plus V stored per token (all KV heads of this layer)."""
        return self.k_width + self.v_width

    def num_params(self, hidden_size: int, gated_mlp: bool = True, norms: int = 2,
                   norm_bias: bool = False) -> int:
        """Parameters of this layer (weights, biases, and ``norms`` LayerNorm/RMSNorm)."""
        h = hidden_size
        attn = h * (self.q_width + self.k_width + self.v_width) + self.o_width * h
        if self.qkv_bias:
            attn += self.q_width + self.k_width + self.v_width
        if self.o_bias:
            attn += h
        n_in = 2 if gated_mlp else 1
        mlp = n_in * h * self.intermediate_size + self.intermediate_size * h
        if self.gate_up_bias:
            mlp += n_in * self.intermediate_size
        if self.down_bias:
            mlp += h
        return attn + mlp + norms * _norm_params(h, norm_bias)

    def replace(self, **changes: Any) -> "LayerSpec":
        return dataclasses.replace(self, **changes)

    # -- validation ------------------------------------------------------------------------
    def validate(self, layer: int | None = None, rope_head_dim: int | None = None) -> None:
        """Raise ``SpecError`` naming ``layer`` and the field on the first violation."""
        for name in ("num_attention_heads", "num_key_value_heads", "qk_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _fail(layer, name, v, "an integer >= 1 (prune a whole layer's attention "
                            "by keeping one head; the format needs at least one)")
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 0:
            raise _fail(layer, "intermediate_size", self.intermediate_size, "an integer >= 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise _fail(layer, "num_attention_heads", self.num_attention_heads,
                        f"a multiple of num_key_value_heads={self.num_key_value_heads} (GQA "
                        "groups must be equal; pad a group with zero heads instead)")
        if not (isinstance(self.softmax_scale, (int, float)) and math.isfinite(self.softmax_scale)
                and self.softmax_scale > 0):
            raise _fail(layer, "softmax_scale", self.softmax_scale, "a finite float > 0")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise _fail(layer, "sliding_window", self.sliding_window, "None or an integer >= 1")
        if rope_head_dim is None:
            if self.rope_kept is not None:
                raise _fail(layer, "rope_kept", "<list>", "None for a model without RoPE")
            return
        if self.qk_head_dim % 2:
            raise _fail(layer, "qk_head_dim", self.qk_head_dim,
                        "an even number with RoPE (rotary pairs (j, j+d/2) are kept or removed "
                        "together)")
        if self.rope_kept is None:
            raise _fail(layer, "rope_kept", None, "one list of kept rotary frequencies per KV head")
        if len(self.rope_kept) != self.num_key_value_heads:
            raise _fail(layer, "rope_kept", f"<{len(self.rope_kept)} lists>",
                        f"{self.num_key_value_heads} lists (one per KV head)")
        half = rope_head_dim // 2
        for g, kept in enumerate(self.rope_kept):
            if len(kept) != self.qk_head_dim // 2:
                raise _fail(layer, f"rope_kept[{g}]", f"<{len(kept)} indices>",
                            f"qk_head_dim/2 = {self.qk_head_dim // 2} indices")
            if any(not isinstance(j, int) or j < 0 or j >= half for j in kept):
                raise _fail(layer, f"rope_kept[{g}]", list(kept), f"integers in [0, {half})")
            # A pair rotates at one frequency: two pairs at the same one mean a corrupt spec,
            # except the zero-weight pairs padding appends (frequency 0, at the end).
            real = list(kept)
            while len(real) > 1 and real[-1] == 0 and 0 in real[:-1]:
                real.pop()
            if len(set(real)) != len(real):
                raise _fail(layer, f"rope_kept[{g}]", list(kept), "distinct frequencies (only "
                            "trailing zero-padding pairs may repeat frequency 0)")

    # -- (de)serialization -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_kept is not None:
            d["rope_kept"] = [list(k) for k in self.rope_kept]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], layer: int | None = None) -> "LayerSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise _fail(layer, "keys", unknown, f"only {sorted(names)}")
        missing = sorted(
            f.name for f in dataclasses.fields(cls)
            if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise _fail(layer, "keys", f"missing {missing}", f"all of {sorted(names)}")
        d = dict(d)
        if d.get("rope_kept") is not None:
            d["rope_kept"] = tuple(tuple(int(j) for j in k) for k in d["rope_kept"])
        return cls(**d)


@dataclass(frozen=True)
class DenseShape:
    """The dense model a spec was pruned from: what "% of dense" and RoPE are measured against."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int

    def layer(self, softmax_scale: float | None = None, rope: bool = True,
              **flags: Any) -> LayerSpec:
        """The dense layer as a ``LayerSpec`` (every head, dim, frequency and neuron kept)."""
        half = self.head_dim // 2
        return LayerSpec(
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            qk_head_dim=self.head_dim,
            v_head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            softmax_scale=self.head_dim ** -0.5 if softmax_scale is None else softmax_scale,
            rope_kept=tuple(tuple(range(half)) for _ in range(self.num_key_value_heads))
            if rope else None,
            **flags,
        )


@dataclass(frozen=True)
class ModelSpec:
    """All layers of one model, validated once, plus where they came from."""

    hidden_size: int
    layers: tuple[LayerSpec, ...]
    dense: DenseShape
    positions: str = "rope"        # "rope" | "learned" (absolute position embeddings)
    norm: str = "rmsnorm"          # "rmsnorm" | "layernorm" (LayerNorm carries a bias)
    gated_mlp: bool = True
    # Qwen3's per-head RMSNorm on q and on k before RoPE (``qk_norm_heads`` gives its weight
    # layout). Its sum of squares is divided by the *dense* head dim, so a pruned head computes
    # exactly what the masked dense head did (pruned dims were zero there). Needs RoPE.
    qk_norm: bool = False
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rope(self) -> bool:
        """Whether q/k are rotated (RoPE): q/k dims then come in rotate-half pairs."""
        return self.positions == "rope"

    @property
    def rope_head_dim(self) -> int | None:
        return self.dense.head_dim if self.rope else None

    @property
    def norm_bias(self) -> bool:
        """Whether the norms carry a bias: LayerNorm does, RMSNorm does not."""
        return self.norm == "layernorm"

    @property
    def norm_params(self) -> int:
        """Parameters of one norm of this model (the final norm, or one of a layer's two)."""
        return _norm_params(self.hidden_size, self.norm_bias)

    def layer_params(self, layer: LayerSpec, norms: int = 2) -> int:
        """Parameters of ``layer`` in this model, counting ``norms`` of its norms (the q/k norm
        weights, which follow the q/k dims, always count)."""
        n = layer.num_params(self.hidden_size, self.gated_mlp, norms, self.norm_bias)
        if self.qk_norm:
            n += 2 * qk_norm_heads(layer, self.rope_head_dim) * layer.qk_head_dim
        return n

    def validate(self, num_hidden_layers: int | None = None) -> "ModelSpec":
        if num_hidden_layers is not None and num_hidden_layers != len(self.layers):
            raise SpecError(f"ecospa.layers has {len(self.layers)} entries; expected "
                            f"num_hidden_layers={num_hidden_layers} (one spec per layer)")
        if not self.layers:
            raise SpecError("ecospa.layers is empty; expected one spec per decoder layer")
        if self.positions not in POSITIONS:
            raise _fail(None, "ecospa.positions", self.positions, f"one of {list(POSITIONS)}")
        if self.norm not in NORMS:
            raise _fail(None, "ecospa.norm", self.norm, f"one of {list(NORMS)}")
        if not isinstance(self.qk_norm, bool):
            raise _fail(None, "ecospa.qk_norm", self.qk_norm, "true or false")
        if self.qk_norm and not self.rope:
            raise _fail(None, "ecospa.qk_norm", True, "false for a model without RoPE (the q/k "
                        "norm weight layout follows rope_kept)")
        if self.rope and self.dense.head_dim % 2:
            raise SpecError(f"dense head_dim={self.dense.head_dim} is odd; RoPE needs an even "
                            "head dim")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerSpec):
                raise _fail(i, "type", type(layer).__name__, "LayerSpec")
            layer.validate(i, self.rope_head_dim)
        return self

    # -- maxima for tools that size buffers from global keys ------------------------------
    def maxima(self) -> dict[str, int]:
        return {
            "num_attention_heads": max(layer.num_attention_heads for layer in self.layers),
            "num_key_value_heads": max(layer.num_key_value_heads for layer in self.layers),
            # Rounded up to even: transformers >= 5.23 validates a global RoPE head_dim as even.
            "head_dim": _round_even(max(max(layer.qk_head_dim, layer.v_head_dim)
                                        for layer in self.layers)),
            "intermediate_size": max(layer.intermediate_size for layer in self.layers),
        }

    def replace_layers(self, layers: Iterable[LayerSpec], **provenance: Any) -> "ModelSpec":
        prov = dict(self.provenance)
        prov.update(provenance)
        return dataclasses.replace(self, layers=tuple(layers), provenance=prov).validate()

    def is_uniform(self) -> bool:
        return len({dataclasses.replace(layer, rope_kept=None) for layer in self.layers}) == 1

    # -- (de)serialization: the ``ecospa`` block of config.json ----------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": SPEC_VERSION,
            "hidden_size": self.hidden_size,
            "positions": self.positions,
            "norm": self.norm,
            "gated_mlp": self.gated_mlp,
            "dense": dataclasses.asdict(self.dense),
            "layers": [layer.to_dict() for layer in self.layers],
            "provenance": dict(self.provenance),
        }
        if self.qk_norm:            # written only when on: blocks without it read as before
            d["qk_norm"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        if not isinstance(d, dict):
            raise SpecError(f"ecospa block is {type(d).__name__}; expected a JSON object")
        version = d.get("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise SpecError(f"ecospa.version={version!r} is not supported; expected "
                            f"{SPEC_VERSION}")
        for key in ("hidden_size", "dense", "layers"):
            if key not in d:
                raise SpecError(f"ecospa block lacks {key!r}; expected keys hidden_size, "
                                "dense, layers[, positions, norm, gated_mlp, qk_norm, provenance]")
        layers, dense = d["layers"], d["dense"]
        if not isinstance(layers, list):
            raise SpecError(f"ecospa.layers is {type(layers).__name__}; expected a list")
        hidden = d["hidden_size"]
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise _fail(None, "ecospa.hidden_size", hidden, "an integer >= 1")
        _check_dense(dense)
        for i, x in enumerate(layers):
            if not isinstance(x, dict):
                raise _fail(i, "ecospa.layers entry", f"<{type(x).__name__}>", "an object")
        provenance = d.get("provenance", {})
        if not isinstance(provenance, dict):
            raise _fail(None, "ecospa.provenance", f"<{type(provenance).__name__}>",
                        "an object")
        try:
            return cls(
                hidden_size=hidden,
                layers=tuple(LayerSpec.from_dict(x, i) for i, x in enumerate(layers)),
                dense=DenseShape(**dense),
                # blocks written before "positions"/"norm" existed said "rope" and implied
                # the norm by the MLP kind (the only two families then)
                positions=d.get("positions", "rope" if d.get("rope", True) else "learned"),
                norm=d.get("norm", "rmsnorm" if d.get("gated_mlp", True) else "layernorm"),
                gated_mlp=bool(d.get("gated_mlp", True)),
                qk_norm=d.get("qk_norm", False),
                provenance=dict(provenance),
            ).validate()
        except SpecError:
            raise
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            # a field of the wrong type deep inside (a rope_kept entry that is not a list...)
            raise SpecError(f"ecospa block is malformed ({type(exc).__name__}: {exc})") from None


def _check_dense(dense: Any) -> None:
    names = [f.name for f in dataclasses.fields(DenseShape)]
    if not isinstance(dense, dict) or sorted(dense) != sorted(names):
        raise _fail(None, "ecospa.dense", f"<{type(dense).__name__}>",
                    f"an object with exactly {names}")
    for name in names:
        v = dense[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _fail(None, f"ecospa.dense.{name}", v, "an integer >= 1")


def _norm_params(hidden_size: int, bias: bool) -> int:
    return hidden_size * (2 if bias else 1)


def _round_even(n: int) -> int:
    return n + n % 2


def qk_norm_heads(layer: LayerSpec, rope_head_dim: int | None) -> int:
    """Rows of a layer's ``q_norm``/``k_norm`` weight (each ``qk_head_dim`` long).

    1 (one row shared by every head, stock Qwen3's layout) while the layer keeps every dense
    q/k dim in dense order: dense layers and whole-head pruning, so stock and foreign checkpoints
    load by name. Otherwise one row per KV head, aligned with k_proj's heads (a query head uses
    its KV group's row), since heads may keep different dims. Surgery only ever moves a layer
    from shared to per-head (slicing never restores the dense dims, padding appends zero pairs
    that break dense order), so distinct per-head rows (after training) are never merged; the
    one way back, slicing the padding off a padded dense layer, checks that its rows agree.
    """
    if rope_head_dim is None or layer.rope_kept is None or keeps_dense_rope(layer, rope_head_dim):
        return 1
    return layer.num_key_value_heads


def keeps_dense_rope(layer: LayerSpec, rope_head_dim: int) -> bool:
    """Whether every KV head of a RoPE layer keeps every dense q/k dim, in dense order."""
    dense = list(range(rope_head_dim // 2))
    return layer.qk_head_dim == rope_head_dim and all(list(k) == dense for k in layer.rope_kept)


def rope_dim_index(kept: Sequence[int], rope_head_dim: int) -> list[int]:
    """Dense head-dim positions of a pruned head whose kept rotary frequencies are ``kept``."""
    half = rope_head_dim // 2
    return [int(j) for j in kept] + [int(j) + half for j in kept]
