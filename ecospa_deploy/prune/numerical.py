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
- **Units.** The paper's: whole heads (a GQA group: removing a K/V head removes its whole
  group) and MLP channels, each MLP channel keeping its own ``z``. The variant
  ``numerical-dims`` (``NumericalConfig.dims``; this module's default until the real-model
  study, docs/real_model.md) lets the kept heads also lose **v dims** and **q/k dims** (rotary
  pairs under RoPE), the same number in every KV group of a layer (one stored head dim per
  layer), each group its lowest-scored. On SmolLM2-135M it ranks q/k pairs below everything
  else and cuts most layers to the q/k floor at 10 % pruning, and every chat answer comes back
  empty: the q/k score below ignores softmax, mask and rotation, and misses what the
  high-frequency pairs do for position.
  A v dim is an o_proj input channel, so it has its own ``z`` already (summed over the
  group's query heads). For q/k, the same Newton problem is solved on the attention logits
  ``S = QKᵀ`` read as a linear map of ``Q`` with weight ``Kᵀ``:
  ``H = (KᵀK)∘(QᵀQ)``, ``QᵀQ = W_Q Σ W_Qᵀ``, ``KᵀK = W_K Σ W_Kᵀ`` with ``Σ`` the Gram matrix of
  the attention input (softmax, causal mask and rotation ignored; a rotary pair scores as
  the sum of its two dims). q/k removals get no compensation (Eq. 11 is for W_O/W_down).
- **Global ranking and α** (Eq. 8). The paper puts heads and channels in one sorted list,
  a head's score (the mean of its channels' ``z``) multiplied by ``α = 4·D_h/3``, the
  parameters of one head over those of one MLP channel (``4·D·D_h`` vs ``3·D``), and cuts at
  a *unit count*. Cut at a *parameter* target instead, that α ranks every head above every
  channel (``α·mean z`` vs ``z ≈ 1``), so all channels go before any head: the collapse to
  one channel per layer seen before floors existed. Here α is used as the exchange rate it
  is: every unit's score is the sum of its channels' ``z`` divided by its parameter cost in
  MLP channels (α for a head of an MHA Llama layer, measured from the layer's real counts
  for GQA, GPT-2 and the v/q/k dim units). Units are then compared per parameter removed,
  removed lowest first until the parameter target; a removal that would undershoot the
  target by more than one MLP channel is skipped. No layer goes below its
  floors (``floors.Floors``) or one KV group.
- **Compensation** (Eq. 11): the kept rows of ``W_O``/``W_down`` get
  ``δW = −G⁻¹M_p(M_pᵀG⁻¹M_p)⁻¹M_pᵀW`` with ``G = 2XᵀX + γI`` (Remark 5 dampening,
  ``γ = damp · mean(diag(2XᵀX))``). It is a weight update only: no bias is added, so the
  layer's ``o_bias``/``down_bias`` flags do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ecospa_deploy.prune.activations import collect
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.tracking import KeptIndices, LayerKeep, ParamCounter
from ecospa_deploy.prune.units import shrink, unit_counts


@dataclass
class NumericalConfig:
    newton_steps: int = 50
    damp: float = 0.01
    compensate: bool = True
    # False: the paper's units (whole heads and MLP channels). True: the ``numerical-dims``
    # variant, which also removes v dims and q/k dims (rotary pairs) inside kept heads.
    dims: bool = False


def input_gram(model: nn.Module, windows: torch.Tensor, batch_size: int = 1
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer ``XᵀX`` (float64) of the o_proj, down_proj and attention inputs."""
    stats = collect(model, windows, batch_size, desc="numerical: activations")
    return [(st.o.gram, st.down.gram, st.attn.gram) for st in stats]


def newton_score(h_l: torch.Tensor, r: float, steps: int = 50) -> torch.Tensor:
    """Algorithm 1 for a given data Hessian ``H_l``: ``z`` with ``Σz ≈ r``."""
    h_l = h_l.to(torch.float64)
    lam = float(h_l.diagonal().mean().clamp_min(1e-12))
    d = h_l.shape[0]
    ones = torch.ones(d, dtype=torch.float64, device=h_l.device)
    hess = h_l + lam * torch.ones(d, d, dtype=torch.float64, device=h_l.device)
    hess = hess + 1e-9 * lam * torch.eye(d, dtype=torch.float64, device=h_l.device)
    z = ones.clone()
    for _ in range(max(1, steps)):
        g = h_l @ (z - ones) + lam * (z.sum() - r) * ones
        step = torch.linalg.solve(hess, g)
        z = z - step
        if float(step.abs().max()) < 1e-9:
            break
    return z


def numerical_score(w: torch.Tensor, xtx: torch.Tensor, r: float, steps: int = 50
                    ) -> torch.Tensor:
    """Algorithm 1: ``z ∈ R^D`` for ``W ∈ R^{D×D'}`` and ``XᵀX ∈ R^{D×D}``."""
    w = w.to(torch.float64)
    return newton_score((w @ w.t()) * xtx.to(torch.float64), r, steps)


def qk_score(c, lspec, xtx: torch.Tensor, keep: float, rope: bool, steps: int = 50
             ) -> torch.Tensor:
    """``[groups, units]`` numerical scores of the q/k units (rotary pairs under RoPE)."""
    n_q, n_kv, d = lspec.num_attention_heads, lspec.num_key_value_heads, lspec.qk_head_dim
    group = n_q // n_kv
    sigma = xtx.to(torch.float64)
    wq = c["q"][0].detach().to(torch.float64).view(n_q, d, -1)
    wk = c["k"][0].detach().to(torch.float64).view(n_kv, d, -1)
    out = []
    for g in range(n_kv):
        kk = wk[g] @ sigma @ wk[g].t()
        h_l = sum((wq[h] @ sigma @ wq[h].t()) * kk for h in range(g * group, (g + 1) * group))
        z = newton_score(h_l, keep * d, steps)
        out.append(z[: d // 2] + z[d // 2:] if rope else z)
    return torch.stack(out)


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


@dataclass
class _Layer:
    """One layer's scores and what the greedy pass has removed from it so far."""

    group_z: torch.Tensor      # [n_kv] summed z of each group's o_proj input channels
    v_z: torch.Tensor          # [n_kv, dv] z of each v dim (summed over the group's heads)
    qk_z: torch.Tensor         # [n_kv, qk units]
    ffn_z: torch.Tensor        # [ffn]
    groups: list[int]          # removed KV groups
    v: int = 0                 # v dims removed per kept group
    qk: int = 0                # q/k units removed per kept group
    ffn: list[int] = field(default_factory=list)   # removed channels


def _costs(counter: ParamCounter, i: int, lspec, rope: bool) -> dict[str, int]:
    """Parameters one unit of each kind holds in layer ``i`` (its current shape)."""
    base = counter.layer(i, lspec)
    units = unit_counts(lspec, rope)
    out = {"ffn": base - counter.layer(i, shrink(lspec, "ffn", units["ffn"] - 1, rope)),
           "v": base - counter.layer(i, shrink(lspec, "vo", units["vo"] - 1, rope)),
           "qk": base - counter.layer(i, shrink(lspec, "qk", units["qk"] - 1, rope))}
    n_kv = lspec.num_key_value_heads
    if n_kv > 1:
        out["group"] = base - counter.layer(i, _drop_group(lspec))
    return out


def _drop_group(lspec):
    group = lspec.num_attention_heads // lspec.num_key_value_heads
    return lspec.replace(num_attention_heads=lspec.num_attention_heads - group,
                         num_key_value_heads=lspec.num_key_value_heads - 1, rope_kept=None)


def prune_numerical(model: nn.Module, windows: torch.Tensor, target: int,
                    cfg: NumericalConfig | None = None, batch_size: int = 1,
                    floors: Floors | None = None) -> list[LayerMask]:
    """Masks relative to ``model``; with ``cfg.compensate`` also Eq. 11 weight updates in place."""
    cfg = cfg or NumericalConfig()
    spec = model.config.ecospa_spec
    rope = spec.rope
    floors = floors or Floors.of(spec)
    counter = ParamCounter(model)
    total = counter.total(spec.layers)
    smallest = counter.total(floors.smallest(spec, heads=True))
    if smallest > target:
        raise floors.unreachable(target, smallest, "numerical")
    keep = 1.0 - min(max(1.0 - target / total, 0.0), 1.0)
    grams = input_gram(model, windows, batch_size)
    units = []       # (score per MLP-channel-equivalent of parameters, layer, kind, slot)
    state: list[_Layer] = []
    finest, channel = 0, None
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        c = layer.canonical()
        xo, xd, xa = grams[i]
        w_o = c["o"][0].detach().t()
        w_d = c["down"][0].detach().t()
        z_o = numerical_score(w_o, xo.to(w_o.device), keep * w_o.shape[0], cfg.newton_steps)
        z_d = numerical_score(w_d, xd.to(w_d.device), keep * w_d.shape[0], cfg.newton_steps)
        n_q, n_kv = lspec.num_attention_heads, lspec.num_key_value_heads
        v_z = z_o.view(n_kv, n_q // n_kv, lspec.v_head_dim).sum(1)
        qk_z = qk_score(c, lspec, xa.to(w_o.device), keep, rope, cfg.newton_steps) if cfg.dims \
            else torch.zeros(n_kv, unit_counts(lspec, rope)["qk"], device=w_o.device)
        st = _Layer(group_z=v_z.sum(1), v_z=v_z, qk_z=qk_z, ffn_z=z_d, groups=[], ffn=[])
        state.append(st)
        cost = _costs(counter, i, lspec, rope)
        ch = cost["ffn"]
        finest = max(finest, ch, cost["v"], cost["qk"])
        channel = ch if channel is None else min(channel, ch)
        units += [(float(z), i, "ffn", j) for j, z in enumerate(z_d.tolist())]
        if "group" in cost:
            units += [(float(z) * ch / cost["group"], i, "group", g)
                      for g, z in enumerate(st.group_z.tolist())]
        # the k-th v (q/k) unit to leave each group is its k-th lowest: one slot per k
        if cfg.dims:
            v_slots = torch.sort(v_z, dim=1).values.sum(0)
            qk_slots = torch.sort(qk_z, dim=1).values.sum(0)
            units += [(float(z) * ch / cost["v"], i, "v", k)
                      for k, z in enumerate(v_slots.tolist())]
            units += [(float(z) * ch / cost["qk"], i, "qk", k)
                      for k, z in enumerate(qk_slots.tolist())]
    units.sort(key=lambda u: u[0])
    layers = list(spec.layers)
    current = total
    for _, i, kind, idx in units:
        if current <= target:
            break
        lspec, st = layers[i], state[i]
        u = unit_counts(lspec, rope)
        if kind == "group":
            if lspec.num_key_value_heads <= floors.kv_groups:
                continue
            new = _drop_group(lspec)
        elif kind == "ffn":
            if u["ffn"] <= floors(i, "ffn"):
                continue
            new = shrink(lspec, "ffn", u["ffn"] - 1, rope)
        else:
            block = "vo" if kind == "v" else "qk"
            if u[block] <= floors(i, block):
                continue
            new = shrink(lspec, block, u[block] - 1, rope)
        after = current - counter.layer(i, lspec) + counter.layer(i, new)
        if after < target - channel:
            continue
        if kind == "group":
            st.groups.append(idx)
        elif kind == "ffn":
            st.ffn.append(idx)
        else:
            setattr(st, kind, getattr(st, kind) + 1)
        layers[i], current = new, after
    if current > target + finest:
        raise floors.unreachable(target, current, "numerical")
    kept = KeptIndices.identity(spec)
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        st, u = state[i], unit_counts(lspec, rope)
        groups = [g for g in range(lspec.num_key_value_heads) if g not in st.groups]
        ffn = sorted(set(range(lspec.intermediate_size)) - set(st.ffn))
        vo = [sorted(torch.argsort(st.v_z[g], descending=True)[: u["vo"] - st.v].tolist())
              for g in groups]
        qk = [sorted(torch.argsort(st.qk_z[g], descending=True)[: u["qk"] - st.qk].tolist())
              for g in groups]
        if cfg.compensate:
            _compensate_layer(layer, lspec, groups, vo, ffn, grams[i], cfg.damp)
        kept.apply(i, lspec, LayerKeep(groups=groups, qk=qk, vo=vo, ffn=ffn))
    return kept.masks()


@torch.no_grad()
def _compensate_layer(layer: nn.Module, lspec, groups: list[int], vo: list[list[int]],
                      ffn: list[int], grams, damp: float) -> None:
    """Eq. 11 on o_proj (pruned: every channel of removed groups, removed v dims of kept ones)
    and down_proj (removed channels)."""
    c = layer.canonical()
    group = lspec.num_attention_heads // lspec.num_key_value_heads
    dv = lspec.v_head_dim
    kept_o = {h * dv + j for g, dims in zip(groups, vo)
              for h in range(g * group, (g + 1) * group) for j in dims}
    pruned_o = [j for j in range(lspec.num_attention_heads * dv) if j not in kept_o]
    kept_ffn = set(ffn)
    pruned_d = [j for j in range(lspec.intermediate_size) if j not in kept_ffn]
    for key, pruned, xtx in (("o", pruned_o, grams[0]), ("down", pruned_d, grams[1])):
        if not pruned:
            continue
        w = c[key][0]
        new = compensate(w.t(), xtx.to(w.device), pruned, damp)
        w.copy_(new.t())


__all__ = ["NumericalConfig", "numerical_score", "newton_score", "qk_score", "compensate", "reconstruction_error",
           "input_gram", "prune_numerical"]
