"""Numerical Pruning (Newton-method numerical score, global ranking, Eq. 11 compensation).

Per layer and module (attention: ``W = W_O``, input ``X`` = the concatenated head outputs; MLP:
``W = W_down``, ``X`` = the activations ``act(gate)·up``), in the paper's layout
``W ∈ R^{D×D'}`` (``D`` input channels):

- **Score** (Algorithm 1): ``z`` minimises ``½Σ_i‖XW_i − X(z∘W_i)‖² + ½λ(⟨1,z⟩ − r)²`` with
  Newton's method, gradient ``g = H_l(z − 1) + λ(⟨1,z⟩ − r)1`` and Hessian
  ``H = (WWᵀ)∘(XᵀX) + λ·11ᵀ``. The objective is quadratic, so the first Newton step from
  ``z₀ = 1`` already lands on the optimum; we iterate until the step vanishes (at most ``T``).
  ``r = (1 − ρ)D`` with ``ρ`` the model's overall pruning ratio; the paper leaves ``λ`` open: we
  use ``λ = mean(diag(H_l))`` so the penalty has the data term's scale.
- **Heads** score by the mean of their channels' ``z`` (a GQA group by the mean over its query
  heads: removing a K/V head removes its whole group); **MLP channels** keep their own ``z``.
- **Global ranking** (Eq. 8): head scores are multiplied by ``α``, the parameters one head unit
  holds over those of one MLP channel, which is the paper's ``α = 4·D_h/3`` for a Llama layer
  without GQA (``4·D·D_h`` vs ``3·D``); units are removed lowest first until the parameter
  target (instead of the paper's unit-count threshold ``η``, so every method lands on the same
  parameter budget). A removal that would undershoot the target by more than one MLP channel
  is skipped; every layer keeps at least one head and one channel.
- **Compensation** (Eq. 11): the kept rows of ``W_O``/``W_down`` get
  ``δW = −G⁻¹M_p(M_pᵀG⁻¹M_p)⁻¹M_pᵀW`` with ``G = 2XᵀX + γI`` (Remark 5 dampening,
  ``γ = damp · mean(diag(2XᵀX))``). It is a weight update only: no bias is added, so the
  layer's ``o_bias``/``down_bias`` flags do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune.calibration import batches
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.tracking import KeptIndices, LayerKeep, ParamCounter
from ecospa_deploy.prune.units import unit_counts


@dataclass
class NumericalConfig:
    newton_steps: int = 50
    damp: float = 0.01
    compensate: bool = True


def _output_modules(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(attention output projection, MLP down projection) of a decoder layer."""
    if hasattr(layer, "self_attn"):
        return layer.self_attn.o_proj, layer.mlp.down_proj
    return layer.attn.c_proj, layer.mlp.c_proj


@torch.no_grad()
def input_gram(model: nn.Module, windows: torch.Tensor, batch_size: int = 1
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``XᵀX`` of every layer's o_proj and down_proj inputs over the calibration windows."""
    device = next(model.parameters()).device
    grams: list[list[torch.Tensor | None]] = [[None, None] for _ in model.decoder_layers]
    hooks = []
    for i, layer in enumerate(model.decoder_layers):
        for j, module in enumerate(_output_modules(layer)):
            def hook(_m, args, _out, i=i, j=j):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                g = x.t() @ x
                grams[i][j] = g if grams[i][j] is None else grams[i][j] + g
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches(windows, batch_size)), desc="numerical: activations",
                          leave=False):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [(a, m) for a, m in grams]


def numerical_score(w: torch.Tensor, xtx: torch.Tensor, r: float, steps: int = 50
                    ) -> torch.Tensor:
    """Algorithm 1: ``z ∈ R^D`` for ``W ∈ R^{D×D'}`` and ``XᵀX ∈ R^{D×D}``."""
    w = w.to(torch.float64)
    h_l = (w @ w.t()) * xtx
    lam = float(h_l.diagonal().mean().clamp_min(1e-12))
    d = w.shape[0]
    ones = torch.ones(d, dtype=torch.float64, device=w.device)
    hess = h_l + lam * torch.ones(d, d, dtype=torch.float64, device=w.device)
    hess = hess + 1e-9 * lam * torch.eye(d, dtype=torch.float64, device=w.device)
    z = ones.clone()
    for _ in range(max(1, steps)):
        g = h_l @ (z - ones) + lam * (z.sum() - r) * ones
        step = torch.linalg.solve(hess, g)
        z = z - step
        if float(step.abs().max()) < 1e-9:
            break
    return z


def compensate(w: torch.Tensor, xtx: torch.Tensor, pruned: list[int], damp: float = 0.01
               ) -> torch.Tensor:
    """Eq. 11: ``W + δW`` for ``W ∈ R^{D×D'}``; rows ``pruned`` become zero, the rest adapt."""
    if not pruned:
        return w.clone()
    w64 = w.to(torch.float64)
    g = 2 * xtx.to(torch.float64)
    g = g + damp * float(g.diagonal().mean().clamp_min(1e-12)) * torch.eye(
        g.shape[0], dtype=torch.float64, device=g.device)
    ginv = torch.linalg.inv(g)
    p = torch.tensor(pruned, dtype=torch.long, device=w.device)
    delta = -ginv[:, p] @ torch.linalg.solve(ginv[p][:, p], w64[p])
    out = w64 + delta
    out[p] = 0
    return out.to(w.dtype)


def reconstruction_error(w: torch.Tensor, w_new: torch.Tensor, xtx: torch.Tensor) -> float:
    """``‖XW − XW̃‖_F²`` from the Gram matrix: ``tr((W−W̃)ᵀ XᵀX (W−W̃))``."""
    diff = (w - w_new).to(torch.float64)
    return float((diff * (xtx.to(torch.float64) @ diff)).sum())


def prune_numerical(model: nn.Module, windows: torch.Tensor, target: int,
                    cfg: NumericalConfig | None = None, batch_size: int = 1
                    ) -> list[LayerMask]:
    """Masks relative to ``model``; with ``cfg.compensate`` also Eq. 11 weight updates in place."""
    cfg = cfg or NumericalConfig()
    spec = model.config.ecospa_spec
    counter = ParamCounter(model)
    total = counter.total(spec.layers)
    rho = min(max(1.0 - target / total, 0.0), 1.0)
    grams = input_gram(model, windows, batch_size)
    units = []       # (score, layer, kind, index)
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        c = layer.canonical()
        xa, xm = grams[i]
        w_o = c["o"][0].detach().t()
        w_d = c["down"][0].detach().t()
        z_attn = numerical_score(w_o, xa.to(w_o.device), (1 - rho) * w_o.shape[0],
                                 cfg.newton_steps)
        z_mlp = numerical_score(w_d, xm.to(w_d.device), (1 - rho) * w_d.shape[0],
                                cfg.newton_steps)
        n_kv = lspec.num_key_value_heads
        group_scores = z_attn.view(n_kv, -1).mean(1)
        group = lspec.num_attention_heads // n_kv
        one_group = lspec.replace(num_attention_heads=lspec.num_attention_heads - group,
                                  num_key_value_heads=n_kv - 1, rope_kept=None) \
            if n_kv > 1 else None
        neuron_cost = counter.layer(i, lspec) - counter.layer(
            i, lspec.replace(intermediate_size=lspec.intermediate_size - 1, rope_kept=None))
        if one_group is not None:
            group_cost = counter.layer(i, lspec) - counter.layer(i, one_group)
            alpha = group_cost / neuron_cost
            units += [(alpha * float(s), i, "group", g) for g, s in enumerate(group_scores)]
        units += [(float(s), i, "ffn", j) for j, s in enumerate(z_mlp)]
    units.sort(key=lambda u: u[0])
    layers = list(spec.layers)
    removed_groups = [set() for _ in layers]
    removed_ffn = [set() for _ in layers]
    current = total
    for _, i, kind, idx in units:
        if current <= target:
            break
        lspec = layers[i]
        if kind == "group":
            if lspec.num_key_value_heads <= 1:
                continue
            group = lspec.num_attention_heads // lspec.num_key_value_heads
            new = lspec.replace(num_attention_heads=lspec.num_attention_heads - group,
                                num_key_value_heads=lspec.num_key_value_heads - 1,
                                rope_kept=None)
        else:
            if lspec.intermediate_size <= 1:
                continue
            new = lspec.replace(intermediate_size=lspec.intermediate_size - 1, rope_kept=None)
        after = current - counter.layer(i, lspec) + counter.layer(i, new)
        if kind == "group" and after < target - 3 * spec.hidden_size - 8:
            continue
        (removed_groups if kind == "group" else removed_ffn)[i].add(idx)
        layers[i], current = new, after
    if current > target * 1.02:
        raise EcospaError(f"numerical pruning cannot reach {target} parameters (stops at "
                          f"{current}: one head and one channel per layer left)")
    kept = KeptIndices.identity(spec)
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        n_kv, u = lspec.num_key_value_heads, unit_counts(lspec, spec.rope)
        groups = [g for g in range(n_kv) if g not in removed_groups[i]]
        ffn = [j for j in range(lspec.intermediate_size) if j not in removed_ffn[i]]
        if cfg.compensate:
            _compensate_layer(layer, lspec, groups, ffn, grams[i], cfg.damp)
        kept.apply(i, lspec, LayerKeep(groups=groups,
                                       qk=[list(range(u["qk"])) for _ in groups],
                                       vo=[list(range(u["vo"])) for _ in groups], ffn=ffn))
    return kept.masks()


@torch.no_grad()
def _compensate_layer(layer: nn.Module, lspec, groups: list[int], ffn: list[int],
                      grams: tuple[torch.Tensor, torch.Tensor], damp: float) -> None:
    c = layer.canonical()
    group = lspec.num_attention_heads // lspec.num_key_value_heads
    dv = lspec.v_head_dim
    kept_heads = {h for g in groups for h in range(g * group, (g + 1) * group)}
    pruned_o = [h * dv + j for h in range(lspec.num_attention_heads) if h not in kept_heads
                for j in range(dv)]
    kept_ffn = set(ffn)
    pruned_d = [j for j in range(lspec.intermediate_size) if j not in kept_ffn]
    for key, pruned, xtx in (("o", pruned_o, grams[0]), ("down", pruned_d, grams[1])):
        if not pruned:
            continue
        w = c[key][0]
        new = compensate(w.t(), xtx.to(w.device), pruned, damp)
        w.copy_(new.t())


__all__ = ["NumericalConfig", "numerical_score", "compensate", "reconstruction_error",
           "input_gram", "prune_numerical"]
