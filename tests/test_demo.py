"""The README's main command builds a real, loadable pruned model (slow: trains on CPU once)."""

from __future__ import annotations

import json

import pytest
import torch

from ecospa_deploy.demo import ensure_demo_model
from ecospa_deploy.loading import load_model, load_tokenizer


@pytest.mark.slow
def test_demo_model_is_pruned_loadable_and_idempotent(tmp_path):
    out = ensure_demo_model(tmp_path / "pruned-llama", progress=False)
    info = json.loads((out / "demo.json").read_text())
    assert abs(info["params_after"] / info["params_before"] - 0.7) < 0.02
    model = load_model(out, dtype=torch.float32)
    spec = model.config.ecospa_spec
    assert spec.provenance["method"] == "ecospa"
    assert len({(l.num_attention_heads, l.intermediate_size) for l in spec.layers}) > 1
    tok = load_tokenizer(out)
    ids = tok("ROMEO:\n", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 8
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    mtime = (out / "demo.json").stat().st_mtime
    assert ensure_demo_model(out) == out and (out / "demo.json").stat().st_mtime == mtime
