"""Incremental detokenization with stop strings, for streaming text token by token.

Decoding token by token breaks multi-byte characters and byte-level BPE merges, so the text
of the tokens after a fixed offset is decoded again each time and only the part past the
previous read is emitted (the offsets scheme of TGI/vLLM); a trailing U+FFFD means an
unfinished UTF-8 sequence and is held back. Text that could still grow into a stop string
is held back too, so a stop string is never half-sent.
"""

from __future__ import annotations

import functools
from typing import Callable


def decoder(tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, through the Rust tokenizer itself
    where that is all transformers' ``decode`` does (a fast tokenizer without the clean-up of
    spaces): its per-call Python (argument conversion, keyword handling) cost ~4x the decode,
    and a stream decodes twice per token."""
    try:
        from tokenizers import Tokenizer
    except ImportError:       # pragma: no cover - transformers depends on it
        Tokenizer = None
    backend = getattr(tokenizer, "_tokenizer", None)
    if (Tokenizer is not None and isinstance(backend, Tokenizer)
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


class TextStream:
    """Turns one choice's tokens into text deltas; finds the first stop string."""

    def __init__(self, tokenizer, stops: list[str],
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self._decode = decode or decoder(tokenizer)    # a response's streams share one
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""        # everything decoded so far (up to a stop string, once found)
        self._sent = 0        # chars of ``text`` already returned
        self.stopped = False  # a stop string was found; ``text`` ends right before it

    def push(self, token: int) -> str:
        """Add a token; return the newly safe text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: decode what was pending and return all held-back text."""
        if self.stopped:
            return self._take(len(self.text))
        return self._advance(final=True)

    def close(self, reason: str) -> tuple[str, str]:
        """The last delta and the finish reason once the model stopped for ``reason``.

        Held-back text (an unfinished UTF-8 sequence, a possible stop-string prefix) is only
        decoded here, so a stop string can first appear now; the choice then ended on it.
        """
        text = self.flush()
        return text, "stop" if self.stopped else reason

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        grew = len(new_text) > len(prefix_text)
        if grew and (final or not new_text.endswith("\ufffd")):
            start = len(self.text)
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stops:
                # Only the new text (and the tail a stop string could straddle) is searched.
                window = max(0, start - self._hold)
                hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.stopped = True
                    return self._take(len(self.text))
        return self._take(len(self.text) if final else len(self.text) - self._hold)

    def _take(self, upto: int) -> str:
        upto = max(upto, self._sent)
        out = self.text[self._sent:upto]
        self._sent = upto
        return out
