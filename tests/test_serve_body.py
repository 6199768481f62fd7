"""serve/body.py and the prompt field: the fast paths for large bodies decide exactly as the
full checks do (the checks themselves over HTTP: tests/test_serve_hardening.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from ecospa_deploy.serve.body import MAX_DEPTH, _may_fail_check, check_json, parse_json
from ecospa_deploy.serve.errors import APIError
from ecospa_deploy.serve.protocol import CompletionRequest, Prompt
from fuzz_profiles import fuzz_settings

TEXT = st.text(st.characters(codec=None), max_size=12)      # lone surrogates included
SCALAR = st.none() | st.booleans() | st.integers() | TEXT \
    | st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=40)


def _deep(levels: int) -> bytes:
    return b'{"prompt": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def _outcome(fn, *args):
    try:
        fn(*args)
        return "ok"
    except APIError as exc:
        return exc.status, exc.body()["error"]["message"].split(" at nesting")[0]


@fuzz_settings(300, 5000)
@given(value=JSON, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_parse_json_refuses_exactly_what_the_full_walk_refuses(value, ascii_only, indent):
    """Lone surrogates reach the text as escapes (ensure_ascii) or not at all (a raw one is
    not UTF-8); every value either way gets the full walk's verdict."""
    try:
        raw = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode("utf-8")
    except UnicodeEncodeError:
        return
    assert _outcome(parse_json, raw) == _outcome(check_json, json.loads(raw))


@pytest.mark.parametrize("raw,refused", [
    (_deep(MAX_DEPTH), False),
    (_deep(MAX_DEPTH + 1), True),
    (b'{"prompt": "' + b"[{" * 40 + b'"}', False),             # brackets inside a string
    (b'{"prompt": "a\\\\ud800"}', False),                     # an escaped backslash, then text
    (b'{"prompt": "\\ud83d\\ude00"}', False),                 # a surrogate pair: one character
    (b'{"prompt": "\\uD800"}', True),
    (b'{"stop": ["ok", "\\udfff"]}', True),
])
def test_edges(raw, refused):
    assert (_outcome(parse_json, raw) != "ok") is refused
    assert _outcome(parse_json, raw) == _outcome(check_json, json.loads(raw))


def test_a_token_id_prompt_skips_the_walk():
    raw = json.dumps({"prompt": list(range(1024)), "stream": True,
                      "stream_options": {"include_usage": True}})
    assert not _may_fail_check(raw)
    assert _may_fail_check(raw.replace("[0,", "[[[" * 11 + "0," + "]]]" * 11 + ",", 1))
    assert _may_fail_check('{"prompt": "\\udc00"}')


PROMPT = TypeAdapter(Prompt, config={"strict": True})     # the union without the fast path
ITEM = st.integers() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=3) \
    | st.lists(st.integers(), max_size=2) | st.none()


@fuzz_settings(300, 5000)
@given(prompt=st.lists(st.integers(), max_size=20) | st.lists(ITEM, max_size=6) | ITEM)
def test_the_token_id_fast_path_accepts_exactly_what_the_union_accepts(prompt):
    try:
        want = PROMPT.validate_python(prompt)
    except ValidationError:
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": prompt})
        return
    got = CompletionRequest.model_validate({"prompt": prompt}).prompt
    assert got == want and type(got) is type(want)
