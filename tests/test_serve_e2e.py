"""`ecospa serve` end to end: a real server process on loopback serving a tiny pruned Llama.

Driven with the official ``openai`` client (completions, chat, streaming) and raw HTTP for the
bad inputs; greedy answers are checked token for token against the loaded model run directly.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from ecospa_deploy.loading import load_model, load_tokenizer
from ecospa_deploy.serve.backend import engine_available
from ecospa_deploy.serve.loadtest import run_load, run_stream_load, token_prompts
from ecospa_deploy.serve.process import ServerProcess
from ecospa_deploy.testing import save_tiny_served, tiny_pruned, tiny_tokenizer

KEY = "test-key-123"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["To be, or not to be", "The slings and arrows", "Whether 'tis nobler in the mind",
           "that is the question"]
BACKENDS = ["hf"] + (["engine"] if engine_available() is None else [])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "tiny-pruned"
    tiny_pruned("llama", seed=3).save_pretrained(path)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy tokens of the saved model, computed with full forward passes (no cache)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)

    @torch.no_grad()
    def greedy(prompt_ids: list[int], n: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt_ids):]

    def text(prompt: str, n: int) -> str:
        return tok.decode(greedy(tok(prompt).input_ids, n), skip_special_tokens=True)

    return greedy, text, tok


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, model_dir):
    with ServerProcess(model_dir, "--backend", request.param, "--api-key", KEY,
                       "--max-batch-size", "8") as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, body, *, key: str | None = KEY, path="/v1/completions", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, headers=headers, timeout=60, **kw,
                      **({"json": body} if not isinstance(body, (bytes, str)) else
                         {"content": body}))


# -- the openai client -----------------------------------------------------------------------
def test_banner_prints_url_and_curl(server):
    assert f"at {server.url}/v1" in server.log
    assert f"curl {server.url}/v1/completions" in server.log


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-pruned"]
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok"


def test_completion_greedy_matches_reference(client, reference):
    _, text, _ = reference
    for prompt in PROMPTS[:2]:
        out = client.completions.create(model="tiny-pruned", prompt=prompt, max_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == text(prompt, 12)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == len(reference[2](prompt).input_ids)


@pytest.mark.skipif(engine_available() is not None, reason=str(engine_available()))
def test_greedy_matches_load_model_plus_engine(client, model_dir):
    from ecospa_deploy.engine import Engine, SamplingParams

    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir), max_batch_size=4, max_seq_len=128)
    prompts = [tok(p).input_ids for p in PROMPTS]
    want = engine.generate(prompts, SamplingParams(max_new_tokens=14,
                                                   stop_token_ids=(tok.eos_token_id,)))
    out = client.completions.create(model="tiny-pruned", prompt=prompts, max_tokens=14,
                                    temperature=0)
    for choice, ids in zip(out.choices, want):
        assert choice.text == tok.decode(ids, skip_special_tokens=True)
    assert out.usage.completion_tokens == sum(len(ids) for ids in want)


def test_completion_token_ids_and_eos(client, reference):
    greedy, _, tok = reference
    ids = tok(PROMPTS[2]).input_ids
    out = client.completions.create(model="tiny-pruned", prompt=ids, max_tokens=40,
                                    temperature=0)
    want = greedy(ids, 40)
    if tok.eos_token_id in want:  # stops at EOS, which is not part of the text
        want = want[:want.index(tok.eos_token_id) + 1]
        assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(want)
    assert out.choices[0].text == tok.decode(want, skip_special_tokens=True)


def test_streaming_completion_equals_non_streaming(client, reference):
    _, text, _ = reference
    chunks = list(client.completions.create(model="tiny-pruned", prompt=PROMPTS[1], max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    body = "".join(c.choices[0].text for c in chunks if c.choices)
    assert body == text(PROMPTS[1], 10)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_uses_template(client, reference):
    greedy, _, tok = reference
    messages = [{"role": "user", "content": "To be"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = tok.decode(greedy(tok(prompt, add_special_tokens=False).input_ids, 8),
                      skip_special_tokens=True)
    out = client.chat.completions.create(model="tiny-pruned", messages=messages, max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    stream = client.chat.completions.create(model="tiny-pruned", messages=messages,
                                            max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_stop_string_n_and_seed(client, reference):
    _, text, _ = reference
    full = text(PROMPTS[0], 20)
    stop = full[5:7]
    out = client.completions.create(model="tiny-pruned", prompt=PROMPTS[0], max_tokens=20,
                                    temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    kw = dict(model="tiny-pruned", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9,
              n=3, seed=7, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: repeatable
    assert len({c.text for c in a.choices}) > 1  # choices sample with seed + index


# -- bad input -------------------------------------------------------------------------------
BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b"[1, 2]", 400, "expected an object"),
    (b"", 400, "empty"),
    ({"prompt": "To be", "bogus": 1}, 400, "unknown field 'bogus'"),
    ({"prompt": "To be", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "To be", "temperature": True}, 400, "temperature"),
    ({"prompt": "To be", "temperature": 3}, 400, "temperature"),
    ({"prompt": "To be", "n": 0}, 400, "n"),
    ({"prompt": "To be", "max_tokens": 10_000}, 400, "maximum context length is 128"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": [5, 100000]}, 400, "outside the vocabulary"),
    ({"prompt": "To be", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": "To be", "logprobs": 3}, 400, "logprobs is not supported"),
    ({"prompt": "To be", "model": "gpt-4"}, 404, "does not exist"),
    ({}, 400, "prompt"),
    (b'{"prompt": "\\ud800"}', 400, "lone UTF-16 surrogate"),
    ({"prompt": "To be", "seed": 2 ** 63}, 400, "seed"),
    ({"prompt": "To be", "seed": 2 ** 63, "stream": True}, 400, "seed"),
    ({"prompt": "To be", "seed": 2 ** 64}, 400, "seed"),
    ({"prompt": ["To be"] * 300}, 400, "--max-queue"),
    # 4 300 nines: once a 500, when the context-length message printed prompt + max_tokens
    (b'{"prompt": "To be", "max_tokens": ' + b"9" * 4300 + b"}", 400, "max_tokens"),
    (b'{"prompt": "To be", "n": 2, "stream": true, "max_tokens": ' + b"9" * 4300 + b"}", 400,
     "max_tokens"),
    ({"prompt": "To be", "max_tokens": 2 ** 40}, 400, "max_tokens"),
]


@pytest.mark.parametrize("body,status,fragment", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_4xx_with_openai_error(server, body, status, fragment):
    resp = post(server, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert fragment in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_huge_chat_max_tokens_is_a_400(server, field):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (
        field.encode(), b"9" * 4300)
    resp = post(server, body, path="/v1/chat/completions")
    assert resp.status_code == 400 and field in resp.json()["error"]["message"], resp.text


def test_extreme_seeds_generate(server):
    """Both ends of int64 are valid seeds on every backend (choice seeds wrap inside int64)."""
    for seed in (2 ** 63 - 1, -(2 ** 63)):
        for stream in (False, True):
            resp = post(server, {"prompt": "To be", "max_tokens": 3, "n": 2, "seed": seed,
                                 "temperature": 1.0, "stream": stream})
            assert resp.status_code == 200, resp.text
            assert "error" not in resp.text


def test_head_health(server):
    assert httpx.head(server.url + "/health").status_code == 200


def test_bad_chat_and_routes(server):
    resp = post(server, {"messages": []}, path="/v1/chat/completions")
    assert resp.status_code == 400 and "messages" in resp.json()["error"]["message"]
    resp = post(server, {"messages": [{"role": "wizard", "content": "x"}]},
                path="/v1/chat/completions")
    assert resp.status_code == 400
    resp = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 404 and "no route" in resp.json()["error"]["message"]


def test_oversized_body_is_413(server):
    resp = post(server, b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert resp.status_code == 413 and "limit" in resp.json()["error"]["message"]


def test_still_serving_after_bad_input(server, client, reference):
    _, text, _ = reference
    for body, status, _ in BAD:
        assert post(server, body).status_code == status
    out = client.completions.create(model="tiny-pruned", prompt=PROMPTS[3], max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == text(PROMPTS[3], 5)
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert 'ecospa_requests_total{route="/v1/completions",status="400"}' in metrics.text
    assert 'status="500"' not in metrics.text


def test_api_key(server):
    assert post(server, {"prompt": "To be"}, key=None).status_code == 401
    wrong = post(server, {"prompt": "To be"}, key="test-key-124")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert post(server, {"prompt": "To be", "max_tokens": 2}).status_code == 200


def test_chat_without_template_is_clear_400(tmp_path):
    path = save_tiny_served(tmp_path / "no-template", seed=1)
    with ServerProcess(path, "--backend", "hf") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="no-template",
                                           messages=[{"role": "user", "content": "hi"}])
        assert client.completions.create(model="no-template", prompt="To be",
                                         max_tokens=2).choices


# -- load, shutdown, refusal ------------------------------------------------------------------
def test_load_64_concurrent_requests_are_batched(server, reference):
    _, text, _ = reference
    summary = asyncio.run(run_load(server.url, PROMPTS, requests=64, max_tokens=16,
                                   api_key=KEY, time_cap=120))
    assert summary["ok"] == 64, [r for r in summary["results"] if r["status"] != 200][:3]
    want = {p: text(p, 16) for p in PROMPTS}
    for i, r in enumerate(summary["results"]):
        assert r["text"] == want[PROMPTS[i % len(PROMPTS)]]
    assert summary["batch_size"]["steps_with_more_than_one"] > 0
    assert summary["batch_size"]["mean"] > 1.5
    print("\nload:", json.dumps({k: v for k, v in summary.items() if k != "results"}))


def test_streamed_load_with_distinct_prompt_lengths(server):
    prompts = token_prompts(12, 2, 40, vocab=90)
    assert len({len(p) for p in prompts}) == 12
    summary = asyncio.run(run_stream_load(server.url, prompts, [3, 6], api_key=KEY,
                                          time_cap=120))
    assert summary["ok"] == 12 and summary["distinct_prompt_lens"] == 12
    for i, r in enumerate(summary["results"]):
        assert r["ttft_s"] > 0 and 0 < r["completion_tokens"] <= (3, 6)[i % 2]
    assert summary["ttft_p50_ms"] > 0 and summary["output_tokens_per_s"] > 0
    # the scheduler's TTFT starts after the request is read and tokenized and ends before
    # the first token reaches the client: inside the client's
    assert 0 < summary["server_ttft_mean_ms"] < summary["ttft_mean_ms"]


def test_sigterm_finishes_in_flight_requests(model_dir):
    srv = ServerProcess(model_dir, "--backend", "hf").start()
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "To be", "max_tokens": 100, "stream": True,
                                "ignore_eos": True, "temperature": 0}) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            srv.terminate()
            rest = [line for line in lines if line.startswith("data:")]
        assert json.loads(first[5:])["choices"]
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(x[5:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finish[-1] == "length"  # the in-flight request ran to its end
        assert srv.wait(60) == 0
    finally:
        srv.stop()
    assert "shut down cleanly" in srv.log
    assert "Traceback" not in srv.log


@pytest.mark.parametrize("where", [[], ["--engine-process"]], ids=["in_process", "core"])
def test_bad_model_dir_refuses_to_start(tmp_path, where):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "ecospa_llama", "ecospa": {"layers": 3}}')
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ecospa_deploy.cli", "serve", str(bad),
                           "--port", "0", "--backend", "hf", *where], capture_output=True,
                          text=True, timeout=120)
    with pytest.raises(Exception) as loader:
        load_model(bad)
    assert proc.returncode == 2
    assert f"error: {loader.value}" in proc.stderr  # the loader's own message
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 120
