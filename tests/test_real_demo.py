"""The main command's build (``real_demo``) on a tiny chat model standing in for SmolLM2: what
it measures and writes, that it is idempotent, and what it refuses. The real model's
end-to-end run is tests/test_main_command.py (slow)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ecospa_deploy import real_demo
from ecospa_deploy.errors import EcospaError
from ecospa_deploy.loading import load_model, load_tokenizer
from ecospa_deploy.testing import tiny_chat_tokenizer, tiny_dense

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = dataclasses.replace(real_demo.RECIPE, method="wanda-sp", fraction=0.2, calib_samples=4,
                             seq_len=160, gen_batch=2, eval_windows=2)


@pytest.fixture
def dense(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOSPA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "dense"
    tiny_dense("llama", max_position_embeddings=512).save_pretrained(path)
    tiny_chat_tokenizer().save_pretrained(path)
    return path


def test_build_prunes_measures_and_keeps_the_chat_template(tmp_path, dense):
    out = real_demo.build(tmp_path / "demo", RECIPE, progress=False, dense=dense)
    info = json.loads((out / "demo.json").read_text())
    model = load_model(out, dtype=torch.float32)
    assert info["params_after"] == sum(p.numel() for p in model.parameters())
    assert info["params_after"] < info["params_before"]
    assert info["bytes_after"] == 4 * info["params_after"]
    assert model.config.ecospa_spec.provenance["method"] == "wanda-sp"
    assert model.config.ecospa_spec.provenance["calibration"]["source"] == "selftext"
    held = info["heldout"]
    assert held["dense"]["windows"] == held["pruned"]["windows"] == 2
    assert held["dense"]["perplexity"] != held["pruned"]["perplexity"]
    assert [a["question"] for a in info["answers"]] == list(real_demo.SHOWN_QUESTIONS)
    assert set(info["seconds"]) >= {"convert", "calibration text", "prune", "total"}
    # the chat template and special tokens travel with the model
    tok = load_tokenizer(out)
    assert tok.chat_template == tiny_chat_tokenizer().chat_template
    assert tok.eos_token == tiny_chat_tokenizer().eos_token
    text = real_demo.summary(out)
    assert f"{info['params_before']:,} -> {info['params_after']:,}" in text
    assert "Q: What is the capital of France?" in text and "dense:" in text
    assert f"{held['pruned']['perplexity']:.2f} pruned" in text


def test_a_second_build_returns_the_directory_untouched(tmp_path, dense):
    out = real_demo.build(tmp_path / "demo", RECIPE, progress=False, dense=dense)
    stamp = (out / "demo.json").stat().st_mtime_ns
    assert real_demo.build(out, RECIPE, progress=False, dense=dense) == out
    assert (out / "demo.json").stat().st_mtime_ns == stamp


def test_recovery_distils_after_pruning(tmp_path, dense):
    recipe = dataclasses.replace(RECIPE, recover_steps=2)
    out = real_demo.build(tmp_path / "demo", recipe, progress=False, dense=dense)
    info = json.loads((out / "demo.json").read_text())
    assert info["recipe"]["recover_steps"] == 2 and "recover" in info["seconds"]
    assert "+ 2 distillation steps" in real_demo.summary(out)


def test_the_tiny_demo_directory_is_not_mistaken_for_this_one(tmp_path, dense):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.json").write_text(json.dumps({"method": "ecospa"}))
    with pytest.raises(EcospaError, match="holds the tiny demo"):
        real_demo.build(tmp_path / "demo", RECIPE, progress=False, dense=dense)
