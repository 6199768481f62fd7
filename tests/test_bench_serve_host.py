"""bench/serve_host.py: the HTTP side over a backend that costs nothing, or a fixed step."""

import json

from ecospa_deploy.bench.serve_host import main, step_share


def test_step_share_against_the_ideal_burst():
    # 64 streams at 4 ms a step: ideal 16 000 tok/s; served 12 800 is 5 ms a step
    share = step_share(12_800.0, 64, 4.0)
    assert share == {"ideal_output_tokens_per_s": 16_000.0, "of_ideal": 0.8,
                     "host_ms_per_step": 1.0}


def test_a_fixed_step_serves_below_its_ideal(tmp_path):
    assert main(["--requests", "8", "--max-tokens", "16", "--repeats", "1", "--step-ms", "5",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serve_host.json").read_text())
    assert result["step_ms"] == 5.0 and result["ideal_output_tokens_per_s"] == 1600.0
    # a step cannot be served faster than it sleeps; the host adds its share on top
    assert 0 < result["of_ideal"] < 1 and result["host_ms_per_step"] > 0
    assert result["runs"][0]["output_tokens"] == 8 * 16
