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
   progress, and no block goes below its floor.
4. The removals are applied (weights sliced) in order of pair importance, the last one trimmed so
   the model does not undershoot the target parameter count.

Two constraints of a storable layer shape the removal: a layer has one q/k head dim and one v
head dim for all its heads, so within a layer every KV group removes the *same number* of
units: the mean of the counts its selected groups asked for (unselected groups count 0, at least
one when any group asked), each group dropping its own lowest-scored units (kept index sets may
differ per group). With GQA a K/V dim leaves the whole group; with RoPE a unit is a rotary pair.
Heads are never removed whole; every block keeps at least its floor (``floors.Floors``, by
default 1/8 of the dense width).

``prune_ecospa`` repeats rounds (fresh calibration gradients each time) until the target is
met. **Deviation from the paper, for one-shot pruning**: Algorithm 1 runs one round per
training epoch and lets θ alone decide how much goes, so the number of rounds grows with the
sparsity (7 rounds at 70 %, 79 at 50 % on the tiny model; each one-shot round costs a full
gradient pass over the calibration set). Here the rounds follow a geometric schedule to the
target in at most ``EcoSpaConfig.rounds`` (20) rounds: a round first plans with the paper's
``top_k``/``theta``; only if that plan stays above the schedule's point for the round is θ
lowered (the energy share a pair may lose doubles per try: 0.9, 0.8, 0.6, 0.2, 0), then top_k
raised, until it reaches it. Selection (Eq. 8) and which units go (Eq. 10) are unchanged; when
the paper's θ already keeps pace the result is the paper's. ``EcoSpaSparsifier`` in
``ecospa_deploy.prune.training`` runs the same round inside a training loop, where the
paper's one-round-per-period schedule is kept.
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
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.fisher import FisherAccumulator, calibration_fisher
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import slice_model
from ecospa_deploy.prune.tracking import KeptIndices, LayerKeep, ParamCounter
from ecospa_deploy.prune.activations import collect
from ecospa_deploy.prune.units import (activation_norms, canonical_of, layer_fisher, layer_norms,
                                       shrink, unit_counts)
from ecospa_deploy.spec import LayerSpec


SCORES = ("weights", "activations")


@dataclass
class EcoSpaConfig:
    top_k: float = 0.3
    theta: float = 0.9
    rounds: int = 20     # one-shot: at most this many rounds, whatever the target
    # Eq. 10's unit scores: "weights" (the paper) or "activations" (the variant ecospa-act:
    # the data term of Eq. 9 kept exact, ``units.activation_norms``)
    scores: str = "weights"

    def validate(self) -> "EcoSpaConfig":
        if self.scores not in SCORES:
            raise EcospaError(f"scores={self.scores!r} is invalid; expected one of {SCORES}")
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise EcospaError(f"rounds={self.rounds!r} is invalid; expected an integer >= 1")
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


@dataclass
class RoundScores:
    """What one round's plan is read from: every pair's importance and every unit's Eq. 10 score."""

    pairs: list[tuple[float, int, str, int]]       # (importance, layer, block, group), sorted
    scores: dict[tuple[int, str], torch.Tensor]    # (layer, block) -> [groups, units]


def round_scores(model: nn.Module, fisher: FisherAccumulator, floors: Floors,
                 stats: list | None = None) -> RoundScores:
    """Eq. 8 pair importances and Eq. 10 unit scores of the model as it is now (with ``stats``,
    ``activations.collect`` of the model as it is now: the activation-aware Eq. 10)."""
    spec = model.config.ecospa_spec
    rope = spec.rope
    pairs = []
    scores = {}
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        norms = layer_norms(layer.canonical(), lspec, rope) if stats is None else \
            activation_norms(layer.canonical(), lspec, rope, stats[i])
        imp = layer_fisher(canonical_of(layer, fisher.mean(i)), lspec)
        units = unit_counts(lspec, rope)
        for block in ("qk", "vo", "ffn"):
            s = norms.coupled(block)
            s = s.view(1, -1) if block == "ffn" else s
            scores[i, block] = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            if units[block] <= floors(i, block):
                continue
            for g, value in enumerate(imp[block].tolist()):
                pairs.append((value, i, block, g))
    pairs.sort()
    return RoundScores(pairs, scores)


def _plan(rs: RoundScores, spec, counter: ParamCounter, target: int, top_k: float, theta: float,
          floors: Floors) -> tuple[list[Removal], int, int]:
    """Removals for one (top_k, theta), fitted to ``target``: (removals, selected, params after)."""
    k = max(1, math.ceil(top_k * len(rs.pairs)))
    selected = rs.pairs[:k]
    asked: dict[tuple[int, str], dict[int, int]] = {}
    importance: dict[tuple[int, str], float] = {}
    for value, i, block, g in selected:
        v = rs.scores[i, block][g]
        n = _theta_count(v, theta, v.numel() - floors(i, block))
        asked.setdefault((i, block), {})[g] = n
        importance[i, block] = min(importance.get((i, block), math.inf), value)
    if all(n == 0 for d in asked.values() for n in d.values()):
        _, i, block, g = selected[0]
        asked[i, block][g] = 1
    removals = []
    for (i, block), per_group in asked.items():
        s = rs.scores[i, block]
        groups = s.shape[0]
        n = round(sum(per_group.values()) / groups)
        if any(per_group.values()):
            n = max(n, 1)
        n = min(n, s.shape[1] - floors(i, block))
        if n <= 0:
            continue
        drop = [torch.argsort(s[g])[:n].tolist() for g in range(groups)]
        removals.append(Removal(importance[i, block], i, block, drop))
    removals.sort(key=lambda r: r.importance)
    removals, after = _fit_to_target(removals, spec, counter, target)
    return removals, k, after


def plan_round(model: nn.Module, fisher: FisherAccumulator, counter: ParamCounter,
               target: int, cfg: EcoSpaConfig, floors: Floors | None = None,
               round_target: int | None = None, stats: list | None = None
               ) -> tuple[list[Removal], int, int]:
    """The removals of one round (not applied), the number of selected and of all pairs.

    With the paper's ``top_k``/``theta`` first; if that plan leaves the model above
    ``round_target`` (the schedule's point for this round), theta is lowered (the share of
    energy a pair may lose doubles each try) and then top_k raised until the plan reaches it
    or every selected pair is at its floor. Removals never take the model below ``target``.
    """
    spec = model.config.ecospa_spec
    floors = floors or Floors.of(spec)
    rs = round_scores(model, fisher, floors, stats)
    if not rs.pairs:
        return [], 0, 0
    goal = target if round_target is None else max(target, round_target)
    thetas, t = [cfg.theta], cfg.theta
    while t > 0:
        t = max(0.0, 1 - 2 * (1 - t))
        thetas.append(t)
    top_ks, k = [cfg.top_k], cfg.top_k
    while k < 1:
        k = min(1.0, 2 * k)
        top_ks.append(k)
    for top_k in top_ks:
        for theta in thetas:
            removals, selected, after = _plan(rs, spec, counter, target, top_k, theta, floors)
            if after <= goal:
                return removals, selected, len(rs.pairs)
    return removals, selected, len(rs.pairs)


def _fit_to_target(removals: list[Removal], spec, counter: ParamCounter, target: int
                   ) -> tuple[list[Removal], int]:
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
    return out, total


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
                 target: int, cfg: EcoSpaConfig, kept: KeptIndices, floors: Floors | None = None,
                 round_target: int | None = None, slicer: Callable = slice_model,
                 stats: list | None = None) -> tuple[RoundReport, list[LayerMask]]:
    """Plan and apply one round on ``model`` (in place)."""
    before = counter.total(model.config.ecospa_spec.layers)
    removals, k, n_pairs = plan_round(model, fisher, counter, target, cfg, floors, round_target,
                                      stats)
    masks = apply_removals(model, removals, kept, slicer) if removals else []
    after = counter.total(model.config.ecospa_spec.layers)
    removed: dict[str, int] = {}
    for r in removals:
        removed[r.block] = removed.get(r.block, 0) + r.count * len(r.drop)
    return RoundReport(before, after, k, n_pairs, removed), masks


def schedule(start: int, target: int, rounds: int, done: int) -> int:
    """Parameters the model should have after round ``done + 1`` of at most ``rounds``.

    Geometric: every round keeps the same fraction ``(target / start) ** (1 / rounds)``, so the
    number of rounds does not grow with the sparsity (a round removes what the paper's θ asks
    for, or more when that falls behind this schedule)."""
    if done + 1 >= rounds:
        return target
    return max(target, math.floor(start * (target / start) ** ((done + 1) / rounds)))


def prune_ecospa(model: nn.Module, windows: torch.Tensor, target: int,
                 cfg: EcoSpaConfig | None = None, batch_size: int = 1,
                 on_round: Callable[[int, RoundReport], None] | None = None,
                 floors: Floors | None = None, in_place: bool = False
                 ) -> tuple[list[LayerMask], list[RoundReport]]:
    """One-shot EcoSpa: at most ``cfg.rounds`` rounds until ``target`` parameters.

    Returns masks relative to the input ``model``. By default ``model`` is not modified (rounds
    run on a copy; slice it with the returned masks); with ``in_place`` the rounds slice
    ``model`` itself (no copy: half the memory on a 7B model) and it ends pruned.
    """
    cfg = (cfg or EcoSpaConfig()).validate()
    counter = ParamCounter(model)
    spec = model.config.ecospa_spec
    floors = floors or Floors.of(spec)
    smallest = counter.total(floors.smallest(spec))
    if smallest > target:
        raise floors.unreachable(target, smallest, "ecospa")
    work = model if in_place else copy.deepcopy(model)
    kept = KeptIndices.identity(model.config.ecospa_spec)
    reports: list[RoundReport] = []
    start = counter.total(work.config.ecospa_spec.layers)
    bar = tqdm(total=max(start - target, 0), desc="ecospa rounds", unit="param")
    try:
        for round_idx in range(cfg.rounds):
            if counter.total(work.config.ecospa_spec.layers) <= target:
                break
            fisher = calibration_fisher(work, windows, batch_size,
                                        desc=f"round {round_idx + 1} gradients")
            stats = collect(work, windows, batch_size, desc=f"round {round_idx + 1} activations",
                            progress=False) if cfg.scores == "activations" else None
            report, _ = ecospa_round(work, fisher, counter, target, cfg, kept, floors,
                                     schedule(start, target, cfg.rounds, round_idx),
                                     stats=stats)
            del stats
            del fisher
            reports.append(report)
            # the last round may overshoot the target: the bar stops at its total, exactly
            bar.update(min(start - report.params_after, bar.total) - bar.n)
            bar.set_postfix(round=round_idx + 1, params=report.params_after)
            if on_round:
                on_round(round_idx, report)
            if report.params_after >= report.params_before:
                raise floors.unreachable(target, report.params_after, "ecospa")
        if counter.total(work.config.ecospa_spec.layers) > target:
            raise EcospaError(f"EcoSpa did not reach {target} parameters in {cfg.rounds} rounds")
    finally:
        bar.close()
    return kept.masks(), reports


__all__ = ["EcoSpaConfig", "RoundReport", "Removal", "plan_round", "schedule", "apply_removals",
           "ecospa_round", "prune_ecospa"]
