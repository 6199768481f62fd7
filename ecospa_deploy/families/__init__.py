"""Model families: one file each, holding everything the toolkit knows about an architecture.

A family answers every architecture question the rest of the package asks: its stock HF classes
(variants as data), our config and model classes, the dense spec of a stock config, a
checkpoint's spec from its tensor shapes, where decoder layers, norms and embeddings live, the
canonical projections of a layer, norm kind, positions kind, activation, attention-mask kind,
maximum positions, and the vLLM model that serves it. Nothing outside this package branches on a
family's name or probes a family-specific attribute (tests/families/test_families.py greps for
both).

What a new family costs, honestly:

- a variant of an existing layout (Mistral, Qwen2 beside Llama): data in that family's file
  (a stock class, a tiny test config, flags such as q/k/v biases);
- a new module layout with the same computation (Phi-3's fused projections): one file here
  with ``to_ours``/``to_stock`` and its canonical projections, one line in ``FAMILY_MODULES``;
- a new architectural feature (Qwen3's q/k norm, learned positions): written once per place
  that computes a layer: our HF modeling, the engine (``engine/forward.py``, ``fused.py``),
  the vLLM model (``converters/vllm/``); ONNX exports the HF modeling, and the GGUF plan
  (``converters/gguf/plan.py``) must say whether llama.cpp computes it.

Importing this package (or a family file) imports neither torch nor transformers: classes are
``"module:Class"`` strings loaded on first use, so the CLI stays instant.
"""

from __future__ import annotations

import importlib
from functools import cache

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.families.base import Canon, Family, Parts
from ecospa_deploy.spec import ModelSpec

# family name -> module defining ``FAMILY``: the one line a new family adds.
FAMILY_MODULES: dict[str, str] = {
    "llama": "ecospa_deploy.families.llama",
    "gpt2": "ecospa_deploy.families.gpt2",
    "qwen3": "ecospa_deploy.families.qwen3",
    "phi3": "ecospa_deploy.families.phi3",
}


@cache
def families() -> dict[str, Family]:
    return {name: importlib.import_module(mod).FAMILY for name, mod in FAMILY_MODULES.items()}


def get(name: str) -> Family:
    if name not in FAMILY_MODULES:
        raise ValueError(f"family={name!r}; expected one of {sorted(FAMILY_MODULES)}")
    return families()[name]


def family_of(model_type: str | None, source: str = "config.json") -> Family:
    """The family of our ``model_type`` or of a stock one; a clear error otherwise.

    Families may share our model type (Qwen3 and Phi-3 are stored as ``ecospa_llama``): our type
    maps to the first family in ``FAMILY_MODULES`` that owns it, a stock type to the one listing
    it."""
    for fam in families().values():
        if model_type == fam.model_type or model_type in fam.stock:
            return fam
    allowed = sorted({t for f in families().values() for t in (f.model_type, *f.stock)})
    raise CheckpointError(f"{source}: model_type={model_type!r} is not supported; expected one "
                          f"of {allowed}")


def family_of_model(model) -> Family:
    """The family of a model (ours or stock HF), from its config's ``model_type``."""
    return family_of(getattr(model.config, "model_type", None),
                     source=f"{type(model).__name__}.config")


def max_positions(model) -> int | None:
    """The positions ``model`` can attend over (its family's answer), None when unlimited or
    when the model is of no family we know."""
    try:
        return family_of_model(model).max_positions(model.config)
    except (CheckpointError, AttributeError):
        return None


def spec_of(model) -> tuple[Family, ModelSpec]:
    """(family, spec) of our model (its ``ecospa_spec``) or of a stock HF model (dense spec)."""
    fam = family_of_model(model)
    if getattr(model.config, "ecospa", None):
        return fam, model.config.ecospa_spec
    return fam, fam.dense_spec(model.config)


def stock_model_types() -> dict[str, str]:
    """Every stock HF ``model_type`` we read, mapped to its family's name."""
    return {t: f.name for f in families().values() for t in f.stock}


__all__ = ["Family", "Parts", "Canon", "FAMILY_MODULES", "families", "get", "family_of",
           "family_of_model", "max_positions", "spec_of", "stock_model_types"]
