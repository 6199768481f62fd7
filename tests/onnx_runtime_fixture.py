"""Exports and reference tokens for the runtime tests (``test_onnx_runtimes.py``).

onnxruntime-genai and optimum run in venvs of their own (optimum pins transformers < 4.58; our
package needs transformers 5), so the main venv builds everything they need once:

  python tests/onnx_runtime_fixture.py DIR

writes ``DIR/genai`` and ``DIR/optimum`` (``ecospa convert onnx`` targets of a pruned tiny Llama
whose layers differ in query/KV heads and have q/k dim != v dim, with a tokenizer) and
``DIR/reference.json``: our transformers modeling's greedy tokens per prompt, computed one
prompt at a time (batch 1, no padding), which every runtime must reproduce at batch 1 and 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]   # unequal lengths; no pad (0) or EOS (2)
TEXT = "that is the question"   # its greedy reference (tiny_tokenizer, seed 1) emits no EOS
MAX_NEW_TOKENS = 8
TARGETS = ("genai", "optimum")


def build(root: str | Path) -> dict:
    from ecospa_deploy.converters.onnx import export_onnx
    from ecospa_deploy.converters.vllm.parity import reference_greedy
    from ecospa_deploy.testing import tiny_pruned, tiny_tokenizer

    root = Path(root)
    model = tiny_pruned("llama", seed=1)
    layers = model.config.ecospa_spec.layers
    assert len({(l.num_attention_heads, l.num_key_value_heads) for l in layers}) > 1
    assert any(l.qk_head_dim != l.v_head_dim for l in layers)
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    for target in TARGETS:
        export_onnx(model, root / target, exporter="legacy", target=target,
                    tokenizer=tokenizer, overwrite=True)
    text_ids = tokenizer(TEXT)["input_ids"]
    reference = {
        "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id,
        "tokens": reference_greedy(model, PROMPTS, MAX_NEW_TOKENS),
        "text": TEXT, "text_ids": text_ids,
        "text_tokens": reference_greedy(model, [text_ids], MAX_NEW_TOKENS)[0],
        "layers": [{"num_attention_heads": l.num_attention_heads,
                    "num_key_value_heads": l.num_key_value_heads,
                    "qk_head_dim": l.qk_head_dim, "v_head_dim": l.v_head_dim} for l in layers],
    }
    (root / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    return reference


if __name__ == "__main__":
    build(sys.argv[1])
    print(f"wrote {sys.argv[1]}")
