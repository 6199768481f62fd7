"""`ecospa convert vllm` without vLLM: the padding plan, exactness of the padded checkpoint,
clear refusals with no partial output, and the CLI. (tests/test_vllm_parity.py runs real vLLM.)
"""

from __future__ import annotations

import json

import pytest
import torch

from ecospa_deploy.cli import main
from ecospa_deploy.converters.vllm.convert import REPORT_NAME, convert_vllm
from ecospa_deploy.converters.vllm.plan import (ACCEPTED_HEAD_SIZES, kv_elements_per_token,
                                                layer_head_size, plan_vllm)
from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.loading import load_model
from ecospa_deploy.spec import DenseShape, LayerSpec, ModelSpec
from ecospa_deploy.testing import VOCAB, tiny_pruned

# Tiny models whose dense head dim is 64, the smallest head size every vLLM backend accepts.
HEAD64 = {"llama": {"head_dim": 64}, "qwen2": {"hidden_size": 256},
          "mistral": {"hidden_size": 256}, "gpt2": {"n_embd": 256}, "qwen3": {"head_dim": 64},
          "phi3": {"hidden_size": 256}}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tp, backend", [(1, "flash_attn"), (2, "cpu")])
@pytest.mark.parametrize("family", sorted(HEAD64))
def test_converted_checkpoint_is_exact_and_vllm_shaped(tmp_path, family, tp, backend):
    model = tiny_pruned(family, 0, **HEAD64[family])
    result = convert_vllm(model, tmp_path / "out", tensor_parallel_size=tp,
                          attention_backend=backend)
    padded = load_model(tmp_path / "out")
    spec = padded.config.ecospa_spec
    for layer, size, src in zip(spec.layers, result.plan.head_sizes, model.config.ecospa_spec.layers):
        # head dims keep their pruned widths (vLLM pads at run time); only TP pads the weights
        assert (layer.qk_head_dim, layer.v_head_dim) == (src.qk_head_dim, src.v_head_dim)
        assert size == layer_head_size(src.qk_head_dim, src.v_head_dim,
                                       ACCEPTED_HEAD_SIZES[backend], spec.rope)
        assert layer.num_key_value_heads % tp == 0 and layer.intermediate_size % tp == 0
    assert spec.provenance["vllm_tensor_parallel_size"] == tp
    assert spec.provenance["vllm_head_sizes"] == list(result.plan.head_sizes)
    assert spec.provenance["vllm_attention_backend"] == backend
    assert kv_elements_per_token(spec) == result.plan.kv_elements_per_token_after
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    # Zero padding is exact in math; fp32 summation order over longer rows moves ~1e-5.
    torch.testing.assert_close(_logits(padded, ids), _logits(model, ids), atol=1e-4, rtol=0)
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in padded.parameters())
    assert report["model_weight_overhead_pct"] == pytest.approx(100 * (after / before - 1),
                                                                abs=1e-3)
    if tp == 1:
        assert after == before and result.plan.weight_overhead_pct == 0
    assert result.plan.kv_overhead_pct > 0


def test_plan_states_overhead_and_notes_tp_padding():
    dense = DenseShape(4, 2, 64, 256)
    layer = dense.layer()
    odd = layer.replace(num_attention_heads=3, num_key_value_heads=1, qk_head_dim=40,
                        v_head_dim=50, intermediate_size=201,
                        rope_kept=(tuple(range(20)),))
    spec = ModelSpec(128, (layer, odd), dense).validate()
    plan = plan_vllm(spec, tensor_parallel_size=2)
    assert plan.head_sizes == (64, 56)           # per layer, FlashAttention: multiples of 8
    shapes = [(l.num_attention_heads, l.num_key_value_heads, l.intermediate_size)
              for l in plan.padded.layers]
    assert shapes == [(4, 2, 256), (6, 2, 202)]
    assert any("KV heads 1 -> 2" in n for n in plan.notes)
    assert any("FFN 201 -> 202" in n for n in plan.notes)
    assert plan.kv_elements_per_token_before == 2 * 128 + 90
    assert plan.kv_elements_per_token_after == 2 * 128 + 2 * 112
    assert plan_vllm(spec, attention_backend="portable").head_sizes == (64, 64)
    assert plan_vllm(spec, attention_backend="cpu").head_sizes == (64, 64)
    assert plan.weight_overhead_pct > 0 and plan.kv_overhead_pct > 0
    assert plan_vllm(ModelSpec(128, (layer, layer), dense).validate()).weight_overhead_pct == 0


def _spec(qk: int, v: int, dense_head: int = 128, rope: bool = True, heads: int = 4) -> ModelSpec:
    dense = DenseShape(heads, heads, dense_head, 256)
    kept = tuple(tuple(range(qk // 2)) for _ in range(heads)) if rope else None
    layer = dense.layer(rope=rope).replace(qk_head_dim=qk, v_head_dim=v, rope_kept=kept)
    return ModelSpec(256, (layer,), dense, positions="rope" if rope else "learned",
                     norm="rmsnorm" if rope else "layernorm", gated_mlp=rope).validate()


@pytest.mark.parametrize("spec, kwargs, message", [
    (_spec(64, 96), {"head_size": 64}, r"layer 0: head dims 64/96 do not fit head_size=64; "
                                       r"leave --head-size out \(this layer needs >= 96\)"),
    (_spec(64, 300, rope=False), {}, r"none of which fits \(backends that fit: \['cpu', "
                                     r"'flashinfer', 'triton'\]\)"),
    (_spec(32, 32), {"head_size": 96, "attention_backend": "portable"},
     r"head_size=96 is not supported by the portable backend; expected one of \[64, 128, 256\]"),
    (_spec(32, 32), {"attention_backend": "xformers"}, "attention backend 'xformers'"),
    (_spec(32, 32), {"tensor_parallel_size": 3}, r"4 attention heads.*sizes that work: \[1, 2, 4\]"),
    (_spec(32, 32, heads=12), {"tensor_parallel_size": 3, "vocab_size": 100},
     r"vocabulary of 100 \(padded to 128 by vLLM\).*\[1, 2, 4\]"),
    (_spec(32, 32), {"tensor_parallel_size": 0}, "tensor_parallel_size=0"),
    (_spec(32, 32), {"activation": "gelu"}, "activation 'gelu' has no vLLM kernel"),
])
def test_plan_refuses_with_reason(spec, kwargs, message):
    with pytest.raises(UnsupportedError, match=message):
        plan_vllm(spec, **kwargs)


def test_plan_refuses_a_fully_pruned_ffn():
    dense = DenseShape(4, 4, 64, 256)
    layer = dense.layer().replace(intermediate_size=0)
    with pytest.raises(UnsupportedError, match="layer 0: intermediate_size=0"):
        plan_vllm(ModelSpec(256, (layer,), dense).validate())


def test_refusal_leaves_no_output(tmp_path):
    model = tiny_pruned("llama")
    with pytest.raises(UnsupportedError, match="tensor_parallel_size=3"):
        convert_vllm(model, tmp_path / "out", tensor_parallel_size=3)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 48, 62])
def test_small_rope_heads_pad_exactly(tmp_path, head_dim):
    """RoPE heads below 64 pad to 32/64 (past the rotary dim when needed), logits unchanged."""
    model = tiny_pruned("llama", 0, head_dim=head_dim)
    result = convert_vllm(model, tmp_path / "out", attention_backend="cpu")
    assert set(result.plan.head_sizes) <= {32, 64}
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(load_model(tmp_path / "out"), ids), _logits(model, ids),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("qk, v, backend, want", [
    (12, 4, "cpu", 32), (40, 50, "cpu", 64), (65, 3, "cpu", 80), (40, 50, "flash_attn", 56),
    (5, 5, "flash_attn", 8), (40, 50, "flashinfer", 64), (33, 1, "triton", 34),
    (33, 1, "portable", 64), (300, 8, "flash_attn", None)])
def test_per_layer_head_size_rule(qk, v, backend, want):
    assert layer_head_size(qk, v, ACCEPTED_HEAD_SIZES[backend], rope=True) == want


# Model-bytes overhead of bench/results/convert_vllm_padding.json: the weights keep their
# pruned widths, so only TP padding costs bytes (none at TP 1); the KV cache pays the head size.
@pytest.mark.parametrize("shape, tp, limit", [
    ("llama-1b", 1, 0.0), ("llama-1b", 2, 5.0), ("gpt2-small", 1, 0.0), ("gpt2-small", 2, 5.0),
    ("gpt2-medium", 2, 5.0)])
def test_paper_shapes_overhead(shape, tp, limit):
    from ecospa_deploy.benchmark.shapes import hf_config, load_shape, pruned_spec
    from ecospa_deploy.modeling import config_from_dense

    data = load_shape(shape)
    config = config_from_dense(hf_config(data))
    spec = pruned_spec(config.ecospa_spec, data["pruned"]["layers"])
    h = spec.hidden_size
    embedding = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    plan = plan_vllm(spec, tp, attention_backend="flash_attn", vocab_size=config.vocab_size)
    assert 0 <= plan.overhead_pct(embedding) <= limit
    assert 0 < plan.kv_overhead_pct <= plan_vllm(spec, tp, attention_backend="portable",
                                                 vocab_size=config.vocab_size).kv_overhead_pct


def test_cli_convert_vllm_and_onnx(tmp_path, capsys):
    model = tiny_pruned("gpt2", 0, n_embd=256)
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", "vllm", str(tmp_path / "src"), "-o", str(tmp_path / "v"),
                 "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "padding overhead: +" in out and "vllm serve" in out
    assert main(["convert", "vllm", str(tmp_path / "src"), "-o", str(tmp_path / "v2"),
                 "--head-size", "64", "--tensor-parallel-size", "4",
                 "--attention-backend", "cpu"]) == 0
    assert "head sizes [64] for the cpu attention backend" in capsys.readouterr().out
    assert main(["convert", "vllm", str(tmp_path / "src"), "-o", str(tmp_path / "v3"),
                 "--tensor-parallel-size", "3"]) == 2
    assert "sizes that work: [1, 2, 4]" in capsys.readouterr().err
    assert main(["convert", "vllm", str(tmp_path / "src"), "-o", str(tmp_path / "v"),
                 ]) == 2                                # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "onnx", str(tmp_path / "src"), "-o", str(tmp_path / "o"),
                 "--exporter", "legacy"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["passed"]
    assert main(["convert", "onnx", str(tmp_path / "src"), "-o", str(tmp_path / "o2"),
                 "--opset", "5"]) == 2
    assert "opset=5 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "src", "v", "v2"]


def test_cli_convert_native(tmp_path):
    model = tiny_pruned("qwen2")
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", "native", str(tmp_path / "src"), "-o", str(tmp_path / "n")]) == 0
    ids = torch.tensor([[4, 5, 6]])
    torch.testing.assert_close(_logits(load_model(tmp_path / "n"), ids), _logits(model, ids))


@pytest.mark.parametrize("fmt", ["onnx", "vllm"])
def test_cli_refuses_an_unsupported_family_without_output(tmp_path, capsys, fmt):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    assert main(["convert", fmt, str(src), "-o", str(tmp_path / "out")]) == 2
    assert "model_type='bert' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
