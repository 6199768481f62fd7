"""``ecospa convert gguf``: pruned models with per-layer heads, KV heads, q/k dim != v dim and FFN
widths run in llama.cpp (llama-cpp-python) with our logits and greedy tokens; what llama.cpp
cannot compute is refused before a file exists; the check itself fails on a wrong layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ecospa_deploy.errors import UnsupportedError, UsageError
from ecospa_deploy.testing import tiny_chat_tokenizer, tiny_dense, tiny_pruned, tiny_tokenizer

gguf = pytest.importorskip("gguf", reason="the optional 'gguf' extra is not installed")

from ecospa_deploy.converters.gguf import convert_gguf  # noqa: E402
from ecospa_deploy.converters.gguf import tensors as gguf_tensors  # noqa: E402
from ecospa_deploy.converters.gguf.write import write_gguf  # noqa: E402

needs_llama_cpp = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python (the 'llamacpp' extra) is not installed")


def _fields(path):
    reader = gguf.GGUFReader(str(path))

    def value(key):
        f = reader.fields[key]
        if len(f.data) == 1 and f.types[0] != gguf.GGUFValueType.ARRAY:
            part = f.parts[f.data[0]]
            return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else part[0]
        return [f.parts[i][0] for i in f.data]
    return reader, value


@needs_llama_cpp
@pytest.mark.parametrize("stock, kw", [("llama", {}),                       # GQA, llama3 rope
                                       ("qwen2", {}),                       # q/k/v biases
                                       ("llama", {"tie_word_embeddings": True})])
@pytest.mark.parametrize("seed", [0, 1])
def test_f32_is_exact_in_llama_cpp(tmp_path, stock, kw, seed):
    model = tiny_pruned(stock, seed=seed, **kw)
    spec = model.config.ecospa_spec
    assert len({(l.num_attention_heads, l.num_key_value_heads, l.qk_head_dim, l.v_head_dim,
                 l.intermediate_size) for l in spec.layers}) > 1    # heterogeneous layers
    tok = tiny_tokenizer(model.config.vocab_size)
    report = convert_gguf(model, tmp_path / "m.gguf", tokenizer=tok, outtype="f32")
    v = report.verify
    assert v["ok"] and v["greedy_equal"] and v["tokenizer_equal"], v
    assert v["logit_err"] < 1e-5, v
    _, value = _fields(report.path)
    assert value("general.architecture") == "deci"
    assert value("deci.attention.head_count") == [l.num_attention_heads for l in spec.layers]
    assert value("deci.attention.head_count_kv") == [l.num_key_value_heads for l in spec.layers]
    assert value("deci.feed_forward_length") == [l.intermediate_size for l in spec.layers]


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_half_types_within_their_bound(tmp_path, outtype):
    model = tiny_pruned("llama", seed=3)
    tok = tiny_tokenizer(model.config.vocab_size)
    v = convert_gguf(model, tmp_path / "m.gguf", tokenizer=tok, outtype=outtype).verify
    assert v["ok"] and v["logit_err"] <= v["bound"] and v["greedy_within_bound"], v


@needs_llama_cpp
def test_wrong_rope_placement_is_caught(tmp_path, monkeypatch):
    """Kept pairs packed at the front (the engine's layout) instead of at their frequency's
    slot rotate at the wrong frequencies: the check must fail and remove the file."""
    def packed(t, heads, kept, qk, d):
        if t is None:
            return None
        src = t.reshape(heads, qk, *t.shape[1:])
        out = src.new_zeros(heads, d, *t.shape[1:])
        m = qk // 2
        out[:, 0:2 * m:2], out[:, 1:2 * m:2] = src[:, :m], src[:, m:]
        return out.reshape(heads * d, *t.shape[1:])

    monkeypatch.setattr(gguf_tensors, "rope_slots", packed)
    model = tiny_pruned("llama", seed=0)
    tok = tiny_tokenizer(model.config.vocab_size)
    with pytest.raises(UnsupportedError, match="does not reproduce"):
        convert_gguf(model, tmp_path / "m.gguf", tokenizer=tok, outtype="f32")
    assert not (tmp_path / "m.gguf").exists()


@needs_llama_cpp
def test_q8_0_with_aligned_ffn_quantizes_every_matrix(tmp_path):
    model = tiny_pruned("llama", seed=2, hidden_size=64)
    tok = tiny_tokenizer(model.config.vocab_size)
    f16 = write_gguf(model, tmp_path / "f16.gguf", tokenizer=tok, outtype="f16")
    raw = write_gguf(model, tmp_path / "raw.gguf", tokenizer=tok, outtype="q8_0")
    assert any("ffn_down" in n for n in raw.f16_fallback)     # FFN widths not multiples of 32
    q8 = convert_gguf(model, tmp_path / "q8.gguf", tokenizer=tok, outtype="q8_0",
                      ffn_multiple=32)
    assert not [n for n in q8.f16_fallback if "ffn" in n]
    assert q8.padding.ffn_padded > q8.padding.ffn_pruned
    assert q8.bytes < f16.bytes
    assert q8.verify["tokenizer_equal"] and q8.verify["logit_err"] < 0.2


def test_refusals_come_before_any_file(tmp_path):
    out = tmp_path / "m.gguf"
    tok = tiny_tokenizer()
    cases = [(tiny_pruned("mistral", seed=0), "sliding-window"),
             (tiny_dense("gpt2"), "learned position"),
             (tiny_pruned("qwen3", seed=0), "q/k norms")]
    for model, why in cases:
        with pytest.raises(UnsupportedError, match=why) as info:
            write_gguf(model, out, tokenizer=tok)
        assert "\n" not in str(info.value)
        assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match="tokenizer"):
        write_gguf(tiny_pruned("llama"), out, tokenizer=None)
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists"):
        write_gguf(tiny_pruned("llama"), out, tokenizer=tok)
    assert out.read_bytes() == b"keep me"


def test_chat_template_and_special_tokens_travel(tmp_path):
    model = tiny_pruned("llama", seed=1)
    tok = tiny_chat_tokenizer(model.config.vocab_size)
    report = write_gguf(model, tmp_path / "m.gguf", tokenizer=tok, outtype="f32")
    _, value = _fields(report.path)
    assert value("tokenizer.chat_template") == tok.chat_template
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert value("tokenizer.ggml.pre") == "gpt-2"
    assert len(value("tokenizer.ggml.tokens")) == model.config.vocab_size


def test_padding_cost_counts_what_pruning_saved():
    from ecospa_deploy.converters.gguf.plan import plan

    model = tiny_pruned("llama", seed=0)
    spec = model.config.ecospa_spec
    p = plan(spec, model.config, "silu", model.model.rotary_emb, ffn_multiple=64)
    h, d = spec.hidden_size, spec.dense.head_dim
    assert p.cost.attn_padded == sum(2 * h * d * (l.num_attention_heads + l.num_key_value_heads)
                                     for l in spec.layers)
    assert p.cost.attn_pruned == sum(h * (l.q_width + l.k_width + l.v_width + l.o_width)
                                     for l in spec.layers)
    assert all(lp.n_ff % 64 == 0 and lp.n_ff >= lp.n_ff_kept for lp in p.layers)


@needs_llama_cpp
def test_cli_writes_a_verified_file(tmp_path):
    model = tiny_pruned("llama", seed=4)
    tok = tiny_chat_tokenizer(model.config.vocab_size)
    src = tmp_path / "pruned"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "pruned.gguf"
    cmd = [sys.executable, "-m", "ecospa_deploy.cli", "convert", "gguf", str(src), "-o",
           str(out), "--outtype", "f32"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["verify"]["ok"] and report["verify"]["greedy_equal"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    same = subprocess.run(cmd[:5] + [str(src), "-o", str(src)], capture_output=True, text=True,
                          timeout=300)
    assert same.returncode != 0 and "is the source" in same.stderr


@pytest.mark.slow
@needs_llama_cpp
def test_pruned_smollm2_in_llama_cpp(tmp_path, smollm2):
    """The real model, pruned a little (FFN and heads, per layer), through its real tokenizer
    and chat template: llama.cpp gives our greedy tokens at f32."""
    import copy

    from ecospa_deploy.prune.run import PruneOptions, prune_model
    from ecospa_deploy.prune.tracking import layer_fraction_target

    dense, tok = smollm2
    model = copy.deepcopy(dense)
    import torch

    text = "The quick brown fox jumps over the lazy dog, and 12 more came. " * 12
    windows = torch.tensor([tok(text)["input_ids"][:96]] * 4)
    prune_model(model, windows, PruneOptions(method="flap",
                                             target_size=layer_fraction_target(dense, 0.1),
                                             batch_size=4))
    spec = model.config.ecospa_spec
    assert len({l.intermediate_size for l in spec.layers}) > 1
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                     "France?"}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    report = convert_gguf(model, tmp_path / "s.gguf", tokenizer=tok, outtype="f32")
    from ecospa_deploy.converters.gguf.verify import verify_gguf

    v = verify_gguf(report.path, model, tok, "f32", prompt_ids=list(prompt), steps=12)
    assert v["ok"] and v["greedy_equal"] and v["tokenizer_equal"], v
    assert v["probes"] == 5
    from ecospa_deploy.prune.tracking import count_params

    assert report.params_written < count_params(dense)   # padding gives back less than pruning
