"""Family knowledge lives in ecospa_deploy/families/ only: every family is complete, its facts
agree with the models it builds, and no code outside the package branches on a family's name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecospa_deploy.families import FAMILY_MODULES, families, family_of, spec_of
from ecospa_deploy.families.base import Family
from ecospa_deploy.testing import FAMILIES, VOCAB, tiny_dense, tiny_hf

ROOT = Path(__file__).resolve().parents[2]
NAMES = "|".join(sorted({t for f in families().values() for t in (f.name, *f.stock)}))
# a comparison with a family's name, a suffix test on a model type, or an isinstance on one
# family's class: what "is this GPT-2 or Llama?" looked like before families/ existed
BRANCH = re.compile(rf"""(==|!=)\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)"""
                    rf"""|endswith\(["']({NAMES})|isinstance\([^)]*Ecospa\w+Config""")


# attributes only some families' configs or modules have: probing one with hasattr/getattr is a
# family branch in disguise (ask the family instead: max_positions, activation, attention_mask)
FAMILY_KEYS = ("layer_types", "n_positions", "max_position_embeddings", "hidden_act",
               "activation_function", "self_attn", "c_attn", "c_fc", "n_embd", "n_head",
               "n_layer", "n_inner", "rms_norm_eps", "layer_norm_epsilon", "qkv_proj",
               "gate_up_proj")
PROBE = re.compile(rf"""(hasattr|getattr)\([^)]*["']({"|".join(FAMILY_KEYS)})["']""")


def _sources():
    for top in ("ecospa_deploy", "converters", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "families" not in path.relative_to(ROOT).parts:
                yield path


def test_no_family_branch_outside_families():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in _sources()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if BRANCH.search(line)]
    assert not hits, "family branches outside ecospa_deploy/families/:\n" + "\n".join(hits)


def test_no_family_probe_outside_families():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in _sources() if p.name != "testing.py"    # builds every family's layers
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if PROBE.search(line)]
    assert not hits, "family probes outside ecospa_deploy/families/:\n" + "\n".join(hits)
    assert PROBE.search('hasattr(model.config, "layer_types")')
    assert PROBE.search('getattr(config, "n_positions", None)')
    assert not PROBE.search('getattr(config, "rope_parameters", None)')


def test_the_grep_would_see_a_branch():
    assert BRANCH.search('if family == "gpt2":')
    assert BRANCH.search("model_type.endswith('gpt2')")
    assert BRANCH.search("isinstance(config, EcospaGPT2Config)")
    assert not BRANCH.search('fam = get("gpt2")')


@pytest.mark.parametrize("name", sorted(FAMILY_MODULES))
def test_every_family_defines_every_fact(name):
    fam = families()[name]
    facts = [k for k, v in vars(Family).get("__annotations__", {}).items() if "ClassVar" in v]
    missing = [k for k in facts if not hasattr(fam, k)]
    assert not missing, f"{name} lacks {missing}"
    assert fam.norm in ("rmsnorm", "layernorm") and fam.positions in ("rope", "learned")
    for what in ("config_class", "model_class", "base_model_class", "canonical_fn"):
        assert fam.load(what) is not None
    assert fam.load("model_class").__name__ == fam.architecture


@pytest.mark.parametrize("variant", FAMILIES)
def test_facts_agree_with_the_built_models(variant):
    fam = family_of(variant)
    stock, ours = tiny_hf(variant), tiny_dense(variant)
    # our model type is owned by the first family naming it (Qwen3, Phi-3: ecospa_llama)
    owner = next(f for f in families().values() if f.model_type == fam.model_type)
    assert family_of(ours.config.model_type) is owner
    assert owner.architecture == fam.architecture and owner.vllm_model == fam.vllm_model
    _, spec = spec_of(ours)
    _, stock_spec = spec_of(stock)
    assert spec == stock_spec
    assert (spec.norm, spec.positions, spec.gated_mlp) == (fam.norm, fam.positions, fam.gated_mlp)
    norm = fam.norms(fam.decoder_layers(ours)[0])[0]
    assert (getattr(norm, "bias", None) is not None) == spec.norm_bias
    parts = fam.parts(ours)
    assert (parts.positions is None) == (fam.positions == "rope")
    assert (parts.rotary is None) == (fam.positions == "learned")
    # one canonical implementation: the stock layer and ours give the same projections
    for a, b in zip(fam.decoder_layers(stock), fam.decoder_layers(ours)):
        ca, cb = fam.canonical(a), fam.canonical(b)
        assert ca.keys() == cb.keys() == set(b.canonical())
        for key in ca:
            assert torch.equal(ca[key][0], cb[key][0]), key
    assert len(fam.decoder_layers(stock)) == fam.num_layers(stock.config)
    ids = torch.tensor([[3, 4, 5]])
    assert ours(input_ids=ids).logits.shape == (1, 3, VOCAB)


def test_families_import_neither_torch_nor_transformers():
    code = ("import sys, ecospa_deploy.families as f; f.families(); "
            "print(any(m in sys.modules for m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_native_config_keys_override_generic_ones():
    """``tiny_hf_config("gpt2", n_embd=256)`` is GPT-2 at width 256, not the generic 64."""
    from ecospa_deploy.testing import tiny_hf_config

    assert tiny_hf_config("gpt2", n_embd=256).n_embd == 256
    assert tiny_hf_config("gpt2", hidden_size=128).n_embd == 128
    assert tiny_hf_config("llama", head_dim=64).head_dim == 64
