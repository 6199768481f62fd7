"""The evaluation and calibration helpers on the real reference model, SmolLM2-135M-Instruct
(slow: a minute or two on 2 idle CPU cores; far longer on a loaded machine)."""

import math

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(smollm2):
    return smollm2


def test_the_dense_model_scores_what_the_quiz_records(dense):
    from ecospa_deploy.questions import DENSE_CORRECT, QUESTIONS, answer_questions

    result = answer_questions(*dense)
    assert result.total == len(QUESTIONS) and result.empty == 0
    # another CPU or library version may flip a near-tie or two
    assert abs(result.correct - DENSE_CORRECT) <= 2, [
        (r.question, r.answer) for r in result.records]


def test_the_dense_model_reads_every_domain(dense):
    from ecospa_deploy.domains import domain_perplexity, load_domains

    got = domain_perplexity(*dense, load_domains(), seq_len=256, max_windows=2, batch_size=2)
    for name, r in got.items():
        assert r["windows"] == 2 and math.isfinite(r["perplexity"]), name
        assert 1 < r["perplexity"] < 100, (name, r["perplexity"])


def test_selftext_windows_are_chat_turns_written_by_the_model(dense, tmp_path, monkeypatch):
    from ecospa_deploy.prune.selftext import selftext_windows

    monkeypatch.setenv("ECOSPA_CACHE", str(tmp_path))
    model, tok = dense
    got = selftext_windows(model, tok, samples=2, seq_len=96, seed=0, batch_size=2,
                           progress=False)
    assert got.windows.shape == (2, 96)
    assert (got.windows[:, 0] == tok.convert_tokens_to_ids("<|im_start|>")).all()
    for row, prompt in zip(got.windows, got.provenance["prompts"]):
        text = tok.decode(row)
        assert prompt in text and text.count("<|im_start|>assistant\n") >= 1
    assert selftext_windows(model, tok, samples=2, seq_len=96, seed=0, batch_size=2,
                            progress=False).cached
