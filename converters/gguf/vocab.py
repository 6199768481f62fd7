"""The tokenizer as GGUF metadata, so that llama.cpp tokenizes as our HF tokenizer does.

Byte-level BPE tokenizers only (GPT-2, Llama 3, Qwen2, SmolLM: ``tokenizer.ggml.model =
"gpt2"``): tokens by id in their byte-level spelling, token types (control for special added
tokens, user-defined for other added tokens, unused for ids past the tokenizer), merges, special
ids and the chat template (gguf's ``SpecialVocab`` reads the last three from the files a saved
tokenizer writes). llama.cpp picks its pre-tokenizer regex by *name* (``tokenizer.ggml.pre``);
the name is read off the tokenizer's pre-tokenizer, and a pre-tokenizer not in ``PRE`` is refused
rather than guessed: a wrong regex splits some texts differently and changes their tokens.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from ecospa_deploy.errors import UnsupportedError

# llama.cpp pre-tokenizer names by the regex of the tokenizer's pre-tokenizer ("" = ByteLevel's
# own GPT-2 regex)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE = {"": "gpt-2", _LLAMA3: "llama-bpe", _QWEN2: "qwen2", "digits+": "smollm"}


def pre_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer; ``UnsupportedError`` otherwise."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    key = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        key = ""
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and \
            steps[1].get("use_regex", True):
        key = "digits+"
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        key = (steps[0].get("pattern") or {}).get("Regex")
    if key not in PRE:
        raise UnsupportedError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not "
                               f"one llama.cpp is known to reproduce ({sorted(PRE.values())})")
    return PRE[key]


def add_vocab(writer, tokenizer, vocab_size: int) -> str:
    """Write ``tokenizer`` (an HF fast tokenizer) into ``writer``; returns the pre-tokenizer name."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if (state.get("model") or {}).get("type") != "BPE" or \
            "ByteLevel" not in json.dumps(state.get("decoder")):
        raise UnsupportedError("only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM) "
                               "are written to GGUF; this one is "
                               f"{(state.get('model') or {}).get('type')}")
    pre = pre_name(state)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UnsupportedError(f"the tokenizer has id {max(by_id)} but the model only "
                               f"{vocab_size} embeddings")
    added = {a["id"]: a for a in state.get("added_tokens", [])}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(T.NORMAL if a is None else T.CONTROL if a.get("special") else
                         T.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # whether our tokenizer adds BOS/EOS by itself: llama.cpp must do the same
    probe = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = {"bos": len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id,
            "eos": len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id}
    with tempfile.TemporaryDirectory() as tmp:   # SpecialVocab reads a saved tokenizer
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = adds
    special.add_to_gguf(writer, quiet=True)
    return pre
