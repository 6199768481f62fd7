"""Round trips and foreign formats: every loaded model gives the logits of the model it came from.

Foreign directories are built here the way pruning tools write them: stock HF names and a dense
config.json, smaller tensors (FLAP adds o_proj/down_proj biases), sharded or not, and the
LLM-Pruner pickle. Their reference is the masked dense model (docs/DESIGN.md §3).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.loading import convert_native, load_model, load_tokenizer
from ecospa_deploy.modeling import from_hf
from ecospa_deploy.prune.surgery import slice_model, zero_out
from ecospa_deploy.spec import ModelSpec, SpecError
from ecospa_deploy.testing import (FAMILIES, VOCAB, tiny_hf, tiny_pruned, whole_head_masks,
                                   write_foreign_checkpoint, write_llm_pruner_pickle)

ATOL = 2e-5
X = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


# -- our format ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(family, tmp_path):
    model = tiny_pruned(family, 1, "sdpa")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == f"ecospa_{'gpt2' if family == 'gpt2' else 'llama'}"
    assert len(cfg["ecospa"]["layers"]) == 3 and "AutoModelForCausalLM" in cfg["auto_map"]
    if family != "gpt2":  # globals are the per-layer maxima
        layers = cfg["ecospa"]["layers"]
        assert cfg["intermediate_size"] == max(l["intermediate_size"] for l in layers)
        assert cfg["num_attention_heads"] == max(l["num_attention_heads"] for l in layers)
    loaded = load_model(tmp_path)
    assert loaded.config.ecospa_spec == model.config.ecospa_spec
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)
    from transformers import AutoModelForCausalLM
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(auto) is type(model)
    torch.testing.assert_close(_logits(auto), _logits(model), atol=0, rtol=0)


def test_spec_is_parsed_once_per_block(tmp_path, monkeypatch):
    """One load_model of a 3-layer model parses the spec twice: the raw config.json (errors name
    the file) and the config's block; every later ``ecospa_spec`` is the cached one."""
    model = tiny_pruned("llama", 1)
    model.save_pretrained(tmp_path)
    parse = ModelSpec.from_dict.__func__
    calls = []
    monkeypatch.setattr(ModelSpec, "from_dict",
                        classmethod(lambda cls, d: calls.append(1) or parse(cls, d)))
    loaded = load_model(tmp_path)
    assert loaded.config.num_hidden_layers == 3 and len(calls) == 2
    config = loaded.config
    assert config.ecospa_spec is config.ecospa_spec and len(calls) == 2
    flipped = config.ecospa_spec.replace_layers(config.ecospa_spec.layers[::-1])
    config.set_spec(flipped)                               # set_spec replaces the cache
    assert config.ecospa_spec is flipped and len(calls) == 2
    config.ecospa = model.config.ecospa_spec.to_dict()     # so does assigning the block
    assert config.ecospa_spec == model.config.ecospa_spec and len(calls) == 3
    assert "_spec_cache" not in config.to_dict() and config == copy.deepcopy(config)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_trust_remote_code_without_the_package(family, tmp_path):
    model = tiny_pruned(family, 2, "sdpa")
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"x": X, "ref": _logits(model)}, tmp_path / "ref.pt")
    script = textwrap.dedent("""
        import sys
        class Block:  # make the package unimportable: only the checkpoint's code may run
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ecospa_deploy":
                    raise ImportError("ecospa_deploy is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        r = torch.load(sys.argv[2])
        with torch.no_grad():
            err = (m(r["x"]).logits - r["ref"]).abs().max().item()
        print(type(m).__module__, err)
        sys.exit(0 if err < 1e-6 and "transformers_modules" in type(m).__module__ else 1)
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt"),
                          str(tmp_path / "ref.pt")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dtype_and_device_map(tmp_path):
    model = tiny_pruned("qwen2", 3, "sdpa")
    model.save_pretrained(tmp_path)
    half = load_model(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16
    auto = load_model(tmp_path, device="auto")
    torch.testing.assert_close(_logits(auto), _logits(model), atol=0, rtol=0)


# -- foreign formats -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "phi3"])
@pytest.mark.parametrize("biases,shard", [(False, False), (True, False), (True, True)])
def test_foreign_llama_family(family, biases, shard, tmp_path):
    directory, ref = write_foreign_checkpoint(tmp_path, family, 1, biases=biases, shard=shard)
    model = load_model(directory)
    spec = model.config.ecospa_spec
    assert all(l.o_bias == biases and l.down_bias == biases for l in spec.layers)
    assert len({l.num_key_value_heads for l in spec.layers} |
               {l.intermediate_size for l in spec.layers}) > 1
    torch.testing.assert_close(_logits(model), _logits(ref), atol=ATOL, rtol=0)
    # ... and `ecospa convert native` rewrites it into our format, losslessly.
    convert_native(directory, tmp_path / "native")
    native = load_model(tmp_path / "native")
    assert json.loads((tmp_path / "native/config.json").read_text())["model_type"] == \
        "ecospa_llama"
    torch.testing.assert_close(_logits(native), _logits(model), atol=0, rtol=0)


def test_foreign_gpt2(tmp_path):
    stock = tiny_hf("gpt2", 4)
    ours = from_hf(copy.deepcopy(stock))
    masks = whole_head_masks(ours, 0)
    ref = copy.deepcopy(ours)
    zero_out(ref, masks)
    slice_model(ours, masks)
    stock.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ours.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=ATOL, rtol=0)


def test_llm_pruner_pickle_needs_the_flag(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    ref = write_llm_pruner_pickle(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle.*allow_pickle=True"):
        load_model(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_tokenizer(path)
    model = load_model(path, allow_pickle=True)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=ATOL, rtol=0)
    assert load_tokenizer(path, allow_pickle=True).decode([94, 90])


# -- bad input: a clear error naming file/layer/tensor, and nothing left on disk ----------------
@pytest.fixture()
def saved(tmp_path):
    model = tiny_pruned("llama", 6, "sdpa")
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_tensors(directory: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(directory / "model.safetensors")
    fn(state)
    save_file(state, directory / "model.safetensors")


def test_missing_tensor(saved):
    _edit_tensors(saved, lambda s: s.pop("model.layers.2.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layer 2: missing tensor "
                                              r"'model.layers.2.mlp.down_proj.weight'"):
        load_model(saved)


def test_extra_tensor(saved):
    _edit_tensors(saved, lambda s: s.update({"model.layers.1.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: layer 1: unexpected tensor"):
        load_model(saved)


def test_wrong_shape(saved):
    _edit_tensors(saved, lambda s: s.update(
        {"model.layers.0.mlp.up_proj.weight": s["model.layers.0.mlp.up_proj.weight"][:-1]}))
    with pytest.raises(CheckpointError, match=r"layer 0: tensor 'model.layers.0.mlp.up_proj.weight'"
                                              r" has shape"):
        load_model(saved)


def test_truncated_and_corrupt_safetensors(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_model(saved)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(saved)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_model(saved)


def _edit_config(directory: Path, fn) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    fn(cfg)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_gqa_not_divisible(saved):
    def bad(cfg):
        cfg["ecospa"]["layers"][1]["num_attention_heads"] = 3
        cfg["ecospa"]["layers"][1]["num_key_value_heads"] = 2
        cfg["ecospa"]["layers"][1]["rope_kept"] = cfg["ecospa"]["layers"][1]["rope_kept"][:2] * 1
    _edit_config(saved, bad)
    with pytest.raises(SpecError, match="layer 1: num_attention_heads=3 is invalid; expected a "
                                        "multiple of num_key_value_heads=2"):
        load_model(saved)


def test_odd_qk_dim_with_rope(saved):
    _edit_config(saved, lambda c: c["ecospa"]["layers"][0].update(qk_head_dim=5))
    with pytest.raises(SpecError, match="layer 0: qk_head_dim=5 is invalid; expected an even"):
        load_model(saved)


def test_unknown_architecture(saved):
    _edit_config(saved, lambda c: c.update(model_type="bert"))
    with pytest.raises(CheckpointError, match=r"model_type='bert' is not supported; expected one "
                                              r"of \['ecospa_gpt2', 'ecospa_llama', 'gpt2'"):
        load_model(saved)


def test_foreign_partial_heads_refused(tmp_path):
    directory, _ = write_foreign_checkpoint(tmp_path, "llama", 0)
    _edit_tensors(directory, lambda s: s.update(
        {"model.layers.0.self_attn.q_proj.weight":
         s["model.layers.0.self_attn.q_proj.weight"][:-3]}))
    with pytest.raises(SpecError, match="layer 0: model.layers.0.self_attn.q_proj.weight has .* "
                                        "not a multiple of head_dim 16"):
        load_model(directory)


def test_failed_convert_leaves_nothing(saved, tmp_path):
    _edit_tensors(saved, lambda s: s.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.norm.weight'"):
        convert_native(saved, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_convert_refuses_to_overwrite(saved, tmp_path):
    (tmp_path / "out").mkdir()
    from ecospa_deploy.errors import EcospaError
    with pytest.raises(EcospaError, match="already exists"):
        convert_native(saved, tmp_path / "out")
