"""ONNX exports on the runtimes users deploy with: onnxruntime-genai and optimum.

Greedy tokens of each runtime, at batch 1 and at batch 2 with prompts of unequal lengths, must
equal our transformers modeling's (one prompt at a time) on a pruned tiny Llama whose layers
differ in heads and have q/k dim != v dim. The runtimes live in venvs of their own
(``.ci/onnx_runtimes.sh``); the main venv builds the exports and the reference
(``onnx_runtime_fixture.py``) and this file reads them from ``$ECOSPA_ONNX_FIXTURE``. Without
that variable, or without the runtime, those tests skip. The first test runs in the main venv:
every target's padded cache gives ``OrtGenerator`` the reference tokens too.

No module-level import of torch or ecospa_deploy: the genai venv has neither (run it with
``--noconftest``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

EOS_FREE = "the reference must run the whole length for the comparison to mean anything"


def cut(tokens, eos: int) -> list[int]:
    """Tokens up to and including the first EOS (runtimes stop there)."""
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    root = os.environ.get("ECOSPA_ONNX_FIXTURE")
    if not root:
        pytest.skip("ECOSPA_ONNX_FIXTURE is not set (.ci/onnx_runtimes.sh builds it)")
    return Path(root)


@pytest.fixture(scope="module")
def reference(fixture_dir) -> dict:
    ref = json.loads((fixture_dir / "reference.json").read_text())
    assert all(ref["eos_token_id"] not in row for row in ref["tokens"]), EOS_FREE
    assert ref["eos_token_id"] not in ref["text_tokens"], EOS_FREE
    return ref


BATCHES = [[0], [1], [0, 1]]      # prompt indices: each alone, then both (unequal lengths)


# -- main venv: the padded layouts are exact ----------------------------------------------
def test_every_target_generates_the_reference_tokens_on_ortgenerator(tmp_path):
    pytest.importorskip("transformers", minversion="5")     # the main venv only
    import onnx_runtime_fixture as fixture
    from ecospa_deploy.converters.onnx import OrtGenerator
    from ecospa_deploy.engine.sampling import SamplingParams

    ref = fixture.build(tmp_path)
    params = SamplingParams(max_new_tokens=ref["max_new_tokens"])
    for target in fixture.TARGETS:
        gen = OrtGenerator(tmp_path / target)
        assert gen.target == target
        assert gen.generate(ref["prompts"], params) == ref["tokens"], target
        assert gen.generate([ref["text_ids"]], params) == [ref["text_tokens"]]
        # Text in, text out, with the saved tokenizer: it stops at its EOS, which a random
        # model may well emit (the id path above runs the whole length regardless).
        stopped = cut(ref["text_tokens"], ref["eos_token_id"])
        text = gen.tokenizer.decode(stopped, skip_special_tokens=True)
        assert gen.generate([ref["text"]], params) == [text]
        genai = json.loads((tmp_path / target / "genai_config.json").read_text())
        assert "ecospa" not in genai and genai["model"]["type"] == "llama"
        shapes = {(c["num_key_value_heads"], c["key_head_size"], c["value_head_size"])
                  for c in gen.cache}
        assert all(k == v for _, k, v in shapes), "K and V of one layer share one shape"
        if target == "optimum":
            config = json.loads((tmp_path / target / "config.json").read_text())
            assert shapes == {(config["num_key_value_heads"],
                               config["hidden_size"] // config["num_attention_heads"],
                               config["hidden_size"] // config["num_attention_heads"])}
        else:
            assert len(shapes) > 1 and not (tmp_path / target / "config.json").exists()


# -- onnxruntime-genai venv ----------------------------------------------------------------
def _genai_generate(model, rows: list[list[int]], pad: int, new_tokens: int) -> list[list[int]]:
    """Greedy new tokens per row; the batch is right-padded with ``pad``, as genai expects."""
    import numpy as np
    import onnxruntime_genai as og

    longest = max(len(r) for r in rows)
    ids = np.array([r + [pad] * (longest - len(r)) for r in rows], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=longest + new_tokens, batch_size=len(rows),
                              do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)][longest:] for i in range(len(rows))]


@pytest.mark.onnx_runtimes
@pytest.mark.parametrize("target", ["genai", "optimum"])
def test_onnxruntime_genai_greedy_equals_hf(fixture_dir, reference, target):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(fixture_dir / target))
    eos, n = reference["eos_token_id"], reference["max_new_tokens"]
    for batch in BATCHES:
        rows = [reference["prompts"][i] for i in batch]
        got = _genai_generate(model, rows, reference["pad_token_id"], n)
        assert [cut(g, eos) for g in got] == \
            [cut(reference["tokens"][i], eos) for i in batch], (target, batch)


# -- optimum venv --------------------------------------------------------------------------
@pytest.mark.onnx_runtimes
@pytest.mark.parametrize("io_binding", [False, True])
def test_optimum_greedy_equals_hf(fixture_dir, reference, io_binding):
    pytest.importorskip("optimum.onnxruntime")
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(str(fixture_dir / "optimum"),
                                                use_io_binding=io_binding)
    eos, pad, n = reference["eos_token_id"], reference["pad_token_id"], reference["max_new_tokens"]
    for batch in BATCHES:
        rows = [reference["prompts"][i] for i in batch]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])       # left-padded
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                             do_sample=False, pad_token_id=pad)
        assert [cut(row, eos) for row in out[:, longest:].tolist()] == \
            [cut(reference["tokens"][i], eos) for i in batch], (io_binding, batch)


@pytest.mark.onnx_runtimes
def test_optimum_reads_the_tokenizer_and_generates_from_text(fixture_dir, reference):
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    path = str(fixture_dir / "optimum")
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(reference["text"], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == reference["text_ids"]
    model = ORTModelForCausalLM.from_pretrained(path)
    out = model.generate(**inputs, max_new_tokens=reference["max_new_tokens"], do_sample=False)
    new = out[0, len(reference["text_ids"]):].tolist()
    eos = reference["eos_token_id"]
    assert cut(new, eos) == cut(reference["text_tokens"], eos)
