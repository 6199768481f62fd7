"""Activation statistics and what is built on them: moments against a direct computation,
the activation-aware Eq. 10 scores against brute force, bias surgery, raised floors, and the
ecospa-act method's q/k floor."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ecospa_deploy.prune.activations import Moments, collect
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.run import ACT_QK_MIN_KEEP, PruneOptions, prune_model
from ecospa_deploy.prune.surgery import add_output_biases, slice_model, zero_out
from ecospa_deploy.prune.units import activation_norms
from ecospa_deploy.testing import FAMILIES, VOCAB, random_masks, tiny_dense


def _windows(seed: int = 0, n: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _inputs(model, windows):
    """Every layer's o_proj / down_proj / attention input, captured directly."""
    from ecospa_deploy.families import family_of_model

    fam = family_of_model(model)
    seen = [{} for _ in model.decoder_layers]
    hooks = [m.register_forward_hook(lambda _m, a, _o, i=i, k=k: seen[i].setdefault(k, []).append(
        a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for i, layer in enumerate(model.decoder_layers)
        for k, m in fam.stat_modules(layer).items()]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    return [{k: torch.cat(v) for k, v in d.items()} for d in seen]


def test_moments_are_mean_variance_and_gram():
    x = torch.randn(50, 7, dtype=torch.float64)
    m = Moments.empty(7, "cpu")
    m.add(x[:20].float())
    m.add(x[20:].float())
    torch.testing.assert_close(m.mean, x.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.var, x.var(0, unbiased=False), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.second, x.t() @ x / 50, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.cov, torch.cov(x.t(), correction=0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_matches_the_inputs_it_hooks(family):
    model = tiny_dense(family).eval()
    windows = _windows()
    stats = collect(model, windows, batch_size=2, progress=False)
    direct = _inputs(model, windows)
    for st, d in zip(stats, direct):
        for key in ("attn", "o", "down"):
            x = d[key]
            assert st[key].n == x.shape[0]
            torch.testing.assert_close(st[key].gram, x.t() @ x, atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(st[key].sum, x.sum(0), atol=1e-4, rtol=1e-5)
        assert st.residual > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_activation_norms_are_the_units_measured_energies(family):
    """Each unit's score² is the energy of what it computes on the calibration tokens:
    ``E‖x w1_j‖²`` per q/k dim (summed over a rotary pair and the group's query heads) and
    ``E[h_j²]·‖W2[:, j]‖²`` for v dims (o_proj inputs) and FFN neurons."""
    model = tiny_dense(family).eval()
    spec = model.config.ecospa_spec
    windows = _windows(1)
    stats = collect(model, windows, progress=False)
    direct = _inputs(model, windows)
    for i, (layer, lspec) in enumerate(zip(model.decoder_layers, spec.layers)):
        c = layer.canonical()
        got = activation_norms(c, lspec, spec.rope, stats[i])
        x = direct[i]
        n_q, n_kv, d = lspec.num_attention_heads, lspec.num_key_value_heads, lspec.qk_head_dim
        q = x["attn"] @ c["q"][0].double().t()
        if c["q"][1] is not None:
            q = q + c["q"][1].double()
        q = q.pow(2).mean(0).view(n_kv, n_q // n_kv, d).sum(1)
        if spec.rope:
            q = q[:, :d // 2] + q[:, d // 2:]
        torch.testing.assert_close(got.qk1.double(), q, rtol=1e-3, atol=1e-6)
        col = c["down"][0].double().pow(2).sum(0)
        torch.testing.assert_close(got.ffn1.double(), x["down"].pow(2).mean(0) * col,
                                   rtol=1e-3, atol=1e-6)
        o = (x["o"].pow(2).mean(0) * c["o"][0].double().pow(2).sum(0))
        dv = lspec.v_head_dim
        torch.testing.assert_close(got.vo1.double(),
                                   o.view(n_kv, n_q // n_kv, dv).sum(1), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_added_biases_shift_the_outputs_and_survive_slicing(family):
    model = tiny_dense(family).eval()
    ref = copy.deepcopy(model)
    hidden = model.decoder_layers[0].canonical()["o"][0].shape[0]
    n = model.config.ecospa_spec.num_layers
    bias = torch.randn(hidden)
    add_output_biases(model, [{"down": bias}] + [None] * (n - 1))
    assert model.config.ecospa_spec.layers[0].down_bias
    x = _windows(2, 1, 8)
    captured = []
    hook = model.decoder_layers[0].register_forward_hook(lambda _m, _a, o: captured.append(o))
    hook_ref = ref.decoder_layers[0].register_forward_hook(lambda _m, _a, o: captured.append(o))
    with torch.no_grad():
        model(input_ids=x)
        ref(input_ids=x)
    hook.remove()
    hook_ref.remove()
    out, out_ref = (o[0] if isinstance(o, tuple) else o for o in captured)
    torch.testing.assert_close(out - out_ref, bias.expand_as(out), atol=1e-5, rtol=0)
    masks = random_masks(model, seed=3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    slice_model(a, masks)
    zero_out(b, masks)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, atol=2e-5,
                                   rtol=0)


def test_raised_floors_only_raise_one_block():
    spec = tiny_dense("llama").config.ecospa_spec
    base = Floors.of(spec)
    raised = base.raised(spec, "qk", 0.75)
    half = spec.dense.head_dim // 2
    for b, r in zip(base.units, raised.units):
        assert r["qk"] == math.ceil(0.75 * half)
        assert (r["vo"], r["ffn"]) == (b["vo"], b["ffn"])


def test_ecospa_act_keeps_its_qk_floor():
    model = tiny_dense("llama")
    dense = model.config.ecospa_spec
    prune_model(model, _windows(), PruneOptions(method="ecospa-act", target_size=0.6,
                                                top_k=0.5, theta=0.7))
    floor = 2 * math.ceil(ACT_QK_MIN_KEEP * (dense.dense.head_dim // 2))
    assert all(layer.qk_head_dim >= floor for layer in model.config.ecospa_spec.layers)
    assert model.config.ecospa_spec.provenance["scores"] == "activations"
