"""`--backend vllm` planning without vLLM: the command line (dtype, KV pool sized from the model),
device/dtype resolution, conversion refusals as start errors, and auto's fallback choice."""

from __future__ import annotations

import pytest

from ecospa_deploy.converters.vllm.convert import convert_vllm
from ecospa_deploy.serve import vllm_backend
from ecospa_deploy.serve.backend import fallback_after_vllm
from ecospa_deploy.serve.server import ServeOptions
from ecospa_deploy.testing import tiny_pruned, tiny_tokenizer


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "out"
    conv = convert_vllm(tiny_pruned("llama", 0), out, attention_backend="cpu")
    return out, conv


def test_kv_pool_is_sized_from_the_padded_model(converted):
    out, conv = converted
    per_token = conv.plan.kv_elements_per_token_after * 4           # float32
    want = per_token * (2 + 1) * 128 * 3                           # 200 tokens -> 2 blocks + 1
    assert vllm_backend.kv_cache_bytes(out, 200, 3, "float32") == max(want, 16 << 20)
    big = vllm_backend.kv_cache_bytes(out, 100_000, 64, "float32")
    assert big == per_token * (782 + 1) * 128 * 64 > 16 << 20


def test_command_passes_dtype_length_and_kv_pool(converted):
    out, _ = converted
    opts = ServeOptions(str(out), port=8123, max_batch_size=4, api_key="k")
    cmd = vllm_backend.command(opts, "m", out, "float32", 256)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--dtype"] == "float32" and flags["--max-model-len"] == "256"
    assert flags["--max-num-seqs"] == "4" and flags["--api-key"] == "k"
    assert int(flags["--kv-cache-memory-bytes"]) == vllm_backend.kv_cache_bytes(out, 256, 4,
                                                                                 "float32")
    custom = ServeOptions(str(out), vllm_args="--gpu-memory-utilization 0.5")
    cmd = vllm_backend.command(custom, "m", out, "bfloat16", 128)
    assert "--kv-cache-memory-bytes" not in cmd and cmd[-2:] == ["--gpu-memory-utilization", "0.5"]


def test_device_and_dtype_resolution(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_platform", lambda: "cpu")
    assert vllm_backend.resolve("auto", "auto") == ("cpu", "float32")
    assert vllm_backend.resolve("cpu", "bfloat16") == ("cpu", "bfloat16")
    with pytest.raises(vllm_backend.VLLMStartError, match="--device cuda: the installed vLLM "
                                                          "runs on cpu only"):
        vllm_backend.resolve("cuda", "auto")
    with pytest.raises(vllm_backend.VLLMStartError, match="--dtype 'int8'"):
        vllm_backend.resolve("auto", "int8")
    monkeypatch.setattr(vllm_backend, "vllm_platform", lambda: "cuda")
    assert vllm_backend.resolve("cuda:0", "auto") == ("cuda", "bfloat16")


def test_conversion_refusal_is_a_start_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    tiny_pruned("gpt2", 0).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    with pytest.raises(vllm_backend.VLLMStartError,
                       match="ecospa convert vllm refused the model: attention backend 'nope'"):
        vllm_backend.ready_dir(str(src), "nope")
    assert not list((tmp_path / "cache").rglob("config.json"))


def test_fallback_after_vllm_prefers_the_engine():
    choice = fallback_after_vllm()
    assert choice.name == "engine" and "vllm could not start" in choice.reason
