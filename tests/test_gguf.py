"""GGUF files as input: a tiny Llama written here with the gguf package's writer, the way
llama.cpp's converter writes one (q/k rows permuted for its rope layout, f32 tensors, a
byte-level BPE tokenizer and a chat template in the metadata), must load with the logits and
token ids of its source; unsupported, corrupt and truncated files fail in one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ecospa_deploy.errors import CheckpointError
from ecospa_deploy.loading import convert_native, load_model, load_tokenizer
from ecospa_deploy.testing import tiny_hf, tiny_tokenizer

gguf = pytest.importorskip("gguf", reason="the optional 'gguf' extra is not installed")

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}")
TEXTS = ["To be, or not to be", "  the slings\tand arrows\n", "</s>nobler<s> in the mind", ""]
ROPE_THETA = 100000.0


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: HF's rotate-half rows -> interleaved rope pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_llama_gguf(path: Path, model, tokenizer=None, architecture: str = "llama",
                     **extra_metadata) -> Path:
    """``model`` (a stock LlamaForCausalLM) as llama.cpp's converter writes it, in float32."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in extra_metadata.items():
        writer.add_uint32(key, value)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy().copy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def tiny_llama(tied: bool = False):
    return tiny_hf("llama", seed=3, tie_word_embeddings=tied,
                   rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})


@pytest.fixture(scope="module")
def source():
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, source) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return write_llama_gguf(path, source, tiny_tokenizer())


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 17, 42, 9, 77, 3, 60, 2, 11]])


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_with_the_source_logits(tmp_path, tied):
    src = tiny_llama(tied)
    path = write_llama_gguf(tmp_path / "m.gguf", src)
    model = load_model(path)
    assert type(model).__name__ == "EcospaLlamaForCausalLM"
    assert model.config.head_dim == src.config.head_dim != 64 // 8   # head_dim apart from h/n
    torch.testing.assert_close(logits(model, IDS), logits(src, IDS), atol=1e-5, rtol=0)
    prov = model.config.ecospa_spec.provenance
    assert prov["source_format"] == "gguf" and prov["gguf_tensor_types"] == ["F32"]
    assert len(prov["gguf_sha256"]) == 64


def test_convert_native_round_trip(tmp_path, source, tiny_gguf):
    out = convert_native(tiny_gguf, tmp_path / "native")
    reloaded = load_model(out)
    torch.testing.assert_close(logits(reloaded, IDS), logits(source, IDS), atol=1e-5, rtol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "ecospa_llama"
    assert cfg["ecospa"]["provenance"]["source"] == str(tiny_gguf)
    tok = load_tokenizer(out)
    assert tok.chat_template == CHAT_TEMPLATE


def test_tokenizer_keeps_ids_specials_and_chat_template(tmp_path, tiny_gguf):
    ref = tiny_tokenizer()
    tok = load_tokenizer(tiny_gguf)
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.chat_template == CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    messages = [{"role": "user", "content": "To be?"}, {"role": "assistant", "content": "Not."}]
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"], text
    for kwargs in (dict(tokenize=False), dict(tokenize=True, return_dict=False)):
        assert (again.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
                == tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
    assert again.special_tokens_map == tok.special_tokens_map


def test_other_architectures_are_refused_in_one_line(tmp_path):
    path = write_llama_gguf(tmp_path / "falcon.gguf", tiny_llama(), architecture="falcon")
    with pytest.raises(CheckpointError, match=r"GGUF architecture 'falcon' is not supported; "
                                              r"expected one of \['llama'\]") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_metadata_the_loader_would_drop_is_refused(tmp_path):
    path = write_llama_gguf(tmp_path / "moe.gguf", tiny_llama(), **{"llama.expert_count": 4})
    with pytest.raises(CheckpointError, match="llama.expert_count=4: mixture of experts"):
        load_model(path)


@pytest.mark.parametrize("cut, message", [(4, "not a GGUF file"),
                                          (200, "corrupt GGUF header at byte"),
                                          (-100, "ends at byte .* \\(truncated\\?\\)")])
def test_corrupt_and_truncated_files_fail_clearly(tmp_path, tiny_gguf, cut, message):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + data[4:] if cut == 4 else data[:cut])
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_a_gguf_is_recognised_by_its_magic_not_only_its_name(tmp_path, tiny_gguf, source):
    renamed = tmp_path / "model.bin"   # a pickle suffix: the magic decides
    renamed.write_bytes(tiny_gguf.read_bytes())
    model = load_model(renamed, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(logits(model, IDS), logits(source, IDS), atol=1e-5, rtol=0)


def test_cli_convert_native(tmp_path, tiny_gguf):
    from ecospa_deploy.cli import main

    out = tmp_path / "native"
    assert main(["convert", "native", str(tiny_gguf), "-o", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_cli_inspect_reports_the_gguf(capsys, tiny_gguf, source):
    from ecospa_deploy.cli import main

    assert main(["inspect", str(tiny_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"].startswith("gguf") and info["checkpoint_dtypes"] == ["F32"]
    assert info["totals"]["params"] == sum(p.numel() for p in source.parameters())
    assert info["num_layers"] == source.config.num_hidden_layers


def test_without_the_gguf_package_the_error_names_the_extra(tiny_gguf):
    # A fresh interpreter in which ``import gguf`` fails (a None entry in sys.modules is
    # Python's own "not importable" marker; find_spec then reports it missing). gguf_input is
    # called directly: it answers before torch is imported, which keeps this test fast.
    code = ("import sys; sys.modules['gguf'] = None\n"
            "from ecospa_deploy.gguf_input import load_model\n"
            f"load_model({str(tiny_gguf)!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "MissingExtraError" in last and "optional 'gguf' dependencies" in last, last
    assert "ecospa-deploy[gguf]" in last
    assert "torch" not in res.stderr


def test_random_header_damage_is_a_checkpoint_error_or_harmless(tiny_gguf, tmp_path):
    """Flipped bytes anywhere in the header: the checks that run before transformers either
    pass or raise CheckpointError, never another exception."""
    from ecospa_deploy.gguf_input import check_supported, tensor_types

    data = bytearray(tiny_gguf.read_bytes())
    header_end = min(t.offset for t in check_supported(tiny_gguf).tensors.values())
    rng = np.random.default_rng(0)
    bad = tmp_path / "damaged.gguf"
    for _ in range(300):
        damaged = bytearray(data)
        for pos in rng.integers(4, header_end, size=3):
            damaged[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(damaged))
        try:
            tensor_types(check_supported(bad))
        except CheckpointError as exc:
            assert "\n" not in str(exc)


def test_the_gguf_extra_is_declared_and_part_of_dev():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["gguf"] == ["gguf>=0.10"]
    assert any(dep.startswith("ecospa-deploy[") and "gguf" in dep for dep in extras["dev"])
