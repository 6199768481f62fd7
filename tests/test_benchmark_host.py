"""benchmark/host.py: the facts a serving result keeps about the host it ran on."""

import json

from ecospa_deploy.benchmark import host
from ecospa_deploy.bench.serve_host import main as serve_host_main

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu MHz\t\t: 2000.000

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""


def test_cpu_model_is_read_from_cpuinfo():
    assert host.cpu_model(CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+"


def test_cpu_model_without_a_model_line_falls_back_to_platform(monkeypatch):
    monkeypatch.setattr(host.platform, "processor", lambda: "")
    monkeypatch.setattr(host.platform, "machine", lambda: "aarch64")
    assert host.cpu_model("processor\t: 0\nBogoMIPS\t: 50.00\n") == "aarch64"


def test_the_probe_does_the_per_token_work_it_names():
    # one round frames one SSE chunk: "data: " + its JSON + a blank line
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1,
             "choices": [{"index": 0, "text": " tok", "finish_reason": None}]}
    one = len("data: " + json.dumps(chunk) + "\n\n")
    assert host._chunk_work(1) == one
    # round i frames index i & 63: one byte more for each digit past the first
    assert host._chunk_work(100) == 100 * one + sum(len(str(i & 63)) - 1 for i in range(100))


def test_host_facts_probe_only_when_asked(monkeypatch):
    monkeypatch.setattr(host, "python_probe_ms", lambda: 12.5)
    facts = host.host_facts()
    assert facts["python_probe_ms"] == 12.5
    assert facts["cores"] >= 1 and facts["cpu_count"] >= facts["cores"]
    assert len(facts["load_average_1m_5m_15m"]) == 3 and facts["cpu"]
    assert "python_probe_ms" not in host.host_facts(probe=False)


def test_python_probe_ms_times_the_work(monkeypatch):
    ticks = iter([0.0, 0.030, 1.0, 1.020, 2.0, 2.025])     # three repeats: 30, 20, 25 ms
    monkeypatch.setattr(host.time, "perf_counter", lambda: next(ticks))
    assert host.python_probe_ms(rounds=10, repeats=3) == 20.0


def test_serve_host_records_its_host(tmp_path):
    assert serve_host_main(["--requests", "2", "--max-tokens", "2", "--repeats", "1",
                            "--out", str(tmp_path)]) == 0
    facts = json.loads((tmp_path / "serve_host.json").read_text())["host"]
    assert facts["cpu"] == host.cpu_model() and facts["python_probe_ms"] > 0
