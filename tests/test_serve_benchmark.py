"""`ecospa bench serve`: vLLM's serving-benchmark conventions, against a real server process."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from ecospa_deploy.cli import main as cli
from ecospa_deploy.serve.benchmark import (Outcome, arrival_gaps, burst_requests, percentile,
                                           random_requests, summarize)
from ecospa_deploy.serve.process import ServerProcess
from ecospa_deploy.testing import tiny_pruned, tiny_tokenizer


def test_percentiles_interpolate_like_numpy():
    np = pytest.importorskip("numpy")
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))


def test_arrivals_are_poisson_at_the_rate_and_all_at_once_at_inf():
    assert arrival_gaps(5, math.inf) == [0.0] * 5
    gaps = arrival_gaps(20_000, 4.0, seed=1)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    # exponential: the standard deviation equals the mean; burstiness 4 makes it half of it
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)
    smooth = arrival_gaps(20_000, 4.0, burstiness=4.0, seed=1)
    assert statistics.stdev(smooth) == pytest.approx(0.125, rel=0.05)
    assert arrival_gaps(50, 2.0, seed=3) == arrival_gaps(50, 2.0, seed=3)
    with pytest.raises(ValueError):
        arrival_gaps(3, 0.0)


def test_datasets_follow_their_lengths():
    reqs = random_requests(200, 100, 20, 0.5, vocab=50, seed=0)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in reqs)
    assert all(len(r.prompt) == r.prompt_len and max(r.prompt) < 50 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 50
    fixed = random_requests(10, 64, 8, 0.0, vocab=50)
    assert {r.prompt_len for r in fixed} == {64} and {r.output_len for r in fixed} == {8}
    burst = burst_requests(12, 10, 40, [3, 6], vocab=50)
    assert len({r.prompt_len for r in burst}) == 12 and [r.output_len for r in burst[:3]] == [3, 6, 3]


def test_metrics_follow_vllm_definitions():
    a = Outcome(ok=True, prompt_len=10, output_tokens=5, ttft=0.1, e2el=0.5,
                itl=[0.1, 0.1, 0.1, 0.1], start=0.0)
    b = Outcome(ok=True, prompt_len=30, output_tokens=1, ttft=0.2, e2el=0.2, start=0.3)
    bad = Outcome(error="HTTP 500")
    m = summarize([a, b, bad], duration=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (40, 6)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0
    assert m["total_token_throughput"] == 23.0
    assert m["mean_tpot_ms"] == pytest.approx(100.0)   # (0.5 - 0.1) / 4; b has one token
    assert m["median_ttft_ms"] == pytest.approx(150.0) and m["p99_e2el_ms"] > 490
    assert m["max_in_flight"] == 2 and m["errors"] == ["HTTP 500"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-serve") / "tiny"
    tiny_pruned("llama", seed=3).save_pretrained(path)
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    tok.save_pretrained(path)
    with ServerProcess(path, "--backend", "hf", "--max-batch-size", "4") as srv:
        yield srv, path


def test_random_set_and_a_rate_sweep_against_a_server(server, tmp_path, capsys):
    srv, _ = server
    out = tmp_path / "r.json"
    rc = cli(["bench", "serve", "--base-url", srv.url, "--dataset-name", "random",
              "--num-prompts", "8", "--random-input-len", "12", "--random-output-len", "5",
              "--vocab", "60", "--request-rate", "inf,40", "--max-concurrency", "3",
              "--warmup-prompts", "1", "--result-file", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [r["request_rate"] for r in doc["runs"]] == ["inf", 40.0]
    for run in doc["runs"]:
        assert run["completed"] == 8 and run["failed"] == 0
        assert run["total_input_tokens"] == 8 * 12
        assert run["total_output_tokens"] == 8 * 5          # ignore_eos, usage reported
        assert run["max_in_flight"] <= 3                     # the concurrency cap held
        assert 0 < run["median_ttft_ms"] <= run["median_e2el_ms"]
        assert run["median_tpot_ms"] > 0 and run["p99_itl_ms"] >= run["median_itl_ms"] > 0
    assert "rate inf: 8/8 ok" in capsys.readouterr().out


def test_chat_endpoint_with_text_prompts(server, tmp_path):
    srv, path = server
    out = tmp_path / "c.json"
    rc = cli(["bench", "serve", "--base-url", srv.url, "--endpoint", "/v1/chat/completions",
              "--dataset-name", "burst", "--num-prompts", "4", "--burst-prompt-lens", "4:20",
              "--burst-output-lens", "3,6", "--vocab", "60", "--tokenizer", str(path),
              "--warmup-prompts", "0", "--result-file", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    assert rc == 0 and run["completed"] == 4 and run["total_output_tokens"] == 3 + 6 + 3 + 6


def test_a_refused_request_is_a_failure_with_the_servers_status_and_message(server, tmp_path):
    srv, _ = server
    out = tmp_path / "m.json"
    rc = cli(["bench", "serve", "--base-url", srv.url, "--model", "no-such-model",
              "--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2",
              "--vocab", "60", "--warmup-prompts", "0", "--result-file", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    assert rc == 1 and run["completed"] == 0 and run["failed"] == 2
    assert run["errors"][0].startswith("HTTP 404: ") and "no-such-model" in run["errors"][0]


def test_a_dead_server_is_a_failed_run_not_a_crash(tmp_path):
    out = tmp_path / "d.json"
    rc = cli(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "2",
              "--random-input-len", "4", "--random-output-len", "2", "--warmup-prompts", "0",
              "--timeout", "5", "--result-file", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    assert rc == 1 and run["failed"] == 2 and "ConnectorError" in run["errors"][0]


def test_batch_size_stats_count_the_load_alone():
    """The server's counters run over its life; with the text from before the load, the
    warm-up's and earlier loads' steps drop out."""
    from ecospa_deploy.serve.loadtest import batch_size_stats

    def text(count, total, single):
        return (f'ecospa_batch_size_bucket{{le="1.0"}} {single}\n'
                f"ecospa_batch_size_sum {total}\necospa_batch_size_count {count}\n")

    before, after = text(150, 4600, 6), text(294, 9200, 10)
    assert batch_size_stats(after) == {"steps": 294, "mean": 31.29,
                                       "steps_with_more_than_one": 284}
    assert batch_size_stats(after, before) == {"steps": 144, "mean": 31.94,
                                               "steps_with_more_than_one": 140}
    prefill = after.replace("ecospa_batch_size", "ecospa_prefill_batch_size")
    assert batch_size_stats(after + prefill, name="ecospa_prefill_batch_size") == \
        batch_size_stats(after)
    assert batch_size_stats(after, name="ecospa_prefill_batch_size")["steps"] == 0


def test_server_ttft_mean_is_the_loads_histogram_mean():
    from ecospa_deploy.serve.loadtest import server_ttft_mean_ms

    def text(count, total):
        return (f"ecospa_time_to_first_token_seconds_sum {total}\n"
                f"ecospa_time_to_first_token_seconds_count {count}\n")

    assert server_ttft_mean_ms(text(64, 12.8), text(0, 0)) == 200.0
    assert server_ttft_mean_ms(text(80, 13.6), text(16, 0.8)) == 200.0   # warm-up left out
    assert math.isnan(server_ttft_mean_ms(text(4, 1.0), text(4, 1.0)))
