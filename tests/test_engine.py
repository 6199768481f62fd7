"""Engine on CPU (fp32): HF's greedy tokens for dense and heterogeneous models, with padding."""

from __future__ import annotations

import pytest
import torch

from ecospa_deploy.engine import Engine, SamplingParams, kv_bucket
from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.testing import FAMILIES, slot_join_tokens, tiny_dense, tiny_hf, tiny_pruned

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [3, 4] * 5]
BUILDERS = {"hf": tiny_hf, "dense": tiny_dense, "pruned": tiny_pruned}


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["hf", "dense", "pruned"])
def test_greedy_matches_hf_unequal_prompts(family, kind):
    model = BUILDERS[kind](family, seed=1)
    eng = Engine(model, max_batch_size=4, max_seq_len=48)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert out == [hf_greedy(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_padding_is_exact_and_actually_pads(family):
    model = tiny_pruned(family, seed=2)
    spec = model.config.ecospa_spec
    eng = Engine(model, max_batch_size=2, max_seq_len=40, pad_multiple=64, head_multiple=8)
    for lw, layer in zip(eng.weights.layers, spec.layers):
        assert lw.qk_head_dim % 8 == 0 and lw.v_head_dim % 8 == 0 and lw.intermediate_size % 64 == 0
        assert lw.qkv_w.shape[0] % 64 == 0
        assert lw.intermediate_size >= layer.intermediate_size
    assert any(lw.intermediate_size != layer.intermediate_size for lw, layer in zip(eng.weights.layers,
                                                                       spec.layers))
    unpadded = Engine(model, max_batch_size=2, max_seq_len=40, pad_multiple=1, head_multiple=1)
    prompt = [[7, 8, 9, 10, 11]]
    params = SamplingParams(max_new_tokens=10)
    assert eng.generate(prompt, params) == unpadded.generate(prompt, params) == \
        [hf_greedy(model, prompt[0], 10)]
    # K stored at the (padded) q/k dim, not the v dim
    assert [k.shape[-1] for k in eng.cache.k] == [lw.qk_head_dim for lw in eng.weights.layers]


def test_slot_api_join_mid_batch_and_stop_tokens():
    model = tiny_pruned("llama", seed=5)
    eng = Engine(model, max_batch_size=3, max_seq_len=48)
    ref = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10))
    got = slot_join_tokens(eng, (1, PROMPTS[0]), (0, PROMPTS[1]), 10, steps_before_join=4)
    assert got[1] == ref[0] and got[0] == ref[1]
    with pytest.raises(ValueError, match="slot 0 is in use"):
        eng.add(0, [1, 2], SamplingParams())
    eng.free(0)
    eng.free(1)
    stop = ref[0][3]
    out = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    assert out == [ref[0][:ref[0].index(stop) + 1]]


def test_seeded_sampling_reproducible_and_batch_independent():
    model = tiny_dense("llama", seed=6)
    eng = Engine(model, max_batch_size=4, max_seq_len=48)
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=11)
    a = eng.generate([PROMPTS[0]], sp)
    b = eng.generate([PROMPTS[1], PROMPTS[0]], [SamplingParams(max_new_tokens=4), sp])
    assert a[0] == b[1]
    c = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16, temperature=1.0,
                                                  top_p=0.9, top_k=20, seed=12))
    assert c != a          # another seed samples another sequence (16 tokens of 96)
    greedy = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16))
    assert a != greedy
    top1 = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16, temperature=1.0,
                                                     top_k=1, seed=3))
    assert top1 == greedy


def test_bad_input_clear_errors():
    model = tiny_dense("gpt2")
    eng = Engine(model, max_batch_size=2, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        eng.generate([[1] * 30], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="out of range"):
        eng.generate([[1, 10_000]])
    with pytest.raises(ValueError, match="slot=5"):
        eng.add(5, [1], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedError, match="CUDA is not available"):
            Engine(model, device="cuda")


def test_kv_bucket():
    assert kv_bucket(1, 4096) == 128
    assert kv_bucket(129, 4096) == 256
    assert kv_bucket(4097, 8192) == 4608       # <= 12.5% over
    assert kv_bucket(5000, 4200) == 4200


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_launched_steps_collected_later_give_the_step_tokens(device):
    """``launch`` twice, then ``collect`` both: the tokens of two ``step`` calls. A slot
    freed while its steps are in flight gets none of them, and one prefilled into it
    meanwhile decodes its own tokens from the next launch on."""
    model = tiny_pruned("llama", seed=10).to(device)
    eng, ref = (Engine(model, max_batch_size=4, max_seq_len=64) for _ in range(2))
    params = SamplingParams(max_new_tokens=20, temperature=0.7, seed=4)
    for e in (eng, ref):
        for slot, prompt in enumerate(PROMPTS):
            e.add(slot, prompt, params)
    for _ in range(3):
        first, second = eng.launch(), eng.launch()
        want = [ref.step(), ref.step()]
        assert [{s: t[0] for s, t in eng.collect(x).items()} for x in (first, second)] == want
    pending = eng.launch()
    eng.free(1)
    eng.add(1, [9, 8, 7], params)
    ref.step()
    ref.free(1)
    ref.add(1, [9, 8, 7], params)
    assert set(eng.collect(pending)) == {0, 2}
    for _ in range(4):
        assert {s: t[0] for s, t in eng.collect(eng.launch()).items()} == ref.step()
