"""Short factual questions with known answers: does a pruned chat model still answer?

Perplexity says how well a model predicts text; it does not say whether the model still
answers a question. Each question here has one unambiguous short answer (a few accepted
aliases). A question is asked as one user turn through the tokenizer's chat template, the
answer is generated greedily until an end-of-turn token or ``max_new_tokens``, and scored:

- text is case-folded, accents and punctuation dropped, and number words written as digits
  ("Twenty-four" -> "24", "four" -> "4"), in the answer and the aliases alike;
- the answer is right when any alias occurs in it as whole words ("Rome" is not in
  "Romeo"); an answer that is empty or only whitespace is *empty*, and wrong. The rule is
  lenient by design (no parser for free text is exact): a rambling answer that contains an
  alias counts as right ("1 year is 365 * 12" answers "How many months are in a year?").

The questions (capitals, arithmetic, counts, colours, days and months, animals, science,
authors and inventors, geography) were written for what a 135M-parameter chat model can know,
and fixed before any pruned model answered them. The dense SmolLM2-135M-Instruct (fp32, CPU,
batch 16, transformers 5.25) gets ``DENSE_CORRECT`` = 48 of the 79 right, none empty: a
pruned model is judged on what it keeps of those.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ecospa_deploy.errors import EcospaError


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]     # accepted aliases


def _q(text: str, *answers: str) -> Question:
    return Question(text, answers)


QUESTIONS: tuple[Question, ...] = (
    _q("What is the capital of France?", "Paris"),
    _q("What is the capital of Japan?", "Tokyo"),
    _q("What is the capital of Italy?", "Rome"),
    _q("What is the capital of Germany?", "Berlin"),
    _q("What is the capital of Spain?", "Madrid"),
    _q("What is the capital of the United Kingdom?", "London"),
    _q("What is the capital of Russia?", "Moscow"),
    _q("What is the capital of Egypt?", "Cairo"),
    _q("What is the capital of China?", "Beijing", "Peking"),
    _q("What is the capital of Canada?", "Ottawa"),
    _q("What is the capital of Australia?", "Canberra"),
    _q("What is the capital of India?", "New Delhi", "Delhi"),
    _q("What is the capital of Greece?", "Athens"),
    _q("What is 2 plus 2?", "4"),
    _q("What is 3 times 3?", "9"),
    _q("What is 10 minus 7?", "3"),
    _q("What is 5 plus 6?", "11"),
    _q("What is 12 divided by 4?", "3"),
    _q("What is the square root of 81?", "9"),
    _q("How many days are in a week?", "7"),
    _q("How many months are in a year?", "12"),
    _q("How many legs does a spider have?", "8"),
    _q("How many legs does a dog have?", "4"),
    _q("How many hours are in a day?", "24"),
    _q("How many minutes are in an hour?", "60"),
    _q("How many sides does a triangle have?", "3"),
    _q("How many wheels does a bicycle have?", "2"),
    _q("What colour is the sky on a clear day?", "blue"),
    _q("What colour is grass?", "green"),
    _q("What colour is snow?", "white"),
    _q("What colour is a ripe banana?", "yellow"),
    _q("What colour do you get by mixing blue and yellow?", "green"),
    _q("What day comes after Monday?", "Tuesday"),
    _q("What month comes after January?", "February"),
    _q("What is the first month of the year?", "January"),
    _q("What day comes before Sunday?", "Saturday"),
    _q("What is the last month of the year?", "December"),
    _q("Which animal is known as the king of the jungle?", "lion"),
    _q("What is the largest mammal on Earth?", "blue whale"),
    _q("Which animal says moo?", "cow", "cows"),
    _q("What is a baby dog called?", "puppy", "pup"),
    _q("What is a baby cat called?", "kitten"),
    _q("What is the fastest land animal?", "cheetah"),
    _q("What insect makes honey?", "bee", "bees", "honeybee", "honeybees", "honey bee"),
    _q("What is the largest planet in our solar system?", "Jupiter"),
    _q("What is the chemical formula for water?", "H2O"),
    _q("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide", "CO2"),
    _q("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    _q("At what temperature in degrees Celsius does water freeze?", "0"),
    _q("Which planet is known as the Red Planet?", "Mars"),
    _q("What star is at the centre of our solar system?", "Sun"),
    _q("What force pulls objects towards the Earth?", "gravity", "gravitational"),
    _q("What is the chemical symbol for gold?", "Au"),
    _q("Which organ pumps blood around the body?", "heart"),
    _q("What gas do humans need to breathe to live?", "oxygen"),
    _q("What is the hardest natural substance?", "diamond", "diamonds"),
    _q("Who wrote Romeo and Juliet?", "Shakespeare"),
    _q("Who wrote Pride and Prejudice?", "Austen"),
    _q("Who wrote the Harry Potter books?", "Rowling"),
    _q("Who wrote the novel 1984?", "Orwell"),
    _q("Who painted the Mona Lisa?", "Leonardo", "da Vinci"),
    _q("Who developed the theory of relativity?", "Einstein"),
    _q("Who proposed the theory of evolution by natural selection?", "Darwin"),
    _q("Who discovered penicillin?", "Fleming"),
    _q("Who invented the telephone?", "Bell"),
    _q("Who was the first president of the United States?", "Washington"),
    _q("What is the largest ocean on Earth?", "Pacific"),
    _q("What is the tallest mountain in the world?", "Everest"),
    _q("What language is mainly spoken in Brazil?", "Portuguese"),
    _q("What language is mainly spoken in Mexico?", "Spanish"),
    _q("What language is mainly spoken in France?", "French"),
    _q("What is the currency of Japan?", "yen"),
    _q("What is the opposite of hot?", "cold"),
    _q("What is the opposite of up?", "down"),
    _q("How many players does a football (soccer) team have on the field?", "11"),
    _q("What do caterpillars turn into?", "butterfly", "butterflies", "moth", "moths"),
    _q("What is frozen water called?", "ice"),
    _q("In which country are the pyramids of Giza?", "Egypt"),
    _q("What is the largest continent?", "Asia"),
)


DENSE_CORRECT = 48    # the dense SmolLM2-135M-Instruct's score (module docstring)


@dataclass
class Record:
    question: str
    answer: str
    correct: bool
    empty: bool


@dataclass
class QuizResult:
    records: list[Record]
    correct: int
    empty: int
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}


def _numbers_to_digits(words: list[str]) -> list[str]:
    """Each run of number words as one number: "twenty four" -> "24", "one hundred and five"
    -> "105", "four two" -> "4 2"."""
    out: list[str] = []
    total = current = 0
    last = None                     # kind of the run's last word: "unit" | "ten" | "scale"

    def flush():
        nonlocal total, current, last
        if last is not None:
            out.append(str(total + current))
        total = current = 0
        last = None

    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in _UNITS or w in _TENS:
            kind = "unit" if w in _UNITS else "ten"
            value = _UNITS[w] if kind == "unit" else _TENS[w]
            joins = last == "scale" or (last == "ten" and kind == "unit" and value < 10)
            if not joins:
                flush()
            current += value
            last = kind
        elif w in _SCALES:
            if _SCALES[w] == 100:
                current = (current or 1) * 100
            else:
                total += (current or 1) * _SCALES[w]
                current = 0
            last = "scale"
        elif w == "and" and last == "scale" and (nxt in _UNITS or nxt in _TENS):
            continue
        else:
            flush()
            out.append(w)
    flush()
    return out


def normalize(text: str) -> list[str]:
    """Lower-case words and numbers of ``text``: accents and punctuation dropped, number
    words as digits, thousands separators removed ("1,000" -> "1000"), a decimal kept whole
    ("-18.0" is "18.0", not "18" and "0")."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return _numbers_to_digits(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text))


def is_empty(answer: str) -> bool:
    return not answer.strip()


def is_correct(answer: str, aliases: Sequence[str]) -> bool:
    """Whether any alias occurs in ``answer`` as whole words, after ``normalize``."""
    words = normalize(answer)
    for alias in aliases:
        target = normalize(alias)
        n = len(target)
        if n and any(words[i:i + n] == target for i in range(len(words) - n + 1)):
            return True
    return False


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to ``prompts`` (one user turn each), batched with left padding, each cut
    at its first end-of-turn token."""
    from ecospa_deploy.chat import encode_chat, end_of_turn_ids, pad_id

    if max_new_tokens < 1 or batch_size < 1:
        raise EcospaError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}; expected "
                          "both >= 1")
    stops = end_of_turn_ids(tokenizer)
    device = next(model.parameters()).device
    answers = []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(prompts), batch_size):
            batch = {k: v.to(device) for k, v in
                     encode_chat(tokenizer, prompts[s:s + batch_size]).items()}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops or None, pad_token_id=pad_id(tokenizer))
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def answer_questions(model, tokenizer, questions: Sequence[Question] = QUESTIONS,
                     max_new_tokens: int = 24, batch_size: int = 16) -> QuizResult:
    """Ask every question (greedy, chat template) and score the answers (module docstring)."""
    if not questions:
        raise EcospaError("questions is empty; expected at least one Question")
    answers = generate_answers(model, tokenizer, [q.text for q in questions], max_new_tokens,
                               batch_size)
    records = [Record(q.text, a, correct=not is_empty(a) and is_correct(a, q.answers),
                      empty=is_empty(a)) for q, a in zip(questions, answers)]
    return QuizResult(records, correct=sum(r.correct for r in records),
                      empty=sum(r.empty for r in records), total=len(records))


__all__ = ["Question", "QUESTIONS", "DENSE_CORRECT", "Record", "QuizResult", "normalize",
           "is_empty", "is_correct", "generate_answers", "answer_questions"]
