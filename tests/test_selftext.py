"""Calibration windows from the model's own text: shape, seeds, the cache, no stop at eos."""

import hashlib

import pytest
import torch

from ecospa_deploy.chat import encode_chat
from ecospa_deploy.errors import EcospaError
from ecospa_deploy.prune import selftext
from ecospa_deploy.prune.selftext import PROMPTS, choose_prompts, selftext_windows
from ecospa_deploy.questions import QUESTIONS
from ecospa_deploy.testing import tiny_chat_tokenizer, tiny_dense

SEQ = 160     # the tiny tokenizer spends about a token per character on a prompt


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOSPA_CACHE", str(tmp_path))
    return tmp_path


def model():
    return tiny_dense("llama", max_position_embeddings=512)


def test_the_prompt_list_is_long_varied_and_asks_no_quiz_question():
    assert len(PROMPTS) >= 200 and len(set(PROMPTS)) == len(PROMPTS)
    assert any("Python" in p for p in PROMPTS) and any("recipe" in p for p in PROMPTS)
    quiz = {q.text.lower() for q in QUESTIONS}
    assert not [p for p in PROMPTS if p.lower() in quiz]


def test_prompts_are_chosen_by_seed_without_repeats_until_the_list_is_used_up():
    assert choose_prompts(20, seed=1) == choose_prompts(20, seed=1)
    assert choose_prompts(20, seed=1) != choose_prompts(20, seed=2)
    first = choose_prompts(len(PROMPTS), seed=3)
    assert sorted(first) == sorted(PROMPTS)
    assert choose_prompts(len(PROMPTS) + 5, seed=3)[:len(PROMPTS)] == first


def test_windows_have_the_shape_and_start_with_their_prompt(cache):
    tok = tiny_chat_tokenizer()
    got = selftext_windows(model(), tok, samples=5, seq_len=SEQ, seed=0, batch_size=2,
                           progress=False)
    assert got.windows.shape == (5, SEQ) and got.windows.dtype == torch.int64
    assert got.sha256 == hashlib.sha256(got.windows.numpy().tobytes()).hexdigest()
    prov = got.provenance
    assert prov["prompts"] == choose_prompts(5, 0) and prov["seed"] == 0
    assert prov["sampling"]["temperature"] == 0.8 and prov["sampling"]["top_p"] == 0.95
    for row, prompt in zip(got.windows, prov["prompts"]):
        ids = encode_chat(tok, [prompt])["input_ids"][0]
        assert torch.equal(row[:ids.numel()], ids)


def test_same_seed_same_windows_other_seed_other_windows(cache):
    m, tok = model(), tiny_chat_tokenizer()
    kw = dict(samples=3, seq_len=SEQ, batch_size=2, progress=False, cache=False)
    a, b = selftext_windows(m, tok, seed=0, **kw), selftext_windows(m, tok, seed=0, **kw)
    c = selftext_windows(m, tok, seed=1, **kw)
    assert torch.equal(a.windows, b.windows) and a.sha256 == b.sha256
    assert not torch.equal(a.windows, c.windows)
    assert not list(cache.rglob("*.pt"))          # cache=False writes nothing


def test_a_second_call_reads_the_cache(cache):
    m, tok = model(), tiny_chat_tokenizer()
    first = selftext_windows(m, tok, samples=2, seq_len=SEQ, seed=0, progress=False)
    assert not first.cached and first.path.is_file()
    assert first.path.parent == cache / "selftext"
    second = selftext_windows(m, tok, samples=2, seq_len=SEQ, seed=0, progress=False)
    assert second.cached and second.path == first.path
    assert torch.equal(second.windows, first.windows) and second.provenance == first.provenance
    other = selftext_windows(m, tok, samples=2, seq_len=SEQ + 8, seed=0, progress=False)
    assert other.path != first.path and not other.cached


def test_the_cache_key_follows_the_weights():
    m = model()
    before = selftext.model_fingerprint(m)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert selftext.model_fingerprint(m) != before


def test_generation_goes_on_past_eos(cache):
    """A zero output layer samples every token alike, eos included: rows must carry on after
    an eos with sampled tokens, not stop and pad."""
    m, tok = model(), tiny_chat_tokenizer()
    with torch.no_grad():
        m.lm_head.weight.zero_()
    got = selftext_windows(m, tok, samples=4, seq_len=SEQ + 100, seed=0, batch_size=2,
                           progress=False)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    carried_on = 0
    for row, prompt in zip(got.windows.tolist(), got.provenance["prompts"]):
        start = encode_chat(tok, [prompt])["input_ids"].shape[1]
        generated = row[start:]
        if eos in generated[:-10]:
            after = generated[generated.index(eos) + 1:]
            carried_on += any(t != pad for t in after)
    assert carried_on >= 1


def test_bad_arguments_are_clear_errors(cache):
    with pytest.raises(EcospaError, match="leaves no room to generate"):
        selftext_windows(model(), tiny_chat_tokenizer(), samples=2, seq_len=16, progress=False)
    with pytest.raises(EcospaError, match="expected samples >= 1"):
        selftext_windows(model(), tiny_chat_tokenizer(), samples=0, progress=False)
