"""One entry point for every pruning method: target → masks → (align) → slice → provenance.

``target_size`` is a fraction of the input model's *total* parameter count (embeddings and
norms included, tied weights once), the quantity EcoSpa's "target model size c" and the
LLM-pruning papers' "ratio" refer to. Masks are relative to the input model and are recorded
in ``ecospa.provenance.kept`` so a result can be replayed and checked (golden invariant).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ecospa_deploy.errors import EcospaError, UnsupportedError
from ecospa_deploy.families.base import load
from ecospa_deploy.prune.align import AlignReport, align_masks
from ecospa_deploy.prune.floors import DEFAULT_MIN_KEEP, Floors, check_min_keep
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import slice_model
from ecospa_deploy.prune.tracking import count_params, masks_to_json

from ecospa_deploy.prune.methods import METHODS  # noqa: E402  (torch-free, for the CLI)

# anchors: "module:function" with the signature (model, windows, target, floors, batch_size,
# heads=...) -> masks, imported when used
ANCHORS = {
    "wanda-sp": "ecospa_deploy.prune.wanda_sp:prune_wanda_sp",
    "flap": "ecospa_deploy.prune.flap:prune_flap",
    "llm-pruner": "ecospa_deploy.prune.llm_pruner:prune_llm_pruner",
}
HEADS = ("groups", "query")
# ecospa-act keeps at least this share of every layer's q/k dims: on SmolLM2-135M a uniform
# 25 % q/k cut costs 1.13x perplexity, while EcoSpa's energy-share rule (theta) cut some layers
# to 8 of 64 dims at 20 % pruning and the chat answers came back empty (docs/real_model.md)
ACT_QK_MIN_KEEP = 0.75


@dataclass
class PruneOptions:
    method: str = "ecospa"
    target_size: float = 0.7
    top_k: float = 0.3
    theta: float = 0.9
    align: int | None = None
    batch_size: int = 1
    seed: int = 0
    min_keep: float = DEFAULT_MIN_KEEP   # per-layer floor, a fraction of the dense widths
    rounds: int = 20                     # ecospa: at most this many rounds
    heads: str = "groups"                # anchors: whole KV groups, or query heads per group

    def validate(self) -> "PruneOptions":
        check_min_keep(self.min_keep)
        if self.method not in METHODS:
            raise EcospaError(f"method={self.method!r} is not supported; expected one of "
                              f"{list(METHODS)}")
        if not (isinstance(self.target_size, (int, float)) and 0 < self.target_size < 1):
            raise EcospaError(f"target_size={self.target_size!r} is invalid; expected a fraction "
                              "of the input's parameters strictly between 0 and 1 (0.7 keeps 70%)")
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise EcospaError(f"rounds={self.rounds!r} is invalid; expected an integer >= 1")
        if self.heads not in HEADS:
            raise EcospaError(f"heads={self.heads!r} is not supported; expected one of "
                              f"{list(HEADS)}")
        if self.align is not None and self.align < 1:
            raise EcospaError(f"align={self.align} is invalid; expected an integer >= 1")
        return self


@dataclass
class PruneResult:
    masks: list[LayerMask]
    params_before: int
    params_target: int
    params_after: int
    seconds: float
    rounds: int = 0
    align: AlignReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def compute_masks(model: nn.Module, windows: torch.Tensor, opts: PruneOptions,
                  in_place: bool = False) -> tuple[list[LayerMask], int, dict[str, Any]]:
    """(masks relative to ``model``, rounds, method facts). May rewrite ``model``'s weights
    (numerical compensation, uncoupled re-pairing); changes its shapes only for ecospa with
    ``in_place`` (the rounds then slice ``model`` itself and it ends pruned)."""
    target = round(opts.target_size * count_params(model))
    floors = Floors.of(model.config.ecospa_spec, opts.min_keep)
    facts: dict[str, Any] = {"min_keep": opts.min_keep}
    if opts.method in ("ecospa", "ecospa-act"):
        from ecospa_deploy.prune.ecospa import EcoSpaConfig, prune_ecospa

        scores = "activations" if opts.method == "ecospa-act" else "weights"
        cfg = EcoSpaConfig(opts.top_k, opts.theta, opts.rounds, scores).validate()
        if scores == "activations":
            floors = floors.raised(model.config.ecospa_spec, "qk", ACT_QK_MIN_KEEP)
            facts["qk_min_keep"] = ACT_QK_MIN_KEEP
        masks, reports = prune_ecospa(model, windows, target, cfg, batch_size=opts.batch_size,
                                      floors=floors, in_place=in_place)
        return masks, len(reports), {**facts, "top_k": opts.top_k, "theta": opts.theta,
                                     "max_rounds": opts.rounds, "scores": scores}
    if opts.method in ("numerical", "numerical-dims"):
        from ecospa_deploy.prune.numerical import NumericalConfig, prune_numerical

        cfg = NumericalConfig(dims=opts.method == "numerical-dims")
        masks = prune_numerical(model, windows, target, cfg, opts.batch_size, floors)
        return masks, 1, {**facts, "damp": cfg.damp, "newton_steps": cfg.newton_steps,
                          "compensation": "weights (Eq. 11)", "dims": cfg.dims}
    if opts.method in ANCHORS:
        prune = load(ANCHORS[opts.method])
        masks = prune(model, windows, target, floors, opts.batch_size, heads=opts.heads)
        return masks, 1, {**facts, "heads": opts.heads}
    from ecospa_deploy.prune.baselines import prune_uniform

    masks, ratio = prune_uniform(model, target, opts.method, floors)
    return masks, 1, {**facts, "keep_fraction": ratio}


def check_supported(model: nn.Module) -> None:
    from ecospa_deploy.modeling import is_ecospa_model

    if not is_ecospa_model(model):
        raise UnsupportedError(
            f"cannot prune a {type(model).__name__}; expected one of our model classes (load "
            "with ecospa_deploy.loading.load_model, or convert a stock Llama/Mistral/Qwen2/GPT-2 "
            "with ecospa_deploy.modeling.from_hf)")


def prune_model(model: nn.Module, windows: torch.Tensor, opts: PruneOptions,
                calibration: dict[str, Any] | None = None) -> PruneResult:
    """Prune ``model`` in place to ``opts.target_size`` of its parameters; record provenance."""
    opts.validate()
    check_supported(model)
    torch.manual_seed(opts.seed)
    start = time.perf_counter()
    spec_in = model.config.ecospa_spec
    before = count_params(model)
    target = round(opts.target_size * before)
    # EcoSpa's rounds slice the model itself unless --align needs the input's weights after.
    in_place = opts.method in ("ecospa", "ecospa-act") and not opts.align
    masks, rounds, facts = compute_masks(model, windows, opts, in_place=in_place)
    report = None
    if opts.align:
        masks, report = align_masks(model, masks, opts.align, target,
                                    Floors.of(spec_in, opts.min_keep))
    kept = masks_to_json(masks, spec_in)
    spec = model.config.ecospa_spec if in_place else slice_model(model, masks)
    after = count_params(model)
    prov: dict[str, Any] = {
        "method": opts.method, "target_size": opts.target_size, "params_before": before,
        "params_target": target, "params_after": after, "seed": opts.seed, **facts,
        "calibration": calibration or {}, "align": opts.align, "kept": kept,
    }
    if spec_in.provenance.get("method"):
        prov["previous"] = {k: v for k, v in spec_in.provenance.items() if k != "kept"}
    model.config.set_spec(spec.replace_layers(spec.layers, **prov))
    return PruneResult(masks, before, target, after, time.perf_counter() - start, rounds, report,
                       facts)


__all__ = ["METHODS", "PruneOptions", "PruneResult", "prune_model", "compute_masks"]
