"""Phi-3: stock checkpoints fuse q|k|v (``qkv_proj``) and gate|up (``gate_up_proj``); we split them
exactly into ``ecospa_llama``. Stock vs ours, foreign pruned fused checkpoints, the refusals,
the LLM-Pruner pickle and ``ecospa prune`` on a Phi-3 directory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ecospa_deploy.cli import main
from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.families import FAMILY_MODULES, families, family_of, stock_model_types
from ecospa_deploy.loading import load_model, read_checkpoint_index
from ecospa_deploy.modeling import MODEL_CLASSES, from_hf
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import slice_model, zero_out
from ecospa_deploy.prune.tracking import count_params
from ecospa_deploy.spec import SpecError
from ecospa_deploy.testing import (VOCAB, tiny_dense, tiny_hf, tiny_tokenizer,
                                   write_foreign_checkpoint)

ATOL = 2e-5
IDS = torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
# longrope as Phi-3.5/Phi-3-128k configure it (factor lists sized head_dim/2 = 8)
LONGROPE = dict(max_position_embeddings=128, original_max_position_embeddings=32,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                                 "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]})


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, ids, n=10):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[:, ids.shape[1]:]


# -- the registry: two families share our model type -----------------------------------------
def test_our_model_type_stays_with_the_llama_family():
    assert family_of("ecospa_llama") is families()["llama"]
    assert family_of("phi3") is families()["phi3"]
    assert stock_model_types()["phi3"] == "phi3"
    assert len(MODEL_CLASSES) == len(set(MODEL_CLASSES)) == len(
        {f.model_class for f in families().values()})
    from ecospa_deploy.converters.vllm.plugin import ARCHITECTURES
    assert ARCHITECTURES["EcospaLlamaForCausalLM"] == families()["llama"].vllm_model
    assert list(FAMILY_MODULES).index("llama") < list(FAMILY_MODULES).index("phi3")


# -- stock Phi3ForCausalLM == our converted model -----------------------------------------------
@pytest.mark.parametrize("overrides", [{}, LONGROPE], ids=["default-sliding", "longrope"])
def test_stock_and_converted_match(overrides):
    stock = tiny_hf("phi3", 3, **overrides)
    assert hasattr(stock.model.layers[0].self_attn, "qkv_proj")
    ours = from_hf(copy.deepcopy(stock))
    assert ours.config.model_type == "ecospa_llama"
    assert ours.config.ecospa_spec.provenance["base_model_type"] == "phi3"
    assert not any("qkv_proj" in n or "gate_up" in n for n in ours.state_dict())
    torch.testing.assert_close(_logits(ours), _logits(stock), atol=ATOL, rtol=0)
    # beyond original_max_position_embeddings (32) longrope switches to the long factors
    long_ids = torch.randint(3, VOCAB, (1, 45), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(ours, long_ids), _logits(stock, long_ids), atol=ATOL,
                               rtol=0)
    # cached decode (kept under the longrope switch, where stock Phi-3 drops its cache)
    ids = IDS[:, :12]
    assert torch.equal(_greedy(ours, ids), _greedy(stock, ids))


def test_longrope_is_really_applied():
    """The longrope case above is not a default-rope test in disguise."""
    rope = tiny_hf("phi3", 3, **LONGROPE)
    plain = tiny_hf("phi3", 3, max_position_embeddings=128)
    assert from_hf(copy.deepcopy(rope)).model.rotary_emb.rope_type == "longrope"
    assert (_logits(rope) - _logits(plain)).abs().max() > 1e-2


def test_engine_with_longrope():
    """Exact under the switch; refused past it (a static table cannot follow it per request)."""
    from ecospa_deploy.engine import Engine, SamplingParams
    from ecospa_deploy.errors import UnsupportedError

    model = tiny_dense("phi3", 1, **LONGROPE)
    prompt = [5, 6, 7, 8, 9, 10]
    eng = Engine(model, max_batch_size=1, max_seq_len=32)
    assert eng.generate([prompt], SamplingParams(max_new_tokens=12))[0] == \
        _greedy(model, torch.tensor([prompt]), 12)[0].tolist()
    with pytest.raises(UnsupportedError, match=r"max_seq_len=48 exceeds "
                                                r"original_max_position_embeddings=32"):
        Engine(model, max_batch_size=1, max_seq_len=48)


def test_canonical_views_of_a_stock_layer():
    fam = families()["phi3"]
    stock = tiny_hf("phi3", 2)
    ours = from_hf(copy.deepcopy(stock))
    for s, o in zip(fam.decoder_layers(stock), fam.decoder_layers(ours)):
        cs, co = fam.canonical(s), o.canonical()
        assert cs.keys() == co.keys()
        for key in cs:
            assert torch.equal(cs[key][0], co[key][0]), key
        assert cs["q"][0].data_ptr() == s.self_attn.qkv_proj.weight.data_ptr()   # a view


def test_partial_rotary_factor_is_refused(tmp_path):
    stock = tiny_hf("phi3", 0, partial_rotary_factor=0.5)
    with pytest.raises(SpecError, match=r"partial_rotary_factor=0\.5 is not supported"):
        from_hf(stock)
    stock.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()},
              tmp_path / "model.safetensors")
    with pytest.raises(SpecError, match=r"partial_rotary_factor=0\.5"):
        load_model(tmp_path)


# -- foreign checkpoints pruned by whole heads, stored fused ------------------------------------
def _masks():
    """Heads and FFN differ per layer (layer 1 keeps both KV groups, the others one)."""
    kv = [[0], [0, 1], [1]]
    ffn = [list(range(0, 96, 2)), list(range(70)), list(range(5, 96, 3))]
    return [LayerMask(q_heads=[h for g in k for h in (2 * g, 2 * g + 1)], kv_heads=k, ffn=f)
            for k, f in zip(kv, ffn)]


def _pruned_stock(seed: int):
    """(stock model, the masked dense reference, the pruned model's fused stock tensors)."""
    stock = tiny_hf("phi3", seed)
    ours = from_hf(copy.deepcopy(stock))
    ref = copy.deepcopy(ours)
    zero_out(ref, _masks())
    slice_model(ours, _masks())
    state = families()["phi3"].to_stock(
        {k: v.contiguous() for k, v in ours.state_dict().items()}, ours.config.ecospa_spec)
    return stock, ref, state


@pytest.fixture()
def foreign(tmp_path):
    stock, ref, state = _pruned_stock(4)
    stock.config.save_pretrained(tmp_path / "f")
    save_file(state, tmp_path / "f" / "model.safetensors")
    return tmp_path / "f", ref


def test_foreign_fused_checkpoint_loads_and_matches(foreign):
    directory, ref = foreign
    names = set(read_checkpoint_index(directory))
    assert "model.layers.1.self_attn.qkv_proj.weight" in names
    assert not any("q_proj" in n or "gate_proj" in n for n in names)
    model = load_model(directory)
    got = [(l.num_attention_heads, l.num_key_value_heads, l.intermediate_size)
           for l in model.config.ecospa_spec.layers]
    assert got == [(2, 1, 48), (4, 2, 70), (2, 1, 31)]
    assert model.config.ecospa_spec.provenance["source_model_type"] == "phi3"
    from ecospa_deploy.inspect import describe       # `ecospa inspect`, weights unread
    info = describe(directory)
    assert [r["num_key_value_heads"] for r in info["layers"]] == [1, 2, 1]
    assert info["totals"]["params"] == count_params(model)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=ATOL, rtol=0)
    half = load_model(directory, dtype="bfloat16", device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_write_foreign_checkpoint_writes_phi3_fused(tmp_path):
    directory, ref = write_foreign_checkpoint(tmp_path, "phi3", 0, biases=True)
    names = set(read_checkpoint_index(directory))
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert "model.layers.0.self_attn.o_proj.bias" in names
    torch.testing.assert_close(_logits(load_model(directory)), _logits(ref), atol=ATOL, rtol=0)


def _edit(directory, fn):
    state = load_file(directory / "model.safetensors")
    fn(state)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")


QKV1 = "model.layers.1.self_attn.qkv_proj.weight"
GU0 = "model.layers.0.mlp.gate_up_proj.weight"


@pytest.mark.parametrize("edit, error, match", [
    (lambda s: s.pop(QKV1), CheckpointError,
     r"layer 1: missing tensor 'model\.layers\.1\.self_attn\.qkv_proj\.weight'"),
    (lambda s: s.update({QKV1: s[QKV1][:-16]}), CheckpointError,
     r"layer 1: model\.layers\.1\.self_attn\.qkv_proj\.weight has 112 rows; expected 4 query "
     r"heads x 16"),
    (lambda s: s.update({QKV1: torch.cat([s[QKV1], s[QKV1][-32:]])}), SpecError,   # 3 KV heads
     r"layer 1: num_attention_heads=4 is invalid; expected a multiple of num_key_value_heads=3"),
    (lambda s: s.update({QKV1: s[QKV1][:, :-1]}), CheckpointError,
     r"tensor 'model\.layers\.1\.self_attn\.qkv_proj\.weight' has shape \[128, 63\]"),
    (lambda s: s.update({GU0: s[GU0][:-1]}), CheckpointError,
     r"layer 0: model\.layers\.0\.mlp\.gate_up_proj\.weight has 95 rows; expected an even"),
    (lambda s: s.update({GU0: s[GU0][:-2]}), CheckpointError,    # even, but down_proj disagrees
     r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 48\]; the config's "
     r"spec expects \[64, 47\]"),
    (lambda s: s.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}),
     CheckpointError, r"layer 0: unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"),
    (lambda s: s.update({"model.layers.2.self_attn.o_proj.weight":
                         s["model.layers.2.self_attn.o_proj.weight"][:, :-3]}), SpecError,
     r"layer 2: model\.layers\.2\.self_attn\.o_proj\.weight has 29 input columns, not a multiple "
     r"of head_dim 16"),
])
def test_bad_fused_shapes_are_refused(foreign, edit, error, match):
    directory, _ = foreign
    _edit(directory, edit)
    with pytest.raises(error, match=match):
        load_model(directory)


# -- LLM-Pruner pickle of a pruned stock Phi3ForCausalLM ----------------------------------------
def test_llm_pruner_pickle(tmp_path):
    stock, ref, fused = _pruned_stock(5)
    for i, layer in enumerate(stock.model.layers):
        for owner, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                            (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            w = fused[f"model.layers.{i}.{'self_attn' if owner is layer.self_attn else 'mlp'}."
                      f"{name}.weight"]
            new = nn.Linear(w.shape[1], w.shape[0], bias=False)
            new.weight.data.copy_(w)
            setattr(owner, name, new)
    torch.save({"model": stock, "tokenizer": None}, tmp_path / "pytorch_model.bin")
    model = load_model(tmp_path / "pytorch_model.bin", allow_pickle=True)
    assert model.config.ecospa_spec.layers[1].num_key_value_heads == 2
    torch.testing.assert_close(_logits(model), _logits(ref), atol=ATOL, rtol=0)


# -- `ecospa prune` on a stock Phi-3 directory ----------------------------------------------
TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ")


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    tiny_hf("phi3", 1).save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    (root / "calib.txt").write_text(TEXT * 20)
    return root


@pytest.mark.parametrize("method", ["ecospa", "numerical", "uncoupled", "magnitude"])
def test_prune_cli_on_a_phi3_directory(phi3_dir, tmp_path, capsys, method):
    dense_dir = phi3_dir / "dense"
    assert json.loads((dense_dir / "config.json").read_text())["model_type"] == "phi3"
    assert "model.layers.0.self_attn.qkv_proj.weight" in read_checkpoint_index(dense_dir)
    out = tmp_path / "out"
    assert main(["prune", str(dense_dir), "-o", str(out), "--calib",
                 str(phi3_dir / "calib.txt"), "--samples", "2", "--seq-len", "24",
                 "--device", "cpu", "--target-size", "0.7", "--method", method]) == 0
    capsys.readouterr()
    dense = load_model(dense_dir)
    torch.testing.assert_close(_logits(dense), _logits(tiny_hf("phi3", 1)), atol=ATOL, rtol=0)
    pruned = load_model(out)
    target = round(0.7 * count_params(dense))
    assert abs(count_params(pruned) - target) <= 0.02 * target
    prov = pruned.config.ecospa_spec.provenance
    assert prov["method"] == method and prov["base_model_type"] == "phi3"
    if method in ("ecospa", "magnitude"):     # these never rewrite kept weights
        masks = [LayerMask(**kept) for kept in prov["kept"]]
        zero_out(dense, masks)
        torch.testing.assert_close(_logits(pruned), _logits(dense), atol=ATOL, rtol=0)
