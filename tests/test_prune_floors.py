"""Per-layer floors: no method leaves a layer below 1/8 of its dense widths (or one KV group),
every method reaches the same aggressive target, and an impossible target names the floor."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune.ecospa import schedule
from ecospa_deploy.prune.floors import Floors
from ecospa_deploy.prune.run import METHODS, PruneOptions, prune_model

# LLM-Pruner leaves the first and last layers dense (its paper's layer range), so on these
# 3-layer models it prunes one layer and the targets below are out of its reach; its floors are
# tested in tests/test_prune_anchors.py
EVERY_LAYER = [m for m in METHODS if m != "llm-pruner"]
from ecospa_deploy.prune.tracking import ParamCounter, count_params
from ecospa_deploy.testing import FAMILIES, VOCAB, tiny_dense


def _windows(n: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


def _assert_floors(spec, dense, min_keep):
    d = dense.dense
    for i, layer in enumerate(spec.layers):
        assert layer.intermediate_size >= math.ceil(min_keep * d.intermediate_size), (i, layer)
        assert layer.qk_head_dim >= math.ceil(min_keep * d.head_dim), (i, layer)
        assert layer.v_head_dim >= math.ceil(min_keep * d.head_dim), (i, layer)
        assert layer.num_key_value_heads >= 1


@pytest.mark.parametrize("method", EVERY_LAYER)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_layer_below_the_floors_at_half_size(family, method):
    model = tiny_dense(family)
    dense = model.config.ecospa_spec
    result = prune_model(model, _windows(), PruneOptions(method=method, target_size=0.5))
    _assert_floors(model.config.ecospa_spec, dense, 0.125)
    # the uniform baselines move every block by one unit at a time: 3% on a 3-layer model
    assert abs(result.params_after - result.params_target) <= 0.03 * result.params_target
    assert result.rounds <= 20


def test_the_floor_is_what_stops_the_collapse():
    """A target between the floored and the unfloored minimum: refused at the default floor,
    reached with min_keep=0 by going below 1/8 somewhere."""
    model = tiny_dense("llama")
    spec = model.config.ecospa_spec
    counter = ParamCounter(model)
    low = counter.total(Floors.of(spec, 0.0).smallest(spec))
    high = counter.total(Floors.of(spec).smallest(spec))
    size = (low + high) / 2 / count_params(model)
    with pytest.raises(EcospaError, match="floors allow"):
        prune_model(copy.deepcopy(model), _windows(), PruneOptions("magnitude", size))
    prune_model(model, _windows(), PruneOptions("magnitude", size, min_keep=0.0))
    with pytest.raises(AssertionError):
        _assert_floors(model.config.ecospa_spec, spec, 0.125)


@pytest.mark.parametrize("method", EVERY_LAYER)
def test_larger_floor_is_honoured(method):
    model = tiny_dense("llama")
    dense = model.config.ecospa_spec
    prune_model(model, _windows(), PruneOptions(method=method, target_size=0.7, min_keep=0.4))
    _assert_floors(model.config.ecospa_spec, dense, 0.4)


@pytest.mark.parametrize("method", EVERY_LAYER)
def test_impossible_target_names_the_floor(method):
    model = tiny_dense("llama")
    with pytest.raises(EcospaError, match=r"min-keep 0\.5.*smaller --min-keep"):
        prune_model(model, _windows(), PruneOptions(method=method, target_size=0.3,
                                                    min_keep=0.5))


def test_numerical_removes_heads_and_channels_at_half_size():
    """Balanced per parameter, numerical does not spend the whole budget on FFN channels."""
    model = tiny_dense("llama")
    dense = model.config.ecospa_spec
    prune_model(model, _windows(), PruneOptions(method="numerical", target_size=0.5))
    layers = model.config.ecospa_spec.layers
    ffn_floor = math.ceil(0.125 * dense.dense.intermediate_size)
    assert any(layer.intermediate_size > ffn_floor for layer in layers)
    assert any(layer.num_key_value_heads < 4 or layer.v_head_dim < 8 or layer.qk_head_dim < 8
               for layer in layers)


def test_schedule_is_geometric_and_ends_on_the_target():
    points = [schedule(1000, 500, 20, r) for r in range(20)]
    assert points[-1] == 500 and all(a >= b for a, b in zip(points, points[1:]))
    assert points[0] == math.floor(1000 * 0.5 ** (1 / 20))


def test_floors_of_an_already_narrow_layer_are_its_width():
    model = tiny_dense("llama")
    spec = model.config.ecospa_spec
    narrow = spec.replace_layers([spec.layers[0].replace(intermediate_size=3)]
                                 + list(spec.layers[1:]))
    assert Floors.of(narrow)(0, "ffn") == 3
    assert Floors.of(narrow)(1, "ffn") == math.ceil(0.125 * spec.dense.intermediate_size)
