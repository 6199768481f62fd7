"""Random-weight models of real shapes, and their pruned twins, from ``ecospa_deploy/benchmark/shapes/<name>.json``.

Speed does not depend on weight values, so the benchmark builds dense models of real shapes
(LLaMA-1B, LLaMA-7B, GPT-2) with random weights directly on the device, and a pruned twin whose
per-layer dims come from the same file (e.g. the EcoSpa paper's Tables 10-11; each file's
``pruned.derivation`` says how its dims were obtained).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.spec import LayerSpec, ModelSpec

SHAPES_DIR = Path(__file__).with_name("shapes")


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_shape(name: str) -> dict[str, Any]:
    """The shape file ``name`` (a name in ``ecospa_deploy/benchmark/shapes/`` or a path to a JSON file)."""
    path = Path(name)
    if not (path.suffix == ".json" and path.exists()):
        path = SHAPES_DIR / f"{name}.json"
    if not path.exists():
        raise EcospaError(f"--shape {name!r} is unknown; expected one of {shape_names()} or a "
                          "path to a shape JSON file")
    return json.loads(path.read_text())


def hf_config(shape: dict[str, Any]):
    """The stock HF config of a shape file's dense model, built by its family."""
    from ecospa_deploy.families import get

    try:
        family = get(shape.get("family"))
    except ValueError as exc:
        raise EcospaError(f"shape {shape.get('name')!r}: {exc}") from None
    return family.stock_config(shape["dense"])


def pruned_spec(dense: ModelSpec, layers: list[dict[str, Any]], seed: int = 0) -> ModelSpec:
    """The twin's spec: each layer's dims from the file; kept rotary frequencies drawn (seeded)."""
    if len(layers) != dense.num_layers:
        raise EcospaError(f"pruned.layers has {len(layers)} entries; expected {dense.num_layers}")
    rng = random.Random(seed)
    half = dense.dense.head_dim // 2
    out = []
    for i, (base, d) in enumerate(zip(dense.layers, layers)):
        n_kv = d.get("num_key_value_heads", d["num_attention_heads"])
        kept = None
        if dense.rope:
            kept = tuple(tuple(sorted(rng.sample(range(half), d["qk_head_dim"] // 2)))
                         for _ in range(n_kv))
        layer = base.replace(num_attention_heads=d["num_attention_heads"],
                             num_key_value_heads=n_kv, qk_head_dim=d["qk_head_dim"],
                             v_head_dim=d["v_head_dim"], intermediate_size=d["intermediate_size"],
                             rope_kept=kept)
        layer.validate(i, dense.rope_head_dim)
        out.append(layer)
    return dense.replace_layers(out, method="shape-file twin", shape_seed=seed)


def construct(cls, config, dtype: torch.dtype, device) -> torch.nn.Module:
    """``cls(config)`` with its parameters created in ``dtype`` on ``device`` (no fp32 copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def build_model(shape: dict[str, Any], pruned: bool, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> torch.nn.Module:
    """Our model class with random weights (std 0.02, norms 1), built on ``device``."""
    from ecospa_deploy.families import family_of
    from ecospa_deploy.modeling import config_from_dense

    config = config_from_dense(hf_config(shape))
    if pruned:
        config.set_spec(pruned_spec(config.ecospa_spec, shape["pruned"]["layers"], seed))
    config._attn_implementation = "sdpa"
    cls = family_of(config.model_type).load("model_class")
    return _randomized(construct(cls, config, dtype, device), device, seed)


@torch.no_grad()
def build_stock_model(shape: dict[str, Any], dtype: torch.dtype, device: torch.device,
                      seed: int = 0) -> torch.nn.Module:
    """The shape's dense model as its stock transformers class (what servers that load stock
    classes only, such as ``transformers serve``, can serve), random weights as ``build_model``."""
    from ecospa_deploy.families import get

    config = hf_config(shape)
    cls = get(shape.get("family")).stock_class(config.model_type)
    return _randomized(construct(cls, config, dtype, device), device, seed)


def _randomized(model: torch.nn.Module, device, seed: int) -> torch.nn.Module:
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or ".ln_" in name or "ln_f" in name):
            p.fill_(1.0) if name.endswith("weight") else p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


__all__ = ["shape_names", "load_shape", "build_model", "build_stock_model", "pruned_spec",
           "LayerSpec"]
