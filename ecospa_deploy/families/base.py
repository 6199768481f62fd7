"""What a family is: data (names, classes, kinds) plus the few functions only it can answer.

The class attributes are facts; the methods take modules or configs and never import torch at
module level. Every family module defines one subclass instance ``FAMILY``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.spec import ModelSpec, SpecError

# {q,k,v,o,[gate,]up,down: (weight [out, in], bias or None)}
Canon = dict[str, tuple[Any, Any]]


@dataclass(frozen=True)
class Parts:
    """The non-layer modules of a causal LM: token embedding, learned positions (or None),
    final norm, rotary module (or None)."""

    embed: Any
    positions: Any
    final_norm: Any
    rotary: Any


def load(target: str) -> Any:
    """The object named by ``"module:Name"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class Family:
    name: ClassVar[str]
    model_type: ClassVar[str]                 # our config.json model_type
    stock: ClassVar[dict[str, str]]           # stock model_type -> "module:CausalLMClass"
    config_class: ClassVar[str]               # "module:Class" of our config
    model_class: ClassVar[str]                # our causal LM
    base_model_class: ClassVar[str]           # our bare decoder (AutoModel)
    vllm_model: ClassVar[str]                 # our vLLM model, under ecospa_deploy.converters
    layers_key: ClassVar[str]                 # config key of the decoder-layer count
    norm: ClassVar[str]                       # "rmsnorm" | "layernorm"
    positions: ClassVar[str]                  # "rope" | "learned"
    gated_mlp: ClassVar[bool]
    # how our model's forward takes its attention mask: "by_type" (a dict per attention type,
    # transformers' Llama-family layout) or "4d" (one additive tensor, GPT-2)
    attention_mask: ClassVar[str]
    # keys of a stock config that describe one global shape: ours derives them from the spec
    global_keys: ClassVar[tuple[str, ...]]
    tiny: ClassVar[dict[str, dict[str, Any]]]  # stock model_type -> its tiny test config keys
    train_shapes: ClassVar[dict[str, dict[str, Any]]]   # named shapes ecospa_deploy.train builds
    train_defaults: ClassVar[dict[str, Any]]            # stock-config keys those models share
    # whether stock checkpoints name or shape tensors differently from ours (fused projections):
    # then every stock -> ours path converts through ``to_ours``; else they load as they are
    converts_checkpoint: ClassVar[bool] = False

    @property
    def architecture(self) -> str:
        """The ``architectures`` entry of our config.json (our causal LM's class name)."""
        return self.model_class.rpartition(":")[2]

    def load(self, what: str) -> Any:
        """The class named by attribute ``what`` (``"config_class"``, ``"model_class"``...)."""
        return load(getattr(self, what))

    @property
    def primary_stock(self) -> str:
        """The stock model_type this family's models are trained and exported as."""
        return next(iter(self.stock))

    def stock_class(self, model_type: str) -> Any:
        return load(self.stock[model_type])

    # -- specs --------------------------------------------------------------------------
    def dense_spec(self, config: Any) -> ModelSpec:
        """The all-kept spec of a stock config of this family."""
        raise NotImplementedError

    def infer_spec(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> ModelSpec:
        """Per-layer dims of a checkpoint from its tensor shapes (whole heads pruned)."""
        raise NotImplementedError

    def num_layers(self, config: Any) -> int:
        return getattr(config, self.layers_key)

    # -- stock checkpoint <-> ours (tensor names and shapes) ------------------------------
    def to_ours(self, tensors: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
        """A stock checkpoint's tensors (names as in the stock causal LM, or its bare decoder)
        as our model names them, for ``spec``; exact (views where possible). Identity here."""
        return tensors

    def to_stock(self, tensors: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
        """The inverse of ``to_ours``: our tensors named and shaped as a stock checkpoint stores
        them (meta tensors give the stock shapes a checkpoint must have). Identity here."""
        return tensors

    # -- configs ------------------------------------------------------------------------
    def stock_config(self, dims: dict[str, Any], model_type: str | None = None) -> Any:
        """A stock HF config of ``model_type`` (default: the primary one) from generic dims
        (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``,
        ``vocab_size``, ...); other keys pass through."""
        raise NotImplementedError

    def our_config(self, stock: Any, spec: ModelSpec, drop: tuple[str, ...]) -> Any:
        """Our config for a stock config and a spec (``drop``: keys never copied over)."""
        kwargs = {k: v for k, v in stock.to_dict().items()
                  if k not in drop and k not in self.global_keys}
        return self.load("config_class").from_spec(spec, **kwargs)

    def norm_eps(self, config: Any) -> float:
        raise NotImplementedError

    def activation(self, config: Any) -> str:
        raise NotImplementedError

    def max_positions(self, config: Any) -> int | None:
        raise NotImplementedError

    # -- modules (ours and stock alike: the attribute names are the same) -------------------
    def decoder_layers(self, model: Any) -> Any:
        raise NotImplementedError

    def canonical(self, layer: Any) -> Canon:
        """The layer's projections ``{q,k,v,o,[gate,]up,down: (weight [out, in], bias)}``: one
        implementation, in our modeling file (``canonical_fn``), for our layers and stock ones."""
        return load(self.canonical_fn)(layer)

    def norms(self, layer: Any) -> tuple[Any, Any]:
        """A decoder layer's (pre-attention, pre-MLP) norm modules."""
        raise NotImplementedError

    def parts(self, model: Any) -> Parts:
        raise NotImplementedError

    def stat_modules(self, layer: Any) -> dict[str, Any]:
        """Modules whose *inputs* activation-aware pruners measure: ``attn`` (takes the normed
        attention input), ``o`` (takes the concatenated head outputs), ``down`` (takes the FFN
        activations)."""
        raise NotImplementedError


# -- shared by the families' shape inference -------------------------------------------
def heads_in(n: int, d: int, what: str, layer: int, tensor: str) -> int:
    """``n / d`` whole heads, or a SpecError saying why a foreign checkpoint cannot be read."""
    if n % d:
        raise SpecError(f"layer {layer}: {tensor} has {n} {what}, not a multiple of head_dim "
                        f"{d}; foreign checkpoints must prune whole heads (use our format for "
                        "per-dim pruning)")
    return n // d


def matrix_shape(shapes: dict[str, tuple[int, ...]], name: str, layer: int) -> tuple[int, ...]:
    """A weight matrix's shape; shape inference needs both of its dims."""
    if name not in shapes:
        raise CheckpointError(f"layer {layer}: missing tensor {name!r}")
    if len(shapes[name]) != 2:
        raise CheckpointError(f"layer {layer}: tensor {name!r} has shape {list(shapes[name])}; "
                              "expected a 2-D weight matrix")
    return shapes[name]


__all__ = ["Family", "Parts", "Canon", "load", "heads_in", "matrix_shape"]
