"""The per-layer spec: validation names layer and field; (de)serialization is lossless."""

from __future__ import annotations

import json

import pytest

from ecospa_deploy.families import families, family_of, stock_model_types
from ecospa_deploy.spec import DenseShape, LayerSpec, ModelSpec, SpecError
from ecospa_deploy.testing import tiny_dense, tiny_pruned

DENSE = DenseShape(num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                   intermediate_size=64)


def _spec(*layers: LayerSpec) -> ModelSpec:
    return ModelSpec(hidden_size=64, layers=layers, dense=DENSE)


def test_roundtrip_through_json():
    spec = tiny_pruned("llama", 3).config.ecospa_spec
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.provenance == spec.provenance


@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 6}, "layer 1: num_attention_heads=6 is invalid; expected a multiple "
                                 "of num_key_value_heads=4"),
    ({"qk_head_dim": 7}, "layer 1: qk_head_dim=7 is invalid; expected an even number with RoPE"),
    ({"num_key_value_heads": 0}, "layer 1: num_key_value_heads=0 is invalid"),
    ({"intermediate_size": -1}, "layer 1: intermediate_size=-1 is invalid"),
    ({"softmax_scale": float("nan")}, "layer 1: softmax_scale=nan is invalid"),
    ({"rope_kept": ((0, 1),) * 4}, r"layer 1: rope_kept\[0\]=<2 indices> is invalid; expected "
                                   r"qk_head_dim/2 = 8"),
    ({"rope_kept": (tuple(range(7)) + (9,),) * 4}, r"layer 1: rope_kept\[0\]=.* expected "
                                                   r"integers in \[0, 8\)"),
    ({"sliding_window": 0}, "layer 1: sliding_window=0 is invalid"),
    # a duplicate frequency loaded silently once and computed a different model
    ({"rope_kept": ((1, 1, 2, 3, 4, 5, 6, 7),) * 4}, r"layer 1: rope_kept\[0\]=.* expected "
                                                     r"distinct frequencies"),
    ({"rope_kept": ((0, 1, 2, 3, 4, 5, 0, 6),) * 4}, "distinct frequencies"),
])
def test_validation_names_layer_and_field(change, match):
    good = DENSE.layer()
    with pytest.raises(SpecError, match=match):
        _spec(good, good.replace(**change)).validate()


def test_zero_padding_pairs_may_repeat_frequency_zero():
    """What padding.py writes: kept frequencies, then zero-weight pairs at frequency 0."""
    good = DENSE.layer()
    _spec(good, good.replace(rope_kept=((0, 2, 5, 0, 0, 0, 0, 0),) * 4)).validate()
    _spec(good, good.replace(rope_kept=((3, 4, 0, 0, 0, 0, 0, 0),) * 4)).validate()


def test_layer_count_checked_against_config():
    with pytest.raises(SpecError, match="ecospa.layers has 1 entries; expected "
                                        "num_hidden_layers=2"):
        _spec(DENSE.layer()).validate(2)


def test_unknown_and_missing_keys():
    d = DENSE.layer().to_dict()
    with pytest.raises(SpecError, match=r"layer 0: keys=\['bogus'\]"):
        LayerSpec.from_dict({**d, "bogus": 1}, 0)
    d.pop("qk_head_dim")
    with pytest.raises(SpecError, match="missing \\['qk_head_dim'\\]"):
        LayerSpec.from_dict(d, 0)


def test_maxima_and_param_count():
    model = tiny_pruned("qwen2", 2)
    spec = model.config.ecospa_spec
    m = spec.maxima()
    assert model.config.intermediate_size == m["intermediate_size"]
    assert model.config.num_attention_heads == m["num_attention_heads"]
    for layer, module in zip(spec.layers, model.model.layers):
        assert layer.num_params(64) == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_and_norm_params_match_the_modules(family):
    """One count for inspect, the vLLM plan and the bench floor: layers with their norms."""
    model = tiny_pruned(family, 2)
    spec = model.config.ecospa_spec
    for layer, module in zip(spec.layers, model.decoder_layers):
        assert spec.layer_params(layer) == sum(p.numel() for p in module.parameters())
    final = model.transformer.ln_f if family == "gpt2" else model.model.norm
    assert spec.norm_params == sum(p.numel() for p in final.parameters())


def test_norm_bias_follows_the_norm_kind_not_rope():
    """A RoPE model with LayerNorms (Phi-2's shape) has norm biases."""
    assert not _spec(DENSE.layer()).norm_bias
    assert ModelSpec(64, (DENSE.layer(),), DENSE, positions="rope", norm="layernorm").norm_bias


@pytest.mark.parametrize("model_type", sorted(stock_model_types()))
def test_every_registered_architecture_has_a_tiny_example(model_type):
    """DESIGN §8.7: each registry entry builds and runs on a tiny config."""
    fam = family_of(model_type)
    assert fam is families()[stock_model_types()[model_type]]
    model = tiny_dense(model_type)
    assert type(model) is fam.load("model_class")
    assert model.config.model_type == fam.model_type
    assert model(input_ids=__import__("torch").tensor([[3, 4, 5]])).logits.shape == (1, 3, 96)
