"""The anchor methods (Wanda-sp, FLAP, LLM-Pruner) on every family: golden invariant against
their own masks, parameter target, floors, and each score on a hand-built case."""

from __future__ import annotations

import copy

import pytest
import torch

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.families import family_of_model
from ecospa_deploy.prune.activations import LayerStats, Moments
from ecospa_deploy.prune.anchor_units import Shape, select
from ecospa_deploy.prune.flap import flap_scores, prune_flap, standardize
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.gradients import loss_gradients
from ecospa_deploy.prune.llm_pruner import layer_range, prune_llm_pruner, taylor_scores
from ecospa_deploy.prune.surgery import slice_model, zero_out
from ecospa_deploy.prune.tracking import count_params
from ecospa_deploy.prune.wanda_sp import prune_wanda_sp, wanda_scores
from ecospa_deploy.spec import LayerSpec
from ecospa_deploy.testing import FAMILIES, VOCAB, tiny_dense, tiny_pruned

ATOL = 2e-5
METHODS = {"wanda_sp": prune_wanda_sp, "flap": prune_flap, "llm_pruner": prune_llm_pruner}
# LLM-Pruner spares the first and last layers: six layers leave it four to prune.
LAYERS = {"llm_pruner": 6}


pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(seed: int = 0, n: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _model(method: str, family: str):
    return tiny_dense(family, num_hidden_layers=LAYERS.get(method, 3))


def _check_golden(model, masks):
    ref, sliced = copy.deepcopy(model), copy.deepcopy(model)
    zero_out(ref, masks)
    slice_model(sliced, masks)
    x = _windows(7, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x).logits, ref(x).logits, atol=ATOL, rtol=0)
    return sliced


def _prune(method: str, model, target: float, min_keep: float = 0.125, **kw):
    goal = round(target * count_params(model))
    floors = Floors.of(model.config.ecospa_spec, min_keep)
    return METHODS[method](model, _windows(), goal, floors, **kw), goal


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_anchor_golden_and_target(family, method):
    model = _model(method, family)
    before = model.config.ecospa_spec
    masks, goal = _prune(method, model, 0.75)
    sliced = _check_golden(model, masks)          # on the model as the method left it
    assert abs(count_params(sliced) - goal) <= 0.01 * goal
    after = sliced.config.ecospa_spec.layers
    for old, new in zip(before.layers, after):    # whole heads and channels only
        assert (new.qk_head_dim, new.v_head_dim) == (old.qk_head_dim, old.v_head_dim)
    pruned = range(len(after)) if method != "llm_pruner" else layer_range(len(after))
    shape = {(after[i].num_attention_heads, after[i].num_key_value_heads,
              after[i].intermediate_size) for i in pruned}
    if method != "flap":                          # one ratio in every pruned layer
        assert len(shape) == 1
    for i in set(range(len(after))) - set(pruned):     # LLM-Pruner's spared layers
        assert after[i] == before.layers[i]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_query_heads_mode_keeps_every_kv_head(family, method):
    """heads="query": equal query heads dropped from every group, KV heads (cache) kept."""
    model = _model(method, family)
    dense = model.config.ecospa_spec.layers
    masks, goal = _prune(method, model, 0.7, heads="query")
    sliced = _check_golden(model, masks)
    assert abs(count_params(sliced) - goal) <= 0.01 * goal
    layers = sliced.config.ecospa_spec.layers
    assert [a.num_key_value_heads for a in layers] == [b.num_key_value_heads for b in dense]
    if method != "flap":      # FLAP's group-mean head scores may rank every head above FFN
        assert any(a.num_attention_heads < b.num_attention_heads
                   for a, b in zip(layers, dense))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_anchor_prunes_an_already_pruned_model(family, method):
    model = tiny_pruned(family, seed=1)
    masks, goal = _prune(method, model, 0.85)
    sliced = _check_golden(model, masks)
    assert abs(count_params(sliced) - goal) <= 0.01 * goal


@pytest.mark.parametrize("method", METHODS)
def test_floors_hold_and_unreachable_targets_fail(method):
    model = _model(method, "qwen2")
    work = copy.deepcopy(model)
    masks, _ = _prune(method, work, 0.7, min_keep=0.5)
    sliced = _check_golden(work, masks)
    for layer in sliced.config.ecospa_spec.layers:
        assert layer.intermediate_size >= 48 and layer.num_key_value_heads >= 1
    with pytest.raises(EcospaError, match="smallest model the floors allow"):
        _prune(method, copy.deepcopy(model), 0.3, min_keep=0.5)


def test_bad_heads_option_is_rejected():
    model = tiny_dense("llama")
    with pytest.raises(EcospaError, match="heads='kv'"):
        _prune("wanda_sp", model, 0.8, heads="kv")


# -- scores on hand-built cases -----------------------------------------------------------
def _spec(n_q: int, n_kv: int, dv: int, ffn: int) -> LayerSpec:
    return LayerSpec(num_attention_heads=n_q, num_key_value_heads=n_kv, qk_head_dim=dv,
                     v_head_dim=dv, intermediate_size=ffn, softmax_scale=1.0)


def _moments(x: torch.Tensor) -> Moments:
    m = Moments.empty(x.shape[-1], x.device)
    m.add(x)
    return m


def test_wanda_sp_ranks_by_input_norm_times_column_norm():
    """FFN channels: ‖X‖ alone would keep channel 2, ‖W‖ alone channel 0; the product keeps 1."""
    x_d = torch.tensor([[1.0, 4.0, 6.0]])                        # ‖X_j‖ = 1, 4, 6
    w_d = torch.tensor([[9.0, 0.0, 0.6], [0.0, 3.0, 0.8]])       # ‖W[:, j]‖ = 9, 3, 1
    x_o = torch.tensor([[1.0, 1.0, 2.0, 0.5]])                   # 2 heads of 2 v dims
    w_o = torch.tensor([[1.0, 2.0, 1.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    stats = LayerStats(_moments(x_o), _moments(x_o), _moments(x_d), 1.0)
    c = {"o": (w_o, None), "down": (w_d, None)}
    group, head, ffn = wanda_scores(c, stats, _spec(2, 2, 2, 3))
    torch.testing.assert_close(ffn, torch.tensor([9.0, 12.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(head.flatten(), torch.tensor([1.0 + 2.0, 2.0 + 2.0],
                                                            dtype=torch.float64))
    sel = select(Shape(1, 1, 1), group, head, ffn)
    assert sel.ffn == [1] and sel.groups == [1]


def test_flap_scores_are_standardised_fluctuations():
    g = torch.Generator().manual_seed(0)
    x_o = torch.randn(40, 8, generator=g) * torch.arange(1.0, 9.0)
    x_d = torch.randn(40, 5, generator=g) * 3 + 1
    w_o, w_d = torch.randn(3, 8, generator=g), torch.randn(3, 5, generator=g)
    stats = LayerStats(_moments(x_o), _moments(x_o), _moments(x_d), 1.0)
    group, head, ffn = flap_scores({"o": (w_o, None), "down": (w_d, None)}, stats,
                                   _spec(4, 2, 2, 5))
    x_d64, x_o64 = x_d.double(), x_o.double()
    raw_d = x_d64.var(0) * w_d.double().pow(2).sum(0)            # sample variance × ‖W‖²
    close = dict(atol=1e-5, rtol=1e-5)     # the moments hold float32 products
    torch.testing.assert_close(ffn, (raw_d - raw_d.mean()) / raw_d.std(), **close)
    raw_o = (x_o64.var(0) * w_o.double().pow(2).sum(0)).pow(2)   # release squares attention
    z = (raw_o - raw_o.mean()) / raw_o.std()
    torch.testing.assert_close(head, z.view(2, 2, 2).mean(2), **close)   # mean of channels
    torch.testing.assert_close(group, z.view(2, 4).mean(1), **close)     # of the group's heads
    assert torch.equal(standardize(torch.ones(4)), torch.zeros(4))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_flap_bias_keeps_each_projections_mean_output(family):
    """On the calibration data, a compensated projection's mean output is the dense one's."""
    model = tiny_dense(family)
    dense = copy.deepcopy(model)
    inputs = {}

    def capture(key):
        def hook(_m, args, _out):
            inputs.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    mods = {}
    for i, layer in enumerate(dense.decoder_layers):
        c = layer.canonical()
        for key in ("o", "down"):
            mods[i, key] = (c[key][0].detach().clone(), c[key][1])
    family = family_of_model(dense)
    handles = [family.stat_modules(layer)[key].register_forward_hook(capture((i, key)))
               for i, layer in enumerate(dense.decoder_layers) for key in ("o", "down")]
    with torch.no_grad():
        for w in _windows():
            dense(input_ids=w[None], use_cache=False)
    for h in handles:
        h.remove()
    masks, _ = _prune("flap", model, 0.6)
    ref = copy.deepcopy(model)
    zero_out(ref, masks)
    removed = 0
    for i, layer in enumerate(ref.decoder_layers):
        c = layer.canonical()
        for key in ("o", "down"):
            x = torch.cat(inputs[i, key]).double()
            w0, b0 = mods[i, key]
            want = x @ w0.double().t() + (0 if b0 is None else b0.detach().double())
            w1, b1 = c[key]
            got = x @ w1.detach().double().t() + (0 if b1 is None else b1.detach().double())
            torch.testing.assert_close(got.mean(0), want.mean(0), atol=1e-5, rtol=1e-5)
            removed += int((w1 == 0).all(0).sum())
    assert removed > 0
    assert all(layer.down_bias for layer in model.config.ecospa_spec.layers)


def test_llm_pruner_scores_groups_by_summed_taylor_and_keeps_the_larger():
    """A GQA layer (4 query / 2 KV heads): group g = k,v rows of head g + q rows and o
    columns of query heads 2g, 2g+1; FFN channel = gate, up rows + down column."""
    g = torch.Generator().manual_seed(1)
    lspec = _spec(4, 2, 2, 3)
    shapes = {"q": (8, 5), "k": (4, 5), "v": (4, 5), "o": (5, 8), "gate": (3, 5),
              "up": (3, 5), "down": (5, 3)}
    c = {k: (torch.randn(s, generator=g), None) for k, s in shapes.items()}
    grad = {k: (torch.randn(s, generator=g), None) for k, s in shapes.items()}
    sal = {k: (c[k][0] * grad[k][0]).abs() for k in shapes}
    group, head, ffn = taylor_scores(c, grad, lspec)
    for kv in range(2):
        want = sal["k"][2 * kv:2 * kv + 2].sum() + sal["v"][2 * kv:2 * kv + 2].sum()
        for h in (2 * kv, 2 * kv + 1):
            want = want + sal["q"][2 * h:2 * h + 2].sum() + sal["o"][:, 2 * h:2 * h + 2].sum()
        torch.testing.assert_close(group[kv], want)
    torch.testing.assert_close(head[1, 0], sal["q"][4:6].sum() + sal["o"][:, 4:6].sum())
    torch.testing.assert_close(ffn, sal["gate"].sum(1) + sal["up"].sum(1) + sal["down"].sum(0))
    # Scale group 1's gradients up: it must be the group that survives.
    for key, rows in (("k", slice(2, 4)), ("v", slice(2, 4)), ("q", slice(4, 8))):
        grad[key][0][rows] *= 100
    group, head, ffn = taylor_scores(c, grad, lspec)
    assert select(Shape(1, 2, 3), group, head, ffn).groups == [1]


def test_loss_gradients_are_the_mean_loss_gradient():
    model = tiny_dense("gpt2")
    windows = _windows(3)
    flags = [p.requires_grad for p in model.parameters()]
    got = loss_gradients(model, windows, batch_size=1, layers=[1])
    assert got[0] is None and got[2] is None
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    loss = sum(model(input_ids=w[None], labels=w[None]).loss for w in windows) / len(windows)
    loss.backward()
    for name, p in model.decoder_layers[1].named_parameters():
        torch.testing.assert_close(got[1][name], p.grad, atol=1e-6, rtol=1e-5)


def test_llm_pruner_layer_range_scales_the_papers():
    assert layer_range(32) == range(4, 30)      # LLaMA-7B: the paper's 4..29
    assert layer_range(30) == range(4, 28)      # SmolLM2-135M
    assert layer_range(3) == range(1, 2)
    with pytest.raises(EcospaError, match="at least 3 layers"):
        layer_range(2)
