"""Request bodies: read with a size limit, parse as strict JSON, refuse what only hurts us.

Everything a client can get wrong in a body is a 400/413 here, before any field is looked at:
not UTF-8, not JSON, ``NaN``/``Infinity`` (not JSON, though Python accepts them), integers
past Python's 4300-digit conversion limit, nesting deeper than ``MAX_DEPTH`` (the requests we
accept nest 4 levels; a deep body would otherwise hit the recursion limit somewhere later),
and strings with lone UTF-16 surrogates (``"\\ud800"`` is valid JSON, but such a string cannot
be encoded as UTF-8: the tokenizer and every response carrying it would fail).
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from ecospa_deploy.serve.errors import APIError

MAX_DEPTH = 32
_DIGITS = re.compile(r"[0-9]{1,30}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _bad_string(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """400 for nesting deeper than ``max_depth`` or a string (value or key) that is not
    encodable as UTF-8. Iterative, so no depth can overflow the stack here; only containers
    go on the stack (a prompt of token ids is one pass over a list, not one pop per id)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item, depth)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            raise APIError(400, f"request body nests deeper than {max_depth} levels")
        if isinstance(item, dict):
            for key in item:
                _check_string(key, depth)
            item = item.values()
        for child in item:
            if isinstance(child, str):
                _check_string(child, depth + 1)
            elif isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _check_string(s: str, depth: int) -> None:
    if _bad_string(s):
        raise APIError(400, "request body has a string with a lone UTF-16 surrogate "
                       f"(such as \\ud800) at nesting level {depth}; expected valid "
                       "Unicode text")


def _may_fail_check(text: str, max_depth: int = MAX_DEPTH) -> bool:
    """False when ``check_json`` cannot fail on this text's value, told from the text alone.
    Valid UTF-8 holds no surrogate, so a lone one can only come from a ``\\uD800``-style
    escape; and a value cannot nest deeper than the text has opening brackets."""
    return bool(_SURROGATE_ESCAPE.search(text)) or \
        text.count("[") + text.count("{") > max_depth


def parse_json(raw: bytes) -> Any:
    """``raw`` as a JSON value, or a 400 ``APIError`` saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start}: "
                       f"{exc.reason})") from None
    if not text.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                       f"column {exc.colno}") from None
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # NaN/Infinity, or an integer over 4300 digits
        raise APIError(400, f"request body is not acceptable JSON: {exc}") from None
    if _may_fail_check(text):
        check_json(value)
    return value


def declared_length(request: Request, max_bytes: int) -> int | None:
    """The Content-Length header, checked against ``max_bytes`` before reading anything."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not _DIGITS.fullmatch(declared.strip()):
        raise APIError(400, f"bad Content-Length header {declared[:40]!r}; expected a "
                       "non-negative decimal integer")
    n = int(declared)
    if n > max_bytes:
        raise APIError(413, f"request body is {n} bytes; the limit is {max_bytes} "
                       "(--max-body-bytes)")
    return n


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON, refusing (4xx) anything too large, not UTF-8 or not JSON.

    The Content-Type is not checked: ``curl -d`` sends form encoding by default and OpenAI's
    clients always send JSON, so the body itself decides. A client that disconnects while
    sending raises starlette's ``ClientDisconnect`` (the app answers nobody, logs nothing).
    """
    declared_length(request, max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes "
                           "(--max-body-bytes)")
    return parse_json(bytes(body))
