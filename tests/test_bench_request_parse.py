"""bench/request_parse.py: both paths parse the same request; the JSON it writes."""

from __future__ import annotations

import json

from ecospa_deploy.bench.request_parse import _paths, main


def test_fast_and_full_paths_accept_the_same_body():
    raw = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4, "stream": True}).encode()
    fast, full = _paths(raw)
    assert fast().prompt == [1, 2, 3] and fast().max_tokens == full().max_tokens == 4


def test_writes_a_row_per_prompt_kind_and_size(tmp_path):
    assert main(["--tokens", "64", "--repeats", "3", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "request_parse.json").read_text())
    assert {(r["prompt"], r["tokens"]) for r in out["rows"]} == \
        {(k, n) for k in ("ids", "text") for n in (16, 64, 1024)}
    assert all(r["fast_us"] > 0 and r["full_us"] > 0 for r in out["rows"])
    assert set(out["burst_ms"]) == {"fast", "full"} and out["burst_ms"]["fast"] > 0
