"""bench/client_overhead: the three clients stream the same burst and each gets a TTFT."""

from __future__ import annotations

import json

from ecospa_deploy.bench.client_overhead import main


def test_every_client_measures_the_burst(tmp_path):
    assert main(["--requests", "4", "--repeats", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "client_overhead.json").read_text())
    assert set(doc["runs"]) == {"httpx", "aiohttp", "bare"}
    for runs in doc["runs"].values():
        assert len(runs) == 2 and all(0 < t < 10_000 for t in runs)
    assert doc["median_ttft_mean_ms"]["bare"] in doc["runs"]["bare"]
