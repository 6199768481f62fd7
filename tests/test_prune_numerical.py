"""Numerical Pruning: Newton score optimality, Eq. 11 compensation, and its effect in a model."""

from __future__ import annotations

import copy

import torch

from ecospa_deploy.prune.numerical import (NumericalConfig, compensate, input_gram,
                                           numerical_score, prune_numerical,
                                           reconstruction_error)
from ecospa_deploy.prune.tracking import count_params
from ecospa_deploy.testing import VOCAB, tiny_dense


def _problem(seed=0, n=256, d=24, d_out=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64)       # correlated channels
    w = torch.randn(d, d_out, generator=g, dtype=torch.float64)
    return x, w


def test_newton_score_is_the_stationary_point():
    x, w = _problem()
    xtx = x.t() @ x
    r = 12.0
    z = numerical_score(w, xtx, r)
    h_l = (w @ w.t()) * xtx
    lam = float(h_l.diagonal().mean())
    grad = h_l @ (z - 1) + lam * (z.sum() - r)
    assert grad.abs().max() < 1e-6 * h_l.abs().max()


def test_compensation_lowers_the_reconstruction_error():
    x, w = _problem(1)
    xtx = x.t() @ x
    pruned = [0, 3, 5, 8, 13, 21]
    zeroed = w.clone()
    zeroed[pruned] = 0
    comp = compensate(w, xtx, pruned, damp=0.0)
    assert torch.all(comp[pruned] == 0)
    e_zero = reconstruction_error(w, zeroed, xtx)
    e_comp = reconstruction_error(w, comp, xtx)
    assert e_comp < 0.9 * e_zero
    # Direct check against ‖XW − XW̃‖² on the samples.
    direct = ((x @ w - x @ comp) ** 2).sum()
    torch.testing.assert_close(torch.tensor(e_comp, dtype=torch.float64), direct)
    # Eq. 11 is the optimum: no other kept-row perturbation does better.
    other = comp.clone()
    other[1] += 0.01
    assert reconstruction_error(w, other, xtx) > e_comp


def test_compensation_in_a_model_lowers_output_error():
    """With the same mask, the compensated down_proj reproduces the dense outputs better."""
    model = tiny_dense("llama")
    windows = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    target = round(0.8 * count_params(model))
    plain, comp = copy.deepcopy(model), copy.deepcopy(model)
    masks_plain = prune_numerical(plain, windows, target, NumericalConfig(compensate=False))
    masks_comp = prune_numerical(comp, windows, target, NumericalConfig(compensate=True))
    assert [m.ffn for m in masks_plain] == [m.ffn for m in masks_comp]
    grams = input_gram(model, windows)
    for i in range(len(model.decoder_layers)):
        w = model.decoder_layers[i].canonical()["down"][0].detach().t().double()
        kept = set(masks_plain[i].ffn)
        pruned = [j for j in range(w.shape[0]) if j not in kept]
        if not pruned:
            continue
        w_plain = plain.decoder_layers[i].canonical()["down"][0].detach().t().double().clone()
        w_plain[pruned] = 0
        w_comp = comp.decoder_layers[i].canonical()["down"][0].detach().t().double().clone()
        w_comp[pruned] = 0
        assert reconstruction_error(w, w_comp, grams[i][1]) < \
            reconstruction_error(w, w_plain, grams[i][1])
