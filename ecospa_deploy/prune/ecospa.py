"""EcoSpa coupled structured sparsification (Algorithm 1 of the EcoSpa paper), one round at a time.

One round, on the model as it is now:

1. Importance of every coupled matrix pair (Eq. 8): the mean, over the pair's two matrices, of
   each matrix's mean squared gradient. Pairs are ``(W_Q of the group's query heads, W_K)`` and
   ``(W_V, W_O of the group's query heads)`` per KV group (per head without GQA) and
   ``(W_gate ⊙ W_up, W_down)`` per layer.
2. The ``top_k`` fraction of pairs with the smallest importance is selected.
3. In each selected pair, aligned row/column units are scored with Eq. 10,
   ``v_j = ‖col_j(W1)‖·‖row_j(W2)‖ / ‖(‖col(W1)‖ ⊙ ‖row(W2)‖)‖₂``; units are removed smallest
   first while the *kept* share of ``Σ v_j²`` stays at least ``theta``. Eq. 10 normalises by the
   L2 norm, so ``Σ v_j² = 1`` and the cumulative threshold is read on ``v²`` (the energy a
   truncated SVD keeps), the reading under which ``theta = 0.9`` removes at most 10% of a pair's
   energy per round; at least one unit leaves the least important pair so rounds always
   progress.
4. The removals are applied (weights sliced) in order of pair importance, the last one trimmed so
   the model does not undershoot the target parameter count.

Two constraints of a storable layer shape the removal: a layer has one q/k head dim and one v
head dim for all its heads, so within a layer every KV group removes the *same number* of
units: the mean of the counts its selected groups asked for (unselected groups count 0, at least
one when any group asked), each group dropping its own lowest-scored units (kept index sets may
differ per group). With GQA a K/V dim leaves the whole group; with RoPE a unit is a rotary pair.
Heads are never removed whole; every block keeps at least one unit.

``prune_ecospa`` repeats rounds (fresh calibration gradients each time) until the target is
met; ``EcoSpaSparsifier`` in ``ecospa_deploy.prune.training`` runs the same round inside a
training loop.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune.fisher import FisherAccumulator, calibration_fisher
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import slice_model
from ecospa_deploy.prune.tracking import KeptIndices, LayerKeep, ParamCounter
from ecospa_deploy.prune.units import canonical_of, layer_fisher, layer_norms, shrink, unit_counts
from ecospa_deploy.spec import LayerSpec


@dataclass
class EcoSpaConfig:
    top_k: float = 0.3
    theta: float = 0.9

    def validate(self) -> "EcoSpaConfig":
        if not 0 < self.top_k <= 1:
            raise EcospaError(f"top_k={self.top_k} is invalid; expected a fraction in (0, 1]")
        if not 0 < self.theta < 1:
            raise EcospaError(f"theta={self.theta} is invalid; expected a fraction in (0, 1)")
        return self


@dataclass
class Removal:
    """Units one (layer, block) gives up this round: per group, the units to drop."""

    importance: float
    layer: int
    block: str
    drop: list[list[int]]   # per group (all groups for qk/vo; one list for ffn), lowest score first

    @property
    def count(self) -> int:
        return len(self.drop[0])


@dataclass
class RoundReport:
    params_before: int
    params_after: int
    selected_pairs: int
    total_pairs: int
    removed: dict[str, int] = field(default_factory=dict)


def _theta_count(v: torch.Tensor, theta: float, limit: int) -> int:
    """How many smallest units leave while the kept share of ``Σ v²`` stays >= theta."""
    energy = torch.sort(v.pow(2)).values
    removed = torch.cumsum(energy, 0)
    n = int((removed <= (1.0 - theta) + 1e-12).sum())
    return min(n, limit)


def plan_round(model: nn.Module, fisher: FisherAccumulator, counter: ParamCounter,
               target: int, cfg: EcoSpaConfig) -> tuple[list[Removal], int, int]:
    """The removals of one round (not applied), the number of selected and of all pairs."""
    spec = model.config.ecospa_spec
    rope = spec.rope
    pairs = []      # (importance, layer, block, group)
    scores = {}     # (layer, block) -> [groups, units] Eq. 10 scores (normalised per group)
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        norms = layer_norms(layer.canonical(), lspec, rope)
        imp = layer_fisher(canonical_of(layer, fisher.mean(i)), lspec)
        units = unit_counts(lspec, rope)
        for block in ("qk", "vo", "ffn"):
            s = norms.coupled(block)
            s = s.view(1, -1) if block == "ffn" else s
            scores[i, block] = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            if units[block] <= 1:
                continue
            for g, value in enumerate(imp[block].tolist()):
                pairs.append((value, i, block, g))
    if not pairs:
        return [], 0, 0
    pairs.sort()
    k = max(1, math.ceil(cfg.top_k * len(pairs)))
    selected = pairs[:k]
    asked: dict[tuple[int, str], dict[int, int]] = {}
    importance: dict[tuple[int, str], float] = {}
    for value, i, block, g in selected:
        v = scores[i, block][g]
        n = _theta_count(v, cfg.theta, v.numel() - 1)
        asked.setdefault((i, block), {})[g] = n
        importance[i, block] = min(importance.get((i, block), math.inf), value)
    if all(n == 0 for d in asked.values() for n in d.values()):
        _, i, block, g = selected[0]
        asked[i, block][g] = 1
    removals = []
    for (i, block), per_group in asked.items():
        s = scores[i, block]
        groups = s.shape[0]
        n = round(sum(per_group.values()) / groups)
        if any(per_group.values()):
            n = max(n, 1)
        n = min(n, s.shape[1] - 1)
        if n == 0:
            continue
        drop = [torch.argsort(s[g])[:n].tolist() for g in range(groups)]
        removals.append(Removal(importance[i, block], i, block, drop))
    removals.sort(key=lambda r: r.importance)
    return _fit_to_target(removals, spec, counter, target), k, len(pairs)


def _fit_to_target(removals: list[Removal], spec, counter: ParamCounter, target: int
                   ) -> list[Removal]:
    """Keep removals (most expendable first) until the target; trim the last one to land on it."""
    layers = list(spec.layers)
    total = counter.total(layers)
    out = []
    for r in removals:
        if total <= target:
            break
        units = unit_counts(layers[r.layer], spec.rope)[r.block]
        n = r.count
        while n > 1:
            trial = shrink(layers[r.layer], r.block, units - (n - 1), spec.rope)
            if total - counter.layer(r.layer, layers[r.layer]) + counter.layer(r.layer, trial) \
                    > target:
                break
            n -= 1
        if n < r.count:
            r = Removal(r.importance, r.layer, r.block, [d[:n] for d in r.drop])
        new = shrink(layers[r.layer], r.block, units - n, spec.rope)
        total += counter.layer(r.layer, new) - counter.layer(r.layer, layers[r.layer])
        layers[r.layer] = new
        out.append(r)
    return out


def apply_removals(model: nn.Module, removals: list[Removal], kept: KeptIndices,
                   slicer: Callable[[nn.Module, list], object] = slice_model) -> list[LayerMask]:
    """Slice ``model`` in place (with ``slicer``: training slices optimizer moments too); update
    ``kept``; return the masks used (current numbering)."""
    spec = model.config.ecospa_spec
    rope = spec.rope
    by_layer: dict[int, list[Removal]] = {}
    for r in removals:
        by_layer.setdefault(r.layer, []).append(r)
    masks: list[LayerMask | None] = [None] * spec.num_layers
    for i, rs in by_layer.items():
        lspec: LayerSpec = spec.layers[i]
        units = unit_counts(lspec, rope)
        n_kv = lspec.num_key_value_heads
        keep = LayerKeep(groups=list(range(n_kv)),
                         qk=[list(range(units["qk"])) for _ in range(n_kv)],
                         vo=[list(range(units["vo"])) for _ in range(n_kv)],
                         ffn=list(range(units["ffn"])))
        for r in rs:
            if r.block == "ffn":
                gone = set(r.drop[0])
                keep.ffn = [j for j in keep.ffn if j not in gone]
            else:
                lists = getattr(keep, r.block)
                for g, d in enumerate(r.drop):
                    gone = set(d)
                    lists[g] = [u for u in lists[g] if u not in gone]
        masks[i] = kept.apply(i, lspec, keep)
    slicer(model, masks)
    return masks


def ecospa_round(model: nn.Module, fisher: FisherAccumulator, counter: ParamCounter,
                 target: int, cfg: EcoSpaConfig, kept: KeptIndices
                 ) -> tuple[RoundReport, list[LayerMask]]:
    """Plan and apply one round on ``model`` (in place)."""
    before = counter.total(model.config.ecospa_spec.layers)
    removals, k, n_pairs = plan_round(model, fisher, counter, target, cfg)
    masks = apply_removals(model, removals, kept) if removals else []
    after = counter.total(model.config.ecospa_spec.layers)
    removed: dict[str, int] = {}
    for r in removals:
        removed[r.block] = removed.get(r.block, 0) + r.count * len(r.drop)
    return RoundReport(before, after, k, n_pairs, removed), masks


def prune_ecospa(model: nn.Module, windows: torch.Tensor, target: int,
                 cfg: EcoSpaConfig | None = None, batch_size: int = 1, max_rounds: int = 1000,
                 on_round: Callable[[int, RoundReport], None] | None = None
                 ) -> tuple[list[LayerMask], list[RoundReport]]:
    """One-shot EcoSpa: rounds on a working copy until ``target`` parameters; masks of the input.

    ``model`` itself is not modified; slice it with the returned masks (relative to ``model``).
    """
    cfg = (cfg or EcoSpaConfig()).validate()
    counter = ParamCounter(model)
    spec = model.config.ecospa_spec
    smallest = []
    for layer in spec.layers:
        for block in ("qk", "vo", "ffn"):
            layer = shrink(layer, block, 1, spec.rope)
        smallest.append(layer)
    if counter.total(smallest) > target:
        raise EcospaError(f"target of {target} parameters is below the smallest model EcoSpa can "
                          f"give ({counter.total(smallest)}: every head kept with one unit per "
                          "block); choose a larger --target-size")
    work = copy.deepcopy(model)
    kept = KeptIndices.identity(model.config.ecospa_spec)
    reports: list[RoundReport] = []
    start = counter.total(work.config.ecospa_spec.layers)
    bar = tqdm(total=max(start - target, 0), desc="ecospa rounds", unit="param")
    try:
        for round_idx in range(max_rounds):
            if counter.total(work.config.ecospa_spec.layers) <= target:
                break
            fisher = calibration_fisher(work, windows, batch_size,
                                        desc=f"round {round_idx + 1} gradients")
            report, _ = ecospa_round(work, fisher, counter, target, cfg, kept)
            reports.append(report)
            # the last round may overshoot the target: the bar stops at its total, exactly
            bar.update(min(start - report.params_after, bar.total) - bar.n)
            bar.set_postfix(round=round_idx + 1, params=report.params_after)
            if on_round:
                on_round(round_idx, report)
            if report.params_after >= report.params_before:
                raise EcospaError(
                    f"EcoSpa cannot shrink the model below {report.params_after} parameters "
                    f"(target {target}): every block is down to one unit")
        else:
            raise EcospaError(f"EcoSpa did not reach {target} parameters in {max_rounds} rounds")
    finally:
        bar.close()
    return kept.masks(), reports


__all__ = ["EcoSpaConfig", "RoundReport", "Removal", "plan_round", "apply_removals",
           "ecospa_round", "prune_ecospa"]
