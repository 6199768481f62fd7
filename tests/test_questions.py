"""The question quiz: its scoring rules, and batched greedy answers equal one-at-a-time ones."""

import pytest
import torch

from ecospa_deploy import questions
from ecospa_deploy.errors import EcospaError
from ecospa_deploy.questions import QUESTIONS, Question, is_correct, is_empty, normalize
from ecospa_deploy.testing import tiny_chat_tokenizer, tiny_dense, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_set_has_forty_distinct_questions_none_giving_its_answer_away():
    assert len(QUESTIONS) >= 40
    assert len({q.text for q in QUESTIONS}) == len(QUESTIONS)
    for q in QUESTIONS:
        assert q.answers and all(a.strip() for a in q.answers), q
        assert not is_correct(q.text, q.answers), q   # the question does not contain its answer


@pytest.mark.parametrize("text, words", [
    ("The answer is Four.", ["the", "answer", "is", "4"]),
    ("Twenty-four hours", ["24", "hours"]),
    ("one hundred and five", ["105"]),
    ("one thousand two hundred thirty-four", ["1234"]),
    ("four two", ["4", "2"]),
    ("1,000 people", ["1000", "people"]),
    ("São Paulo", ["sao", "paulo"]),
    ("It is -18.0°C.", ["it", "is", "18.0", "c"]),
    ("H2O!", ["h2o"]),
])
def test_normalize(text, words):
    assert normalize(text) == words


@pytest.mark.parametrize("answer, aliases, right", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("PARIS", ["paris"], True),
    ("It is Beijing, once called Peking.", ["Peking", "Beijing"], True),
    ("Romeo is not a city.", ["Rome"], False),                    # whole words only
    ("A dog has four legs.", ["4"], True),                        # number words are digits
    ("A dog has 4 legs.", ["four"], True),
    ("It has fourteen legs.", ["4"], False),
    ("Twenty-four.", ["24"], True),
    ("It freezes at -18.0 degrees.", ["0"], False),               # a decimal is one number
    ("It was George Washington.", ["George Washington"], True),   # several words, in order
    ("It was Washington George.", ["George Washington"], False),
    ("Leonardo da Vinci painted it.", ["da Vinci"], True),
    ("", ["Paris"], False),
])
def test_is_correct(answer, aliases, right):
    assert is_correct(answer, aliases) is right


def test_only_whitespace_is_empty():
    assert is_empty("") and is_empty(" \n\t\n") and not is_empty(" 4 ")


def test_batched_answers_equal_one_at_a_time():
    model = tiny_dense("llama", max_position_embeddings=512)
    tok = tiny_chat_tokenizer()
    asked = QUESTIONS[:5]
    one = questions.answer_questions(model, tok, asked, max_new_tokens=8, batch_size=1)
    batched = questions.answer_questions(model, tok, asked, max_new_tokens=8, batch_size=3)
    assert [r.answer for r in batched.records] == [r.answer for r in one.records]
    assert [r.question for r in one.records] == [q.text for q in asked]
    assert one.total == 5 and one.correct == sum(r.correct for r in one.records)


def test_an_answer_matching_an_alias_is_counted_right():
    model, tok = tiny_dense("llama", max_position_embeddings=512), tiny_chat_tokenizer()
    said = questions.generate_answers(model, tok, ["What is 2 plus 2?"], max_new_tokens=8)[0]
    word = normalize(said)[0]
    result = questions.answer_questions(model, tok, [Question("What is 2 plus 2?", (word,))],
                                        max_new_tokens=8)
    assert result.correct == 1 and result.empty == 0 and result.records[0].correct


def test_an_empty_answer_is_empty_and_wrong():
    """With a zero output layer every logit ties and greedy picks id 0, the pad token: the
    decoded answer (special tokens skipped) is empty."""
    model, tok = tiny_dense("llama", max_position_embeddings=512), tiny_chat_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = questions.answer_questions(model, tok, [Question("Say nothing.", ("nothing",))],
                                        max_new_tokens=4)
    record = result.records[0]
    assert record.answer == "" and record.empty and not record.correct
    assert (result.correct, result.empty, result.total) == (0, 1, 1)


def test_answers_stop_at_the_first_end_of_turn_token():
    """Make the token greedy writes third the tokenizer's eos: the answer ends before its
    first occurrence."""
    from ecospa_deploy.chat import encode_chat

    model, tok = tiny_dense("llama", max_position_embeddings=512), tiny_chat_tokenizer()
    batch = encode_chat(tok, ["Hi?"])
    free = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=[],
                          pad_token_id=0)[0, batch["input_ids"].shape[1]:].tolist()
    stop = free[2]
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    answer = questions.generate_answers(model, tok, ["Hi?"], max_new_tokens=8)[0]
    assert answer == tok.decode(free[:free.index(stop)], skip_special_tokens=True)


def test_bad_arguments_are_clear_errors():
    model = tiny_dense("llama", max_position_embeddings=512)
    with pytest.raises(EcospaError, match="no chat template"):
        questions.answer_questions(model, tiny_tokenizer(), QUESTIONS[:1])
    with pytest.raises(EcospaError, match="questions is empty"):
        questions.answer_questions(model, tiny_chat_tokenizer(), [])
    with pytest.raises(EcospaError, match="max_new_tokens=0"):
        questions.generate_answers(model, tiny_chat_tokenizer(), ["Hi?"], max_new_tokens=0)
