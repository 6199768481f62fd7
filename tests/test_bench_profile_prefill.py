"""bench/profile_prefill: a packed prefill's call, device time, floor and kernel split (CPU)."""

from __future__ import annotations

import json

from ecospa_deploy.bench.profile_prefill import kind, main
from ecospa_deploy.testing import tiny_shape


def test_kernel_names_fall_into_their_kind():
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == \
        "attention"
    assert kind("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention"
    assert kind("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>") == "other"
    assert kind("aten::addmm") == "gemm" and kind("aten::mul") == "other"


def test_rows_for_both_twins_on_the_cpu(tmp_path):
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(tiny_shape(16)))
    out = tmp_path / "prefill.json"
    assert main(["--shape", str(shape), "--tokens", "64", "200", "--prompt-len", "16",
                 "--max-seq-len", "64", "--max-batch-size", "16", "--iters", "2",
                 "--device", "cpu", "--dtype", "float32", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["model"], r["tokens"], r["prompts"]) for r in rows] == [
        ("dense", 64, 4), ("dense", 192, 12), ("pruned", 64, 4), ("pruned", 192, 12)]
    for r in rows:
        assert r["call_ms"] > 0 and r["replay_ms"] > 0 and 0 < r["floor_ms"]
        assert set(r["kernels_ms"]) == {"gemm", "attention", "other"}
        assert r["kernels_ms"]["gemm"] > 0 and r["kernels_ms"]["attention"] > 0
    # the pruned twin computes less: its floor is lower at the same tokens
    assert rows[2]["floor_ms"] < rows[0]["floor_ms"]
