"""serve/chunks.py: a streamed chunk's JSON text is byte for byte ``json.dumps(chunk,
ensure_ascii=False)`` of the OpenAI chunk it stands for."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from ecospa_deploy.serve.chunks import Envelope, chat_choice, completion_choice
from ecospa_deploy.serve.generation import Delta

deltas = st.builds(Delta, index=st.integers(0, 127), text=st.text(),
                   finish_reason=st.sampled_from([None, "stop", "length", 'odd "reason"']))
envelopes = st.fixed_dictionaries({
    "id": st.text(min_size=1), "object": st.sampled_from(["text_completion",
                                                          "chat.completion.chunk"]),
    "created": st.integers(0, 2**40), "model": st.text()})


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


@given(envelopes, deltas)
def test_a_completion_chunk_is_json_dumps_of_its_dict(fields, d):
    want = {**fields, "choices": [{"index": d.index, "text": d.text, "logprobs": None,
                                   "finish_reason": d.finish_reason}]}
    assert Envelope(**fields).chunk(completion_choice(d)) == _dumps(want)


@given(envelopes, deltas, st.booleans())
def test_a_chat_chunk_is_json_dumps_of_its_dict(fields, d, first):
    delta = {"content": d.text, **({"role": "assistant"} if first else {})}
    want = {**fields, "choices": [{"index": d.index, "delta": delta, "logprobs": None,
                                   "finish_reason": d.finish_reason}]}
    assert Envelope(**fields).chunk(chat_choice(d, first)) == _dumps(want)


@given(envelopes, st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens",
                                                    "total_tokens"]), st.integers(0, 10**6)))
def test_the_usage_chunk_is_json_dumps_of_its_dict(fields, usage):
    assert Envelope(**fields).chunk("[]", usage) == _dumps({**fields, "choices": [],
                                                            "usage": usage})


def test_lone_surrogates_and_controls_are_escaped_as_json_dumps_does():
    d = Delta(0, 'a"\\\n\x00\ud800é🙂')
    text = Envelope(id="x", object="text_completion", created=1, model="m").chunk(
        completion_choice(d))
    assert json.loads(text)["choices"][0]["text"] == d.text
