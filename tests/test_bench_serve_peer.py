"""bench/serve_peer: `transformers serve` (continuous batching) gets serve_gpu's burst through
`ecospa bench serve`'s client, on the shape's dense model as its stock class."""

from __future__ import annotations

import json

import pytest

from ecospa_deploy.bench import serve_peer

TINY = {"name": "tiny", "family": "llama",
        "dense": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
                  "vocab_size": 300, "max_position_embeddings": 512, "rope_theta": 10000.0,
                  "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}}


def _args(tmp_path) -> list[str]:
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY))
    return ["--shape", str(shape), "--device", "cpu", "--requests", "4", "--prompt-lens", "4:12",
            "--max-tokens-mix", "2,3", "--startup-timeout", "300", "--out", str(tmp_path)]


def test_the_peer_serves_the_burst(tmp_path):
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve's extra is not installed")
    assert serve_peer.main(_args(tmp_path)) == 0
    doc = json.loads((tmp_path / "serve_peer_tiny.json").read_text())
    assert doc["server_start_s"] > 0
    for run in (doc["first_burst"], doc["runs"][0]):
        assert run["load"] == "burst" and run["completed"] == 4 and run["failed"] == 0
        # the text of each prompt is as many tokens as its ids: 4 distinct lengths in 4..12
        assert run["total_input_tokens"] == 4 + 6 + 9 + 12
        assert 0 < run["total_output_tokens"] <= 2 + 3 + 2 + 3   # its usage; EOS may end one
        assert run["median_ttft_ms"] > 0


def test_without_the_peers_extra_it_says_so(tmp_path, monkeypatch, capsys):
    import transformers.utils.import_utils as iu

    monkeypatch.setattr(iu, "is_serve_available", lambda: False)
    assert serve_peer.main(_args(tmp_path)) == 2
    assert "pip install 'transformers[serving]'" in capsys.readouterr().err


def test_the_load_plan_is_one_request_set_at_once_then_at_each_rate():
    import argparse
    import math

    from ecospa_deploy.bench.serve_gpu import load_plan

    plan = load_plan(argparse.Namespace(requests=3, rates="16,32"), vocab=50)
    assert [rate for _, rate in plan] == [math.inf, 16.0, 32.0]
    reqs = plan[0][0]
    assert len(reqs) == 6 and all(r.prompt_len == 1024 and r.output_len == 128 for r in reqs)
    assert all(p is reqs for p, _ in plan)
