"""`ecospa bench` on CPU: valid JSON/markdown/PNG for a tiny shape; clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ecospa_deploy.cli import main
from ecospa_deploy.testing import tiny_shape

TINY = tiny_shape(16)


def test_bench_tiny_shape_writes_json_markdown_png(tmp_path, capsys):
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    rc = main(["bench", "--shape", str(shape), "--device", "cpu", "--dtype", "float32",
               "--batch-sizes", "1,2", "--prompt-lens", "8", "--gen-len", "4",
               "--hf-gen-len", "3", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {(r["model"], r["backend"], r["batch"]) for r in rows} == {
        (m, b, n) for m in ("dense", "pruned") for b in ("hf", "engine") for n in (1, 2)}
    engine = [r for r in rows if r["backend"] == "engine"]
    for r in engine:
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["decode_pct_floor"] > 0
        assert r["decode_floor_ms"] > 0 and r["prefill_floor_ms"] > 0
    for r in rows:      # first-seen TTFT and the spread over the repeated runs
        assert r["repeats"] == 3 and r["ttft_first_ms"] > 0
        assert 0 < r["ttft_min_ms"] <= r["ttft_ms"]
        assert r["backend"] == "hf" or 0 < r["tpot_min_ms"] <= r["tpot_ms"]
    printed = capsys.readouterr().out
    assert "TTFT first-seen ms" in printed and printed.count("indicative only") == 1
    assert result["note"].startswith("CPU run")
    md = (out / "results.md").read_text()
    assert "TTFT first-seen ms" in md                   # the file has what the terminal shows
    assert "matmul 0 TFLOP/s" not in md and "GFLOP/s" in md   # a CPU's rate, in its unit
    for text in (printed, md):      # the caveat comes before the figures it qualifies
        assert text.index("indicative only") < text.index("| model | backend |")
    from ecospa_deploy.benchmark.report import markdown

    assert "indicative" not in markdown({**result, "note": None})     # a GPU run has no note
    dense, pruned = (next(r for r in engine if r["model"] == m and r["batch"] == 1)
                     for m in ("dense", "pruned"))
    assert pruned["params"] < dense["params"]
    assert pruned["kv_bytes_per_token"] < dense["kv_bytes_per_token"]
    ratios = {(r["backend"], r["batch"]): r for r in result["ratios"]}
    assert ratios[("engine", 1)]["params"] == pytest.approx(pruned["params"] / dense["params"])
    assert "| pruned | engine | 2 | 8 |" in md and "Pruned / dense" in md
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["complete"] is True


def _tiny_shape(tmp_path):
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY))
    return str(shape)


def test_bench_onnx_backend_runs_the_verified_export(tmp_path):
    out = tmp_path / "out"
    rc = main(["bench", "--shape", _tiny_shape(tmp_path), "--device", "cpu", "--dtype",
               "float32", "--backends", "engine,onnx", "--batch-sizes", "2",
               "--prompt-lens", "6", "--gen-len", "5", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    onnx = {r["model"]: r for r in result["rows"] if r["backend"] == "onnx"}
    assert set(onnx) == {"dense", "pruned"}
    for r in onnx.values():
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["gen_len"] == 5
    assert onnx["pruned"]["params"] < onnx["dense"]["params"]
    assert any(r["backend"] == "onnx" for r in result["ratios"])


def test_bench_onnx_backend_refuses_bfloat16(tmp_path, capsys):
    rc = main(["bench", "--shape", _tiny_shape(tmp_path), "--device", "cpu", "--dtype",
               "bfloat16", "--backends", "onnx", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "float32 or float16" in capsys.readouterr().err


def test_a_failing_run_keeps_the_rows_measured_before_it(tmp_path, monkeypatch, capsys):
    from ecospa_deploy.benchmark import shapes

    real = shapes.build_model

    def build(shape, pruned, *args, **kwargs):
        if pruned:
            raise MemoryError("out of memory building the pruned twin")
        return real(shape, pruned, *args, **kwargs)

    monkeypatch.setattr(shapes, "build_model", build)
    out = tmp_path / "out"
    with pytest.raises(MemoryError):
        main(["bench", "--shape", _tiny_shape(tmp_path), "--device", "cpu", "--dtype",
              "float32", "--backends", "engine", "--batch-sizes", "1,2", "--prompt-lens", "6",
              "--gen-len", "3", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert result["complete"] is False
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [("dense", 1), ("dense", 2)]
    assert "| dense | engine | 2 | 6 |" in (out / "results.md").read_text()


def test_unknown_shape_is_a_clear_error(capsys):
    assert main(["bench", "--shape", "llama-13x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "llama-13x" in err and "llama-1b" in err and "gpt2-medium" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert main(["bench", "--shape", "gpt2-small", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unknown_backend_and_missing_models(capsys):
    assert main(["bench", "--shape", "gpt2-small", "--backends", "hf,trt"]) == 2
    assert "trt" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu"]) == 2
    assert "--shape" in capsys.readouterr().err


def test_vocab_mismatch_is_a_clear_error(tmp_path, capsys):
    from ecospa_deploy.testing import tiny_dense, tiny_pruned

    tiny_dense("llama").save_pretrained(tmp_path / "dense")
    tiny_pruned("llama", vocab_size=120).save_pretrained(tmp_path / "pruned")
    rc = main(["bench", "--dense", str(tmp_path / "dense"), "--pruned", str(tmp_path / "pruned"),
               "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "vocab_size=120" in err and "96" in err
